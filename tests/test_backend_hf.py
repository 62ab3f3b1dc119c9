"""The hf backend against naive references on a real tiny model."""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import pytest
import torch
from transformers import NoRepeatNGramLogitsProcessor

from conftest import PREFIX, PROMPTS
from selfalign.backends import GenerationRequest, SamplingParams, ScoreRequest
from selfalign.backends.base import cut_at_stop
from selfalign.backends.hf import HFBackend
from selfalign.tiny import make_tiny_model


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> HFBackend:
    # A wider init than the default makes a random model emit varied tokens, so
    # equality checks below compare real, non-constant outputs.
    path = make_tiny_model(tmp_path_factory.mktemp("m") / "m", seed=3, initializer_range=0.2)
    return HFBackend(path, batch_size=8)


def naive_generate(backend: HFBackend, req: GenerationRequest) -> str:
    ids = backend.head_ids + backend.encode(req.prefix + req.prompt)
    out = backend.model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=req.params.max_new_tokens,
        do_sample=False,
        pad_token_id=backend.pad_id,
    )
    return backend.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


def test_greedy_with_prefix_reuse_equals_plain_generate(backend: HFBackend) -> None:
    params = SamplingParams(max_new_tokens=24)
    reqs = [GenerationRequest(prompt=p, prefix=PREFIX, params=params) for p in PROMPTS]
    ours = [r.text for r in backend.generate(reqs)]
    plain = [naive_generate(backend, r) for r in reqs]
    assert ours == plain
    assert len(set(ours)) > 1, "outputs should differ between prompts"


def test_greedy_without_prefix_equals_plain_generate(backend: HFBackend) -> None:
    reqs = [GenerationRequest(prompt=p, params=SamplingParams(max_new_tokens=16)) for p in PROMPTS]
    assert [r.text for r in backend.generate(reqs)] == [naive_generate(backend, r) for r in reqs]


def test_prefix_is_prefilled_once(backend: HFBackend) -> None:
    backend._prefix_caches.clear()
    prefix = PREFIX + " Unique run marker."
    reqs = [
        GenerationRequest(prompt=p, prefix=prefix, params=SamplingParams(max_new_tokens=2))
        for p in PROMPTS
    ]
    before = backend.stats.prefill_tokens
    backend.generate(reqs)
    backend.generate(reqs)  # a second call reuses the cached prefix too
    shared = len(backend.head_ids + backend.encode(prefix))
    own = sum(len(backend.encode(p)) + 1 for p in PROMPTS)  # +1: the prefix's last token
    assert backend.stats.prefill_tokens - before == (shared - 1) + 2 * own


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_seeded_sampling_independent_of_batch_size(
    backend: HFBackend, temperature: float, top_p: float
) -> None:
    params = SamplingParams(max_new_tokens=20, temperature=temperature, top_p=top_p)
    reqs = [
        GenerationRequest(prompt=p, prefix=PREFIX, params=params, seed=1000 + i)
        for i, p in enumerate(PROMPTS)
    ]
    outputs = {}
    for batch_size in (1, 3, 8):
        backend.batch_size = batch_size
        outputs[batch_size] = [r.text for r in backend.generate(reqs)]
    backend.batch_size = 8
    assert outputs[1] == outputs[3] == outputs[8]
    reseeded = [GenerationRequest(prompt=r.prompt, prefix=r.prefix, params=params, seed=r.seed + 1)
                for r in reqs]  # fmt: skip
    assert [r.text for r in backend.generate(reseeded)] != outputs[8]


@pytest.mark.parametrize("where", [slice(5, 8), slice(-40, -37)], ids=["early", "late"])
def test_stop_strings_cut_and_finish_reason(backend: HFBackend, where: slice) -> None:
    n = 160  # long enough that only a tail of the output is decoded for the stop check
    req = GenerationRequest(prompt=PROMPTS[0], params=SamplingParams(max_new_tokens=n))
    full = backend.generate([req])[0]
    assert full.finish_reason == "length" and full.completion_tokens == n
    # a random model writes partial UTF-8 (shown as U+FFFD), which no stop string can
    # match: take the first clean 3-character window from the chosen place on
    start = range(len(full.text))[where].start
    while "\ufffd" in full.text[start : start + 3]:
        start += 1
    stop = full.text[start : start + 3]
    params = SamplingParams(max_new_tokens=n, stop=("never appears", stop))
    cut = backend.generate([GenerationRequest(prompt=PROMPTS[0], params=params)])[0]
    assert cut.finish_reason == "stop" and cut.completion_tokens < n
    assert cut.text == full.text[: full.text.find(stop)]


