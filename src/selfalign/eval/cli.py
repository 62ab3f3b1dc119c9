"""``selfalign eval ...``: each command prints one JSON object and writes it to --out."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from selfalign.backends import Backend, BackendConfig, load_backend
from selfalign.errors import InputError
from selfalign.eval.results import EvalResult, data_ref, emit
from selfalign.eval.resume import model_identity
from selfalign.validation import describe_error, field_path

eval_app = typer.Typer(
    no_args_is_help=True, help="Benchmarks: TruthfulQA, HHH, pairwise judge, safety."
)

Model = Annotated[
    str, typer.Option("--model", help="model dir or spec (hf:PATH, vllm:PATH, openai:URL#NAME)")
]
Out = Annotated[Path | None, typer.Option("--out", help="also write the result JSON here")]
RunDir = Annotated[
    Path | None, typer.Option("--run-dir", help="also keep the result under RUN_DIR/eval/")
]
Limit = Annotated[int | None, typer.Option("--limit", min=1, help="only the first N items")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="hf: rows per forward pass")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto, float32, bfloat16 or float16")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1, ...")]
ApiKeyEnv = Annotated[
    str, typer.Option("--api-key-env", help="openai: variable holding the API key")
]
SystemFile = Annotated[
    Path | None, typer.Option("--system-file", help="text file with a system prompt")
]
Records = Annotated[
    Path | None,
    typer.Option(
        "--records", help="per-item JSONL that makes the run resumable (default: beside --out)"
    ),
]


def _backend(spec: str, batch_size: int = 8, dtype: str = "auto", device: str = "auto",
             api_key_env: str = "OPENAI_API_KEY") -> Backend:  # fmt: skip
    try:
        config = BackendConfig(
            model=spec, batch_size=batch_size, dtype=dtype, device=device, api_key_env=api_key_env
        )
    except ValidationError as e:
        loc, msg = describe_error(e)  # each field set here is the option of that name
        raise InputError(msg, field="--" + field_path(loc).replace("_", "-")) from None
    return load_backend(config)


def _scoring_backend(
    spec: str, batch_size: int, dtype: str, device: str, api_key_env: str = "OPENAI_API_KEY"
) -> Backend:
    backend = _backend(spec, batch_size, dtype, device, api_key_env)
    if not backend.can_score:
        raise InputError(f"the {backend.name} backend cannot score continuations", field="--model")
    return backend


def _system(path: Path | None) -> str | None:
    if path is None:
        return None
    if not path.is_file():
        raise InputError("file not found", file=path)
    return path.read_text(encoding="utf-8").strip()


def _records(records: Path | None, out: Path | None, suffix: str) -> Path | None:
    if records is not None:
        return records
    return out.with_suffix(suffix) if out is not None else None


def _details(path: Path | None, rows: list[dict]) -> None:
    if path is None:
        return
    from selfalign.store import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _exit_if_failed(failed: int, what: str) -> None:
    """Exit 1 when requests failed after all retries; a rerun resumes and asks again."""
    if failed:
        print(
            f"error: {failed} {what}(s) failed; run the same command again to finish them",
            file=sys.stderr,
        )
        raise typer.Exit(1)


def _finish(result: EvalResult, out: Path | None, run_dir: Path | None, failed: int = 0) -> None:
    if failed:
        typer.echo(emit(result))
        _exit_if_failed(failed, "item")
    typer.echo(emit(result, out, run_dir))


@eval_app.command()
def truthfulqa(
    model: Model,
    data: Annotated[
        Path, typer.Option("--data", help="mc_task.json or HF truthful_qa multiple_choice rows")
    ],
    protocol: Annotated[str, typer.Option("--protocol", help="lm-eval or dromedary")] = "lm-eval",
    limit: Limit = None,
    out: Out = None,
    run_dir: RunDir = None,
    details: Annotated[
        Path | None, typer.Option("--details", help="per-question scores (JSONL)")
    ] = None,
    system_file: SystemFile = None,
    batch_size: BatchSize = 16,
    dtype: Dtype = "auto",
    device: Device = "auto",
    api_key_env: ApiKeyEnv = "OPENAI_API_KEY",
) -> None:
    """TruthfulQA MC1/MC2 (lm-eval protocol) or MC1 (dromedary true/false protocol)."""
    from selfalign.eval.truthfulqa import DROMEDARY_SYSTEM, evaluate_truthfulqa, load_truthfulqa

    if protocol not in ("lm-eval", "dromedary"):
        raise InputError(
            f"unknown protocol {protocol!r} (lm-eval or dromedary)", field="--protocol"
        )
    load_truthfulqa(data)  # bad data fails before a model is loaded
    system = _system(system_file) or DROMEDARY_SYSTEM
    with _scoring_backend(model, batch_size, dtype, device, api_key_env) as backend:
        result, rows = evaluate_truthfulqa(
            backend, data, model=model, protocol=protocol, limit=limit, system=system
        )
    _details(details, rows)
    _finish(result, out, run_dir)


@eval_app.command()
def hhh(
    model: Model,
    data: Annotated[
        Path, typer.Option("--data", help="BIG-bench hhh_alignment folder, a task.json, or HF rows")
    ],
    limit: Limit = None,
    out: Out = None,
    run_dir: RunDir = None,
    details: Annotated[
        Path | None, typer.Option("--details", help="per-pair scores (JSONL)")
    ] = None,
    system_file: SystemFile = None,
    batch_size: BatchSize = 16,
    dtype: Dtype = "auto",
    device: Device = "auto",
    api_key_env: ApiKeyEnv = "OPENAI_API_KEY",
) -> None:
    """HHH alignment: pick the better reply, both option orders; accuracy per category."""
    from selfalign.eval.hhh import HHH_SYSTEM, evaluate_hhh, load_hhh

    load_hhh(data)
    system = _system(system_file) or HHH_SYSTEM  # a missing file fails before the model loads
    with _scoring_backend(model, batch_size, dtype, device, api_key_env) as backend:
        result, rows = evaluate_hhh(backend, data, model=model, limit=limit, system=system)
    _details(details, rows)
    _finish(result, out, run_dir)


@eval_app.command()
def answer(
    model: Model,
    questions: Annotated[
        Path, typer.Option("--questions", help="question.jsonl (Vicuna-80, MT-bench)")
    ],
    out: Annotated[Path, typer.Option("--out", help="answer file (JSONL; a rerun resumes it)")],
    model_id: Annotated[
        str | None, typer.Option("--model-id", help="name stored in the answer file")
    ] = None,
    limit: Limit = None,
    system_file: SystemFile = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 512,
    batch_size: BatchSize = 8,
    dtype: Dtype = "auto",
    device: Device = "auto",
    api_key_env: ApiKeyEnv = "OPENAI_API_KEY",
) -> None:
    """Write a model's answers to a question file (FastChat answer format)."""
    from selfalign.eval.answers import answer_questions
    from selfalign.eval.questions import load_questions

    qs = load_questions(questions)[:limit]
    with _backend(model, batch_size, dtype, device, api_key_env) as backend:
        rows, failed = answer_questions(
            backend, qs, out=out, model_id=model_id or Path(model.split("#")[-1]).name,
            system=_system(system_file), max_new_tokens=max_new_tokens, batch_size=batch_size,
        )  # fmt: skip
    typer.echo(json.dumps({"answers": str(out), "n": len(rows), "failed": failed, "model": model,
                           "questions": data_ref(questions)}))  # fmt: skip
    _exit_if_failed(failed, "question")


