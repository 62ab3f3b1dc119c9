"""Entry point for one or many processes: ``accelerate launch -m selfalign.train ...``.

    accelerate launch --config_file configs/accelerate/ddp.yaml -m selfalign.train \
        --examples aligned/records.jsonl --base BASE_DIR --out engraved/ \
        --config train.yaml --system "You are ..., a helpful, ethical and reliable assistant."

With ``--dpo DPO.yaml`` (beta, loss_type, label_smoothing) it trains DPO instead: the
examples are preference pairs (prompt, chosen, rejected) and ``--base`` is the model DPO
continues (an adapter folder such as engraved/, or a full model folder).

Plain ``python -m selfalign.train`` trains in one process. Exit codes as for the CLI:
0 done, 2 bad input (one line on stderr), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from selfalign.errors import InputError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m selfalign.train", description=__doc__.split("\n")[0]
    )
    p.add_argument("--examples", required=True, type=Path,
                   help="JSONL with prompt and answer (with --dpo: prompt, chosen, rejected)")  # fmt: skip
    p.add_argument("--base", required=True, type=Path, help="base model directory (HF format)")
    p.add_argument("--out", required=True, type=Path, help="output model directory")
    p.add_argument("--config", type=Path, help="YAML of TrainConfig settings (default: paper's)")
    p.add_argument("--dpo", type=Path, help="YAML of DPO settings: train DPO on preference pairs")
    system = p.add_mutually_exclusive_group(required=True)
    system.add_argument("--system", help="the system text every example starts with")
    system.add_argument("--system-file", type=Path, help="file holding the system text")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from selfalign.store import read_jsonl_numbered
        from selfalign.train.config import TrainConfig, load_train_config
        from selfalign.train.data import read_examples
        from selfalign.train.sft import train_sft

        config = load_train_config(args.config) if args.config else TrainConfig()
        if args.system_file is not None:
            try:
                system_text = args.system_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise InputError(f"cannot read: {exc.strerror}", file=args.system_file) from None
        else:
            system_text = args.system
        if args.dpo is not None:
            from selfalign.train.config import DPOSettings
            from selfalign.train.dpo import train_dpo, validate_pairs
            from selfalign.validation import load_yaml, validate_model

            dpo = validate_model(DPOSettings, load_yaml(args.dpo) or {}, file=args.dpo)
            pairs = validate_pairs(
                [row for _, row in read_jsonl_numbered(args.examples)], source=args.examples
            )
            result = train_dpo(pairs, args.base, args.out, config, dpo, system_text=system_text)
        else:
            result = train_sft(
                read_examples(args.examples), args.base, args.out, config, system_text=system_text
            )
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from accelerate import PartialState

    if PartialState().is_main_process:
        summary = result.summary()
        summary.pop("history")
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
