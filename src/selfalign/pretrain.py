"""Brief pre-training of the demo's tiny model on text the package ships.

A random-weight model writes noise that every filter of the pipeline rejects, so the demo
would test nothing. A minute of causal-LM training on our own corpus
(``assets/pretrain_corpus.txt``: conversations in our chat format, numbered instruction
lists, topic lists, short answers) plus every text file under ``annotations/`` (read at call
time, so the formats other stages ship are learned too) gives a model that writes those
formats: an honest stand-in for a base model, small enough for CPU.

Documents in text files are separated by lines of ``====``. A document with
``### User:`` / ``### Assistant:`` turns is rendered through the tokenizer's chat template,
exactly as training and prompting render conversations; other text is used as written.
"""

from __future__ import annotations

import json
import random
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

from selfalign.chat_format import ASSISTANT_TAG, TURN_SEP, USER_TAG
from selfalign.tiny import PACKAGE_DIR, make_tiny_model

CORPUS = PACKAGE_DIR / "assets" / "pretrain_corpus.txt"
ANNOTATIONS = PACKAGE_DIR / "annotations"
TEXT_SUFFIXES = {".txt", ".md", ".jsonl", ".json", ".yaml", ".yml"}
PRETRAIN_LOG = "pretrain_log.json"
_SEPARATOR = re.compile(r"^====\s*$", re.MULTILINE)
_TURN = re.compile(rf"^({re.escape(USER_TAG)}|{re.escape(ASSISTANT_TAG)})[ \t]*\n", re.MULTILINE)


@dataclass
class PretrainResult:
    model_dir: Path
    steps: int
    documents: int
    tokens_per_step: int
    first_loss: float
    final_loss: float
    runtime_s: float
    history: list[dict] = field(default_factory=list)


def _strings(value: object) -> list[str]:
    """Every non-blank string inside a parsed JSON/YAML value, in order."""
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def file_documents(path: Path) -> list[str]:
    """Documents in one shipped file; structured files contribute their text values."""
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
            return ["\n".join(_strings(r)) for r in records]
        if path.suffix == ".json":
            return ["\n".join(_strings(json.loads(text)))]
        if path.suffix in {".yaml", ".yml"}:
            return ["\n".join(_strings(yaml.safe_load(text)))]
    except (json.JSONDecodeError, yaml.YAMLError):
        pass  # not parseable: learn it as written
    return [doc.strip() for doc in _SEPARATOR.split(text) if doc.strip()]


def corpus_documents() -> list[str]:
    """Our corpus plus whatever text files exist under ``annotations/`` right now."""
    files = [CORPUS] if CORPUS.is_file() else []
    if ANNOTATIONS.is_dir():
        files += [p for p in sorted(ANNOTATIONS.rglob("*")) if p.suffix in TEXT_SUFFIXES]
    return [doc for f in files for doc in file_documents(f) if doc.strip()]


def stage_format_documents(docs: list[str]) -> list[str]:
    """Each corpus conversation's first exchange as stage 2 would see it: the whole
    in-context prompt (principles, exemplars), the user turn, then a templated internal-
    thoughts turn and the corpus answer.

    A synthetic stand-in for what a real base model brings: enough familiarity with the
    format, and with a 1.5k-token context, for the tiny model to write parseable thoughts
    for new queries instead of replaying the five exemplars. Used for the demo model only.
    """
    from selfalign.annotations.principles import load_annotations
    from selfalign.stages.aligned import AlignedConfig
    from selfalign.text.thoughts import StagePrompt, citation, render_thoughts

    defaults = AlignedConfig()
    annotations = load_annotations()
    prompt = StagePrompt(annotations, defaults.generation_name, defaults.knowledge_cutoff)
    prefix = prompt.prefix()
    out = []
    for i, doc in enumerate(docs):
        messages = parse_conversation(doc) or []
        turns = [m for m in messages if m["role"] != "system"]
        if len(turns) < 2 or turns[0]["role"] != "user" or turns[1]["role"] != "assistant":
            continue
        question, answer = turns[0]["content"], turns[1]["content"]
        topic = " ".join(question.split()[:12]).rstrip(".?!")
        rules = sorted({3, 1 + i % len(annotations.principles)})
        thoughts = render_thoughts(
            prompt.self_description, f"The user asks: {topic}.", citation(rules, annotations)
        )
        out.append(
            f"{prefix}{prompt.query_prompt(question)}{thoughts}{TURN_SEP}{ASSISTANT_TAG}\n{answer}"
        )
    return out