@eval_app.command()
def judge(
    answers: Annotated[Path, typer.Option("--answers", help="answer file to evaluate")],
    baseline: Annotated[Path, typer.Option("--baseline", help="answer file to compare against")],
    judge: Annotated[str, typer.Option("--judge", help="judge model dir or spec")],
    questions: Annotated[
        Path | None, typer.Option("--questions", help="question file (if answers lack questions)")
    ] = None,
    out: Out = None,
    records: Records = None,
    run_dir: RunDir = None,
    limit: Limit = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 512,
    batch_size: BatchSize = 8,
    dtype: Dtype = "auto",
    device: Device = "auto",
    api_key_env: ApiKeyEnv = "OPENAI_API_KEY",
) -> None:
    """Pairwise win rate of --answers over --baseline, judged in both orders."""
    from selfalign.eval.judge import build_items, run_judge, summarize
    from selfalign.eval.questions import load_answers, load_questions

    qs = load_questions(questions) if questions is not None else None
    mine, base = load_answers(answers), load_answers(baseline)
    items = build_items(qs, mine, base, model_identity(judge))
    if limit is not None:
        keep = set(list(dict.fromkeys(it.qid for _, it in items))[:limit])
        items = [(i, it) for i, it in items if it.qid in keep]
    data = [data_ref(answers), data_ref(baseline)] + ([data_ref(questions)] if questions else [])
    with _backend(judge, batch_size, dtype, device, api_key_env) as backend:
        done, failed = run_judge(
            backend, items, records=_records(records, out, ".judgments.jsonl"),
            max_new_tokens=max_new_tokens, batch_size=batch_size,
        )  # fmt: skip
    model_ids = (
        sorted({a.model_id for a in mine.values()}),
        sorted({a.model_id for a in base.values()}),
    )
    result = summarize(
        items, done, model=f"{'+'.join(model_ids[0])} vs {'+'.join(model_ids[1])}", data=data
    )
    result.details["judge"] = judge
    _finish(result, out, run_dir, failed)