def test_logit_bias_bans_first_token(backend: HFBackend) -> None:
    """A text's bias lands on its first token: banning the token greedy decoding picks
    first gives the text that greedy decoding by hand, that token masked, gives."""
    prompt_ids = backend.head_ids + backend.encode(PROMPTS[2])

    def greedy(banned: int | None) -> list[int]:
        generated: list[int] = []
        with torch.no_grad():
            for _ in range(6):
                logits = backend.model(torch.tensor([prompt_ids + generated])).logits[0, -1]
                if banned is not None:
                    logits[banned] = float("-inf")
                token = int(logits.argmax())
                if token in backend.eos_ids:
                    break
                generated.append(token)
        return generated

    first_id = greedy(None)[0]
    banned = backend.tokenizer.decode([first_id])
    assert backend.encode(banned) == [first_id]  # the text's first token is that token
    req = GenerationRequest(prompt=PROMPTS[2], params=SamplingParams(max_new_tokens=6))
    assert backend.generate([req])[0].text == backend.tokenizer.decode(greedy(None))
    params = SamplingParams(max_new_tokens=6, logit_bias={banned: -1e9})
    biased = backend.generate([GenerationRequest(prompt=PROMPTS[2], params=params)])[0].text
    want = greedy(first_id)
    assert first_id not in want and biased == backend.tokenizer.decode(want)


