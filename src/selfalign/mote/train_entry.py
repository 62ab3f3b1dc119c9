"""MoTE training in one or many processes: ``accelerate launch -m selfalign.mote.train_entry``.

    accelerate launch --config_file configs/accelerate/ddp.yaml -m selfalign.mote.train_entry \
        --chains chains/records.jsonl --base BASE_DIR --out mote/model --config train.yaml

``--config`` is a YAML of ``MoteTrainConfig`` settings (the mote stage's ``train:`` block);
``batch_size`` is the global batch, split over the processes. Several processes train as
DDP; FSDP and DeepSpeed ZeRO-3 are refused before the model loads. The mote stage runs
this module itself when its ``launch:`` block asks for more than one process.

Plain ``python -m selfalign.mote.train_entry`` trains in one process. Exit codes as for the
CLI: 0 done, 2 bad input (one line on stderr), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from selfalign.errors import InputError
from selfalign.store import atomic_write_text, dumps_record

if TYPE_CHECKING:
    from selfalign.mote.config import MoteTrainConfig
    from selfalign.mote.data import Chain
    from selfalign.stages.training import LaunchConfig

MODULE = "selfalign.mote.train_entry"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0])
    p.add_argument("--chains", required=True, type=Path,
                   help="JSONL of AlignCoT chains (question, analysis, guidance, answer)")  # fmt: skip
    p.add_argument("--base", required=True, type=Path, help="base model directory (HF format)")
    p.add_argument("--out", required=True, type=Path, help="output MoTE model directory")
    p.add_argument("--config", type=Path, help="YAML of MoteTrainConfig settings")
    return p.parse_args(argv)


def load_config(path: Path | None) -> MoteTrainConfig:
    from selfalign.mote.config import MoteTrainConfig
    from selfalign.validation import load_yaml, validate_model

    if path is None:
        return MoteTrainConfig()
    return validate_model(MoteTrainConfig, load_yaml(path) or {}, file=path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from selfalign.mote.data import parse_chains
        from selfalign.mote.train import train_mote
        from selfalign.store import read_jsonl_numbered

        config = load_config(args.config)
        rows = [row for _, row in read_jsonl_numbered(args.chains)]
        result = train_mote(parse_chains(rows, file=args.chains), args.base, args.out, config)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(json.dumps({"model_dir": str(result.path), **result.metrics}))
    return 0


def sharded_launch(accelerate_config: Path) -> str | None:
    """What an accelerate config file shards that MoTE refuses (FSDP, DeepSpeed ZeRO-3),
    or None; read before anything is launched."""
    try:
        data = yaml.safe_load(accelerate_config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(
            f"cannot read the accelerate config: {exc}", file=accelerate_config
        ) from None
    if not isinstance(data, dict):
        raise InputError("an accelerate config must be a mapping", file=accelerate_config)
    kind = str(data.get("distributed_type", "")).upper()
    if kind == "FSDP":
        return "FSDP"
    zero = (data.get("deepspeed_config") or {}).get("zero_stage")
    if kind == "DEEPSPEED" and str(zero) == "3":
        return "DeepSpeed ZeRO-3"
    return None


def check_launch(launch: LaunchConfig) -> None:
    """Refuse a launch MoTE cannot save from, with the line training itself would print."""
    from selfalign.mote.train import SHARDING_REFUSED

    if launch.accelerate_config is None:
        return
    what = sharded_launch(Path(launch.accelerate_config))
    if what is not None:
        raise InputError(SHARDING_REFUSED.format(what=what), field="launch.accelerate_config")


def launch_mote(
    chains: list[Chain], base: Path, out_dir: Path, config: MoteTrainConfig, launch: LaunchConfig
) -> dict[str, Any]:
    """Train under ``accelerate launch`` into ``out_dir`` and return its metrics. The inputs
    go to ``out_dir/launch/``, which is removed once training has succeeded."""
    check_launch(launch)
    work = out_dir / "launch"
    work.mkdir(parents=True, exist_ok=True)
    chains_file = work / "chains.jsonl"
    atomic_write_text(chains_file, "".join(dumps_record(c.model_dump()) + "\n" for c in chains))
    atomic_write_text(work / "train.yaml", yaml.safe_dump(config.model_dump(mode="json")))
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--num_processes", str(launch.num_processes)]  # fmt: skip
    if launch.accelerate_config is not None:
        cmd += ["--config_file", str(launch.accelerate_config)]
    cmd += ["-m", MODULE, "--chains", str(chains_file), "--base", str(base),
            "--out", str(out_dir), "--config", str(work / "train.yaml")]  # fmt: skip
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise RuntimeError(f"accelerate launch exited with {proc.returncode}")
    from selfalign.mote.config import METRICS_FILE

    metrics = json.loads((out_dir / METRICS_FILE).read_text(encoding="utf-8"))
    for file in (chains_file, work / "train.yaml"):
        file.unlink()
    work.rmdir()
    return metrics


if __name__ == "__main__":
    sys.exit(main())