def _prompt_files(paths: list[Path], kinds: list[str]) -> list:
    """Each file with its stated kind: one --kind for every file, or one per file in
    order; ``auto`` (and no --kind at all) reads the kind from the file."""
    from selfalign.eval.safety import STATED_KINDS, PromptFile, file_labels

    for k in kinds:
        if k not in (*STATED_KINDS, "auto"):
            raise InputError(f"must be benign, harmful or auto, got {k!r}", field="--kind")
    if len(kinds) > 1 and len(kinds) != len(paths):
        raise InputError(
            f"give one --kind for every file or one per file ({len(paths)}), got {len(kinds)}",
            field="--kind",
        )
    stated = kinds * len(paths) if len(kinds) == 1 else kinds or ["auto"] * len(paths)
    return [
        PromptFile(Path(p), label, None if k == "auto" else k)
        for p, label, k in zip(paths, file_labels(paths), stated, strict=True)
    ]


@eval_app.command()
def safety(
    judge: Annotated[str, typer.Option("--judge", help="judge model dir or spec")],
    model: Annotated[
        str | None,
        typer.Option("--model", help="model that answers --prompts (dir or spec)"),
    ] = None,
    prompts: Annotated[
        list[Path] | None,
        typer.Option(
            "--prompts", help="prompt file(s): HH-RLHF, HarmBench, AdvBench, XSTest, JSONL"
        ),
    ] = None,
    answers: Annotated[
        list[Path] | None,
        typer.Option(
            "--answers",
            help="JSONL of prompts with answers already written (e.g. RUN/mote/records.jsonl): "
            "judged as they are, no --model",
        ),
    ] = None,
    kind: Annotated[
        list[str] | None,
        typer.Option(
            "--kind",
            help="benign, harmful or auto (read from the file): once for every file, or once "
            "per file in order",
        ),
    ] = None,
    out: Out = None,
    records: Records = None,
    run_dir: RunDir = None,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="first N prompts of each file")
    ] = None,
    system_file: SystemFile = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 256,
    judge_mode: Annotated[
        str,
        typer.Option(
            "--judge-mode",
            help="generate: the judge writes its verdicts (a chat model); likelihood: its "
            "log-likelihoods of each answer are read (any model a backend can score)",
        ),
    ] = "generate",
    batch_size: BatchSize = 8,
    dtype: Dtype = "auto",
    device: Device = "auto",
    api_key_env: ApiKeyEnv = "OPENAI_API_KEY",
) -> None:
    """MoTE's Help, Harm, Harm-Help and XSTest compliance, per prompt file."""
    from selfalign.eval.safety import load_file, run_safety, summarize

    if model is not None and answers:
        raise InputError("use --model (with --prompts) or --answers, not both", field="--answers")
    if model is None and not answers:
        raise InputError("give --model with --prompts, or --answers", field="--model")
    if answers and prompts:
        raise InputError(
            "goes with --model; --answers files carry their prompts", field="--prompts"
        )
    if model is not None and not prompts:
        raise InputError("at least one prompt file is needed with --model", field="--prompts")
    if answers and system_file is not None:
        raise InputError(
            "goes with --model; the answers are written already", field="--system-file"
        )
    if judge_mode not in ("generate", "likelihood"):
        raise InputError("must be generate or likelihood", field="--judge-mode")
    files = _prompt_files(list(prompts or answers or []), list(kind or []))
    items = [p for f in files for p in load_file(f, answers=bool(answers))[:limit]]
    judge_name = model_identity(judge)
    record_path = _records(records, out, ".records.jsonl")
    with _backend(judge, batch_size, dtype, device, api_key_env) as judge_backend:
        if judge_mode == "likelihood" and not judge_backend.can_score:
            raise InputError(f"the judge's {judge_backend.name} backend cannot score "
                             "continuations: use --judge-mode generate", field="--judge-mode")  # fmt: skip
        if model is None:
            done, ids, failed = run_safety(
                None, judge_backend, items, model_name=None, judge_name=judge_name,
                records=record_path, batch_size=batch_size, judge_mode=judge_mode,
            )  # fmt: skip
        else:
            with _backend(model, batch_size, dtype, device, api_key_env) as model_backend:
                done, ids, failed = run_safety(
                    model_backend, judge_backend, items,
                    model_name=model_identity(model), judge_name=judge_name,
                    records=record_path, system=_system(system_file),
                    max_new_tokens=max_new_tokens, batch_size=batch_size,
                    judge_mode=judge_mode,
                )  # fmt: skip
    shown = model or " + ".join(str(p) for p in answers or [])
    result = summarize(done, ids, items, files, model=shown, judge=judge, judge_mode=judge_mode)
    _finish(result, out, run_dir, failed)


