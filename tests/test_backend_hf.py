"""The hf backend against naive references on a real tiny model."""

from __future__ import annotations

import pytest
import torch

from conftest import PREFIX, PROMPTS
from selfalign.backends import GenerationRequest, SamplingParams, ScoreRequest
from selfalign.backends.hf import HFBackend
from selfalign.tiny import make_tiny_model


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> HFBackend:
    # A wider init than the default makes a random model emit varied tokens, so
    # equality checks below compare real, non-constant outputs.
    path = make_tiny_model(tmp_path_factory.mktemp("m") / "m", seed=3, initializer_range=0.2)
    return HFBackend(path, batch_size=8)


def naive_generate(backend: HFBackend, req: GenerationRequest) -> str:
    ids = backend.head_ids + backend.encode(req.prefix) + backend.encode(req.prompt)
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
    stop = full.text[where]
    params = SamplingParams(max_new_tokens=n, stop=("never appears", stop))
    cut = backend.generate([GenerationRequest(prompt=PROMPTS[0], params=params)])[0]
    assert cut.finish_reason == "stop" and cut.completion_tokens < n
    assert cut.text == full.text[: full.text.find(stop)]


def test_logit_bias_bans_first_token(backend: HFBackend) -> None:
    req = GenerationRequest(prompt=PROMPTS[2], params=SamplingParams(max_new_tokens=6))
    first = backend.generate([req])[0].text
    banned = backend.tokenizer.decode(backend.encode(first)[:1])
    params = SamplingParams(max_new_tokens=6, logit_bias={banned: -1e9})
    biased = backend.generate([GenerationRequest(prompt=PROMPTS[2], params=params)])[0].text
    assert banned not in biased


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
