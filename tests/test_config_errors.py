"""Malformed configs exit 2 with one line naming the file and field, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "selfalign.cli", *args],
        capture_output=True, text=True, cwd=cwd, timeout=300,
    )  # fmt: skip


CASES = {
    "unknown_key": ("model: {model}\ncolour: blue\n", "config.yaml: colour: unknown key"),
    "wrong_type": ("model: {model}\nseed: many\n", "config.yaml: seed: Input should be a valid integer"),
    "bad_yaml": ("model: {model}\nseed: [1, 2\n", "config.yaml:3: invalid YAML"),
    "missing_model": ("model: ./no-such-model\n", "config.yaml: model: model directory not found"),
    "bad_spec": ("model: 'openai:localhost#x'\n", "config.yaml: model: expected openai:BASE_URL#MODEL_NAME"),
    "unknown_stage": ("model: {model}\nstages:\n  polish: {{}}\n", "config.yaml: stages.polish: unknown stage"),
    "backend_key": ("model: {model}\nbackend:\n  model: {model}\n  batchsize: 4\n", "config.yaml: backend.batchsize: unknown key"),
    "not_mapping": ("- just\n- a list\n", "config.yaml: expected a mapping at the top level"),
    "stage_name": ("model: {model}\nstages:\n  engraved:\n    assistant_name: Wren\n", "config.yaml: stages.engraved.assistant_name: the assistant's name is set once, as the top-level assistant_name"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_config_exits_2_with_one_line(
    case: str, tmp_path: Path, tiny_model: Path
) -> None:
    text, expected = CASES[case]
    config = tmp_path / "config.yaml"
    config.write_text(text.format(model=tiny_model))
    result = run_cli("run", str(config), "--dry-run", "--out", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert expected in lines[0], lines[0]
    assert str(config) in lines[0]
    assert not (tmp_path / "run").exists()


def test_missing_config_file(tmp_path: Path) -> None:
    result = run_cli("run", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'nope.yaml'}: file not found"


def test_non_utf8_config(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_bytes(b"model: \xff\xfe\n")
    result = run_cli("run", str(config))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {config}: not valid UTF-8"


def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    result = run_cli("run")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_status_of_a_non_run_directory(tmp_path: Path) -> None:
    result = run_cli("status", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path}: not a run directory (no manifest.json)"


def named_run_config(tmp_path: Path, tiny_model: Path) -> Path:
    """A config naming the assistant once, with the three stages that use the name."""
    config = tmp_path / "config.yaml"
    config.write_text(
        f"model: {tiny_model}\nassistant_name: Wren\n"
        "stages:\n  aligned: {}\n  engraved: {}\n  verbose: {}\n"
    )
    return config


def test_one_assistant_name_reaches_every_stage(tmp_path: Path, tiny_model: Path) -> None:
    from selfalign.config import load_run_config

    _, stages = load_run_config(named_run_config(tmp_path, tiny_model))
    assert stages["aligned"].final_name == "Wren"
    assert stages["aligned"].generation_name != "Wren"  # the code name stays apart
    assert stages["engraved"].assistant_name == stages["verbose"].assistant_name == "Wren"


def test_the_resolved_config_a_run_writes_loads_again(tmp_path: Path, tiny_model: Path) -> None:
    from selfalign.config import load_run_config
    from selfalign.pipeline import Runner

    config = named_run_config(tmp_path, tiny_model)
    run, stages = load_run_config(config)
    Runner(run, stages, tmp_path / "run", config).write_config()
    again, stages_again = load_run_config(tmp_path / "run" / "config.yaml")
    assert again.assistant_name == "Wren"
    assert {k: v.model_dump() for k, v in stages_again.items()} == {
        k: v.model_dump() for k, v in stages.items()
    }


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from selfalign.config import load_run_config
    from selfalign.pipeline import Runner

    folder, elsewhere = tmp_path / "configs", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    config = folder / "config.yaml"
    config.write_text(
        f"model: {tiny_model}\n"
        f"backend:\n  model: {tiny_model}\n  tokenizer: tok\n  adapter: lora/adapter\n"
        "stages:\n  engraved:\n    launch:\n      accelerate_config: accelerate/fsdp.yaml\n"
    )
    monkeypatch.chdir(elsewhere)
    want = (folder / "tok", folder / "lora" / "adapter", folder / "accelerate" / "fsdp.yaml")

    def paths(path: Path) -> tuple[Path | None, ...]:
        run, stages = load_run_config(path)
        backend = run.generation_backend()
        return backend.tokenizer, backend.adapter, stages["engraved"].launch.accelerate_config

    assert paths(config) == want
    # the resolved config.yaml a run keeps holds absolute paths: it loads from anywhere
    Runner(*load_run_config(config), tmp_path / "run", config).write_config()
    monkeypatch.chdir(folder)
    assert paths(tmp_path / "run" / "config.yaml") == want


def test_backend_paths_from_cli_options_stay_as_given() -> None:
    from selfalign.backends import BackendConfig

    config = BackendConfig(model="hf:m", tokenizer="tok", adapter="~/lora")
    assert config.tokenizer == Path("tok")
    assert config.adapter == Path("~/lora").expanduser()


DATA = {  # the smallest valid input of each command: the option is checked after it
    "truthfulqa": (
        "--data",
        '[{"question": "Q?", "mc1_targets": {"a": 1, "b": 0}, "mc2_targets": {"a": 1, "b": 0}}]',
    ),
    "answer": ("--questions", '{"question_id": 1, "turns": ["Q?"]}\n'),
}
BAD_OPTIONS = [
    ("truthfulqa", "--dtype", "float33", "--dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16'"),
    ("answer", "--dtype", "float33", "--dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16'"),
    ("answer", "--api-key-env", "1KEY", "--api-key-env: String should match pattern"),
]  # fmt: skip


@pytest.mark.parametrize(("command", "option", "value", "expected"), BAD_OPTIONS)
def test_bad_backend_option_is_one_line_naming_it(
    command: str, option: str, value: str, expected: str, tmp_path: Path
) -> None:
    flag, text = DATA[command]
    data = tmp_path / "data.json"
    data.write_text(text)
    out = ["--out", str(tmp_path / "out.jsonl")] if command == "answer" else []
    result = run_cli(
        "eval", command, "--model", str(tmp_path), flag, str(data), *out, option, value
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), result.stderr
    assert "errors.pydantic.dev" not in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_describe_error_speaks_in_config_terms(tiny_model: Path) -> None:
    from pydantic import BaseModel, ValidationError

    from selfalign.annotations.principles import ExemplarsFile
    from selfalign.config import RunConfig
    from selfalign.validation import ExistingPath, describe_error, field_path

    class Queries(BaseModel):  # a union of validated paths: pydantic names its steps in loc
        queries: ExistingPath | list[ExistingPath]

    cases = [
        (RunConfig, {"model": str(tiny_model), "backend": {"model": str(tiny_model), "batchsize": 4}},
         (("backend", "batchsize"), "unknown key")),
        (ExemplarsFile, {"self_description": "I am.", "exemplars": [
            {"user": "u", "analysis": "one\ntwo", "rules": [1], "answer": "a"}]},
         (("exemplars", 0, "analysis"), "must be a single line")),
        (Queries, {"queries": "no-such-file.jsonl"},
         (("queries",), "file not found: no-such-file.jsonl")),
    ]  # fmt: skip
    for model, data, want in cases:
        with pytest.raises(ValidationError) as caught:
            model.model_validate(data)
        assert "errors.pydantic.dev" in str(caught.value)  # what must never reach a user
        assert describe_error(caught.value) == want
    assert field_path(("stages", "aligned", "backend", "dtype")) == "stages.aligned.backend.dtype"