def naive_score(backend: HFBackend, req: ScoreRequest) -> float:
    ctx, cont = backend.encode_pair(req.context, req.continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(backend.model(ids).logits.float(), -1)[0]
    return sum(float(logprobs[len(ctx) - 1 + j, tok]) for j, tok in enumerate(cont))


def test_score_equals_one_sequence_at_a_time(backend: HFBackend) -> None:
    reqs = [
        ScoreRequest("Q: What is the capital of France?\nA:", " Paris."),
        ScoreRequest("Q: What is the capital of France?\nA:", " It is Lyon, I think."),
        ScoreRequest("Q: What is the capital of France?\nA:", " Marseille"),
        ScoreRequest("The weather today is ", "sunny"),  # trailing space moves over
        ScoreRequest("", "An empty context scores from BOS."),
        ScoreRequest(PREFIX, " yes"),
    ]
    backend.batch_size = 2  # several chunks for the shared context
    ours = backend.score(reqs)
    backend.batch_size = 8
    for req, value in zip(reqs, ours, strict=True):
        assert value == pytest.approx(naive_score(backend, req), abs=1e-4)


def test_score_runs_each_context_once(backend: HFBackend) -> None:
    context = "Q: Which planet is largest?\nA:"
    reqs = [ScoreRequest(context, c) for c in (" Jupiter", " Saturn", " Earth", " Mars")]
    before = backend.stats.prefill_tokens
    backend.score(reqs)
    ctx, _ = backend.encode_pair(context, " Jupiter")
    conts = sum(len(backend.encode_pair(context, r.continuation)[1]) for r in reqs)
    # the context minus its last token once, then (last token + continuation) per choice
    assert backend.stats.prefill_tokens - before == (len(ctx) - 1) + len(reqs) + conts


# -- n-gram rules (generated tokens only; the rule itself in test_ngram_rules.py) ----------
PENALTIES = ((3, 1.0), (4, 2.0))  # the stage-4 default, after the reference implementation


@pytest.fixture(scope="module")
def looping(tiny_model: Path) -> HFBackend:
    """The tiny model at its default init: greedy text loops on a few tokens, which is
    what n-gram rules exist for."""
    return HFBackend(tiny_model, batch_size=8)


def reference_greedy(
    backend: HFBackend, req: GenerationRequest, *, no_repeat: int = 0, penalties=()
) -> list[int]:
    """Generated ids: one full forward pass per token, the rules recomputed from scratch
    over the generated tokens: transformers' no-repeat processor, and a brute-force count
    of each n-gram a candidate token would complete."""
    ids = backend.head_ids + backend.encode(req.prefix + req.prompt)
    gen: list[int] = []
    for _ in range(req.params.max_new_tokens):
        with torch.no_grad():
            inp = torch.tensor([ids + gen], device=backend.device)
            logits = backend.model(inp).logits[0, -1].float().cpu()
        for n, p in penalties:
            grams = [tuple(gen[i : i + n]) for i in range(len(gen) - n + 1)]
            context = tuple(gen[len(gen) - n + 1 :]) if n > 1 else ()
            for gram in set(grams):
                if gram[:-1] == context:
                    logits[gram[-1]] -= p * grams.count(gram)
        if no_repeat and gen:
            logits = NoRepeatNGramLogitsProcessor(no_repeat)(torch.tensor([gen]), logits[None])[0]
        token = int(logits.argmax())
        if token in backend.eos_ids:
            break
        gen.append(token)
    return gen


def _quotes(answer: list[int], prompt: list[int], n: int) -> bool:
    spans = {tuple(prompt[i : i + n]) for i in range(len(prompt) - n + 1)}
    return any(tuple(answer[i : i + n]) in spans for i in range(len(answer) - n + 1))


def test_no_repeat_ngram_lets_the_answer_quote_its_prompt(looping: HFBackend) -> None:
    """Counting only generated tokens, an answer may repeat 6+ tokens of the prompt (an
    edit, an extraction, a translation keeping names). The prompt here holds one stretch
    of the model's own loop, so its greedy answer continues the loop: a quote."""
    quoted = []
    for question in (
        "Fix the typo: The quick brown fox jumpd over the lazy dog.",
        "Translate to French, keeping the names: Anna and Tomasz met in Gdansk.",
        "Extract the dates from: The meeting moved from 3 May to 17 June 2025.",
    ):
        first = GenerationRequest(prompt=question, params=SamplingParams(max_new_tokens=32))
        prompt = question + looping.generate([first])[0].text
        params = SamplingParams(max_new_tokens=16, no_repeat_ngram_size=6)
        req = GenerationRequest(prompt=prompt, params=params)
        got = looping.generate([req])[0].text
        want = reference_greedy(looping, req, no_repeat=6)
        assert got == looping.tokenizer.decode(want, skip_special_tokens=True)
        quoted.append(_quotes(want, looping.encode(prompt), 6))
    # which loop a random model falls into depends on its tokenizer (trained on the
    # shipped files); at least one of these answers goes on quoting its prompt
    assert any(quoted), "an answer should quote its prompt"


def test_ngram_penalty_greedy_equals_reference(looping: HFBackend) -> None:
    """A batch (rows leave at a stop string at different steps) under the stage-4 default
    penalties, against the one-sequence reference; the penalties change the loops."""
    params = SamplingParams(max_new_tokens=24, ngram_penalties=PENALTIES)
    reqs = [GenerationRequest(prompt=p, prefix=PREFIX, params=params) for p in PROMPTS]
    want = [
        looping.tokenizer.decode(reference_greedy(looping, r, penalties=PENALTIES)) for r in reqs
    ]
    assert not any("`" in w for w in want), "no code fence: the reference ignores fences"
    assert [r.text for r in looping.generate(reqs)] == want
    plain = [GenerationRequest(prompt=p, prefix=PREFIX, params=SamplingParams(max_new_tokens=24))
             for p in PROMPTS]  # fmt: skip
    assert [r.text for r in looping.generate(plain)] != want, "the penalty should bite"
    stop = want[0][len(want[0]) // 2 :][:4]  # ends row 0 halfway, others wherever it occurs
    stopped = [GenerationRequest(prompt=p, prefix=PREFIX, params=SamplingParams(
        max_new_tokens=24, ngram_penalties=PENALTIES, stop=(stop,))) for p in PROMPTS]  # fmt: skip
    got = looping.generate(stopped)
    assert [r.text for r in got] == [cut_at_stop(w, (stop,)) for w in want]
    assert got[0].finish_reason == "stop"


@pytest.fixture(scope="module")
def sentencepiece_backend(tmp_path_factory: pytest.TempPathFactory) -> HFBackend:
    """A Llama-2-style tokenizer: SentencePiece's metaspace with a word-boundary marker
    put before every text, so "### User:" alone starts with "▁###" but not after "\n\n"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from selfalign.tiny import shipped_text_files, tiny_config

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=1500, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator([f.read_text("utf-8") for f in shipped_text_files()], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<unk>")  # fmt: skip
    out = tmp_path_factory.mktemp("sp") / "m"
    torch.manual_seed(5)
    LlamaForCausalLM(tiny_config(fast, initializer_range=0.2)).save_pretrained(out)
    fast.save_pretrained(out)
    return HFBackend(out, batch_size=4)


def test_sentencepiece_prompt_is_tokenized_as_the_model_would_read_it(
    sentencepiece_backend: HFBackend,
) -> None:
    backend = sentencepiece_backend
    apart = backend.encode(PREFIX) + backend.encode(PROMPTS[0])
    joined = backend.encode(PREFIX + PROMPTS[0])
    assert apart != joined  # the marker the separate prompt starts with
    reqs = [GenerationRequest(prompt=p, prefix=PREFIX, params=SamplingParams(max_new_tokens=12))
            for p in PROMPTS[:3]]  # fmt: skip
    for req in reqs:
        shared, own = backend.request_ids(req)
        assert shared + own == backend.head_ids + backend.encode(req.prefix + req.prompt)
        assert len(shared) >= len(backend.encode(PREFIX)) - 1  # the prefix is still cached
    for req, result in zip(reqs, backend.generate(reqs), strict=True):
        assert result.text == naive_generate(backend, req)


# -- on model.generate: what its defaults must not change ------------------------------------
def results(backend: HFBackend, reqs: list[GenerationRequest]) -> list[tuple[str, str, int]]:
    return [(r.text, r.finish_reason, r.completion_tokens) for r in backend.generate(reqs)]


def test_no_deprecated_cache_argument(backend: HFBackend) -> None:
    """transformers 5 names the model's KV-cache argument ``cache``; the old
    ``past_key_values`` warns (FutureWarning) on every forward pass."""
    backend._prefix_caches.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend.generate([GenerationRequest(prompt=PROMPTS[0], prefix=PREFIX,
                                            params=SamplingParams(max_new_tokens=3))])  # fmt: skip
        backend.score([ScoreRequest(PREFIX, " yes")])
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_the_model_generation_config_changes_nothing(
    backend: HFBackend, caplog: pytest.LogCaptureFixture
) -> None:
    """``generate`` fills options left unset from the model's ``generation_config``; a
    checkpoint may ship sampling, a repetition penalty (Qwen) or a max_length (Llama 2)
    there. Only the request's ``SamplingParams`` count, and nothing warns."""
    reqs = [GenerationRequest(prompt=p, prefix=PREFIX, params=SamplingParams(max_new_tokens=12))
            for p in PROMPTS[:4]]  # fmt: skip
    want = results(backend, reqs)
    first = backend.encode(want[0][0])[0]
    config = backend.model.generation_config
    saved = copy.deepcopy(config)
    config.update(do_sample=True, temperature=9.0, top_k=2, repetition_penalty=3.0,
                  no_repeat_ngram_size=1, min_new_tokens=40, max_length=5,
                  suppress_tokens=[first])  # fmt: skip
    try:
        with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = results(backend, reqs)
    finally:
        backend.model.generation_config = saved
    assert got == want
    assert not [r for r in caplog.records if r.name.startswith("transformers")]
    assert not caught, [str(w.message) for w in caught]


def test_a_stop_string_begun_in_the_prompt_does_not_stop(backend: HFBackend) -> None:
    """Stop strings are looked for in the generated text only (as ``cut_at_stop`` cuts it),
    never across the prompt's end."""
    prompt = PROMPTS[2]  # its greedy answer starts with plain ASCII letters
    full = results(backend, [GenerationRequest(prompt, params=SamplingParams(max_new_tokens=24))])
    assert full[0][1:] == ("length", 24)
    stop = prompt[-3:] + full[0][0][:2]  # ends in the first generated token
    assert stop not in full[0][0]
    params = SamplingParams(max_new_tokens=24, stop=(stop,))
    assert results(backend, [GenerationRequest(prompt, params=params)]) == full


def test_rows_ending_at_eos_leave_the_others_as_alone(backend: HFBackend) -> None:
    """Sampling with EOS made likely: rows end at different steps (EOS is not part of the
    text; finish reason "stop"), and each row's result is what it gets alone."""
    params = SamplingParams(max_new_tokens=16, temperature=1.0, logit_bias={"</s>": 6.0},
                            ngram_penalties=((3, 1.0),))  # fmt: skip
    reqs = [GenerationRequest(prompt=p, prefix=PREFIX, params=params, seed=7 + i)
            for i, p in enumerate(PROMPTS)]  # fmt: skip
    batched = results(backend, reqs)
    assert batched == [results(backend, [r])[0] for r in reqs]
    lengths = {n for _, reason, n in batched if reason == "stop"}
    assert len(lengths) > 1 and any(reason == "length" for _, reason, _ in batched)


@pytest.fixture(scope="module")
def sliding_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Gemma 3 (three sliding-window layers of window 32, then a global one) with
    the tiny tokenizer, random weights: the layer pattern of the demo's real model."""
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=32,
        layer_types=["sliding_attention"] * 3 + ["full_attention"], initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("gemma3") / "model"
    Gemma3ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("prefix_tokens", [48, 200])
def test_sliding_window_model_with_prefix_reuse_equals_plain_generate(
    sliding_model: Path, prefix_tokens: int
) -> None:
    """Behind a prefix longer than the window (32), the cached prefix is copied into the
    decoding cache's sliding-window layers (which keep its last window and roll it as
    tokens come) and full layers alike: the text equals plain ``generate``'s."""
    backend = HFBackend(sliding_model, batch_size=4)
    prefix = backend.tokenizer.decode(backend.encode(PREFIX * 4)[:prefix_tokens])
    params = SamplingParams(max_new_tokens=20)
    reqs = [GenerationRequest(prompt=p, prefix=prefix, params=params) for p in PROMPTS[:4]]
    ours = [r.text for r in backend.generate(reqs)]
    assert ours == [naive_generate(backend, r) for r in reqs]
    assert len(set(ours)) > 1