@eval_app.command("lm-eval")
def lm_eval_tasks(
    model: Model,
    tasks: Annotated[
        str, typer.Option("--tasks", help="lm-evaluation-harness tasks, comma-separated")
    ],
    include_path: Annotated[
        list[Path] | None,
        typer.Option("--include-path", help="folder of extra task YAMLs (repeatable)"),
    ] = None,
    truthfulqa_data: Annotated[
        Path | None,
        typer.Option(
            "--truthfulqa-data",
            help="mc_task.json or HF truthful_qa rows: truthfulqa_mc1/mc2 read it, not the Hub",
        ),
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="only the first N documents of each task")
    ] = None,
    num_fewshot: Annotated[
        int | None, typer.Option("--num-fewshot", min=0, help="few-shot examples per prompt")
    ] = None,
    apply_chat_template: Annotated[
        bool, typer.Option("--apply-chat-template", help="render prompts with the chat template")
    ] = False,
    seed: Annotated[
        int | None, typer.Option("--seed", help="python/numpy/torch/few-shot seeds (lm-eval's)")
    ] = None,
    out: Out = None,
    records: Records = None,
    batch_size: BatchSize = 16,
    dtype: Dtype = "auto",
    device: Device = "auto",
    api_key_env: ApiKeyEnv = "OPENAI_API_KEY",
) -> None:
    """Any lm-evaluation-harness task through our backends (needs the lm-eval extra)."""
    from selfalign.backends import parse_spec
    from selfalign.eval.lm_eval_run import require_lm_eval, run_lm_eval

    require_lm_eval()
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise InputError("no task given", field="--tasks")
    if truthfulqa_data is not None and not truthfulqa_data.exists():
        raise InputError("file not found", file=truthfulqa_data, field="--truthfulqa-data")
    spec = parse_spec(model, field="--model")  # a bad spec fails before the tasks load
    if spec.path is not None and not spec.path.exists():
        raise InputError("model directory does not exist", file=spec.path, field="--model")

    def open_backend() -> Backend:
        return _backend(model, batch_size, dtype, device, api_key_env)

    from selfalign.eval.harness import RequestsFailed

    try:
        result = run_lm_eval(
            open_backend, model=model, model_id=model_identity(model), tasks=names,
            include_paths=include_path or [], truthfulqa_data=truthfulqa_data, limit=limit,
            num_fewshot=num_fewshot, seed=seed, records=_records(records, out, ".records.jsonl"),
            apply_chat_template=apply_chat_template,
        )  # fmt: skip
    except RequestsFailed as exc:
        _exit_if_failed(exc.n, "request")
    typer.echo(emit(result, out))