def parse_conversation(doc: str) -> list[dict[str, str]] | None:
    """Messages of a document written in our chat format, or None for other text."""
    parts = _TURN.split(doc)
    if len(parts) < 3:
        return None
    system = parts[0].strip()
    messages = [{"role": "system", "content": system}] if system else []
    for tag, content in zip(parts[1::2], parts[2::2], strict=True):
        role = "user" if tag == USER_TAG else "assistant"
        messages.append({"role": role, "content": content.strip()})
    return messages


def document_ids(doc: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    messages = parse_conversation(doc)
    if messages is not None:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids if ids[-1] == tokenizer.eos_token_id else [*ids, tokenizer.eos_token_id]
    return [*tokenizer(doc)["input_ids"], tokenizer.eos_token_id]


def token_blocks(
    docs: list[list[int]], n_blocks: int, block_size: int, seed: int
) -> list[list[int]]:
    """``n_blocks`` blocks of ``block_size`` tokens; each pass over the corpus shuffles it anew."""
    rng = random.Random(seed)
    blocks: list[list[int]] = []
    while len(blocks) < n_blocks:
        order = list(range(len(docs)))
        rng.shuffle(order)
        stream = [t for i in order for t in docs[i]]
        if len(stream) < block_size:
            stream = stream * (block_size // max(len(stream), 1) + 1)
        blocks += [
            stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)
        ]
    return blocks[:n_blocks]


def pretrain_tiny(
    model_dir: str | Path,
    steps: int = 300,
    seed: int = 0,
    *,
    block_size: int = 256,
    batch_size: int = 4,
    learning_rate: float = 6e-3,
    num_threads: int | None = None,
    stage_format: bool = False,
) -> PretrainResult:
    """Pre-train the tiny model in ``model_dir`` in place (built first if the dir is empty).

    The defaults (300 steps of 4 x 256 tokens, ~300k tokens) took about 50 s on one busy
    CPU core; many small steps taught the formats better than fewer, larger ones.
    ``num_threads`` sets torch's CPU threads for this call only: on a shared machine one
    thread was 4x faster than two oversubscribed ones.
    """
    previous_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        return _pretrain(
            Path(model_dir), steps, seed, block_size, batch_size, learning_rate, stage_format
        )
    finally:
        torch.set_num_threads(previous_threads)


def _pretrain(
    model_dir: Path,
    steps: int,
    seed: int,
    block_size: int,
    batch_size: int,
    learning_rate: float,
    stage_format: bool,
) -> PretrainResult:
    started = time.monotonic()
    if not (model_dir / "config.json").is_file():
        make_tiny_model(model_dir, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = corpus_documents()
    docs = [document_ids(d, tokenizer) for d in texts]
    if stage_format:
        eos = tokenizer.eos_token_id
        docs += [[*tokenizer(d)["input_ids"], eos] for d in stage_format_documents(texts)]
    blocks = token_blocks(docs, steps * batch_size, block_size, seed)
    dataset = Dataset.from_dict({"input_ids": blocks, "labels": blocks})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, steps // 10),
            weight_decay=0.01,
            logging_steps=max(1, steps // 20),
            logging_first_step=True,
            save_strategy="no",
            report_to="none",
            seed=seed,
            data_seed=seed,
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=dataset, data_collator=default_data_collator
        )
        trainer.train()
    history = [
        {"step": e["step"], "loss": e["loss"], "learning_rate": e["learning_rate"]}
        for e in trainer.state.log_history
        if "loss" in e
    ]
    model.save_pretrained(model_dir, safe_serialization=True)
    result = PretrainResult(
        model_dir=model_dir,
        steps=steps,
        documents=len(docs),
        tokens_per_step=block_size * batch_size,
        first_loss=history[0]["loss"],
        final_loss=history[-1]["loss"],
        runtime_s=round(time.monotonic() - started, 2),
        history=history,
    )
    (model_dir / PRETRAIN_LOG).write_text(
        json.dumps({**asdict(result), "model_dir": str(model_dir)}, indent=2), encoding="utf-8"
    )
    return result
