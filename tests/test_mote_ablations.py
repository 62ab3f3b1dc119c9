"""Table 4's ablation rows that MoTE's own routing cannot express: the token-level gated
mixtures of the same LoRA experts (Vanilla MoE, MixLoRA), "-both", and the expanded
baseline decoded the way it was trained. On the tiny Llama, real transformers/peft code."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from selfalign.cli import main
from selfalign.mote import (
    STEPS,
    MoteLinear,
    MoteTrainConfig,
    generate_steps,
    load_mote,
    mote_state,
    train_mote,
)
from selfalign.mote.data import StepCollator, prompt_ids
from selfalign.mote.layer import CONTRASTIVE_TEMPERATURE
from test_mote import CHAINS, fresh_mote, packed, randomize_experts

COMMON = dict(max_steps=2, batch_size=2, learning_rate=1e-2, warmup=0, progress=False,
              device="cpu", logging_steps=1)  # fmt: skip


def gated(tiny_model: Path, **config):
    model, tokenizer = fresh_mote(tiny_model, routing="gate", shared_expert=False, **config)
    randomize_experts(model)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoteLinear):
                m.lora_gate.weight.copy_(torch.randn(m.lora_gate.weight.shape, generator=gen))
    return model, tokenizer


def lora(layer: MoteLinear, name: str, v: torch.Tensor) -> torch.Tensor:
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    return v @ a.T @ b.T * layer.scaling[name]


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_gate_mixes_each_tokens_top_k_experts_by_their_renormalised_weights(
    tiny_model: Path, top_k: int
) -> None:
    model, _ = gated(tiny_model, top_k=top_k)
    layer = model.model.layers[1].mlp.up_proj
    x = torch.randn(2, 6, layer.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = layer(x)
    w0 = layer.get_base_layer().weight
    picked = set()
    for v, out in zip(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), strict=True):
        probs = (v @ layer.lora_gate.weight.T).softmax(-1)
        order = probs.argsort(descending=True)[:top_k].tolist()
        picked.add(tuple(order))
        total = probs[order].sum()
        want = v @ w0.T + sum(probs[e] / total * lora(layer, STEPS[e], v) for e in order)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    assert top_k == 3 or len(picked) > 1  # the gate routes tokens differently


def test_balance_loss_is_one_when_balanced_and_higher_when_one_expert_takes_all(
    tiny_model: Path,
) -> None:
    model, _ = gated(tiny_model, top_k=1)
    router = mote_state(model).router
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(64, layer.in_features, generator=torch.Generator().manual_seed(2)).abs()
    with torch.no_grad():
        layer.lora_gate.weight.zero_()  # uniform gate probabilities
    layer(x)
    assert router.take_aux()["balance"].item() == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        layer.lora_gate.weight.zero_()
        layer.lora_gate.weight[0] = x.mean(0) * 50  # expert 0 wins every token, surely
    layer(x)
    assert router.take_aux()["balance"].item() > 2.5  # 3 x (share 1 x probability ~1)


def test_aux_losses_leave_padding_out(tiny_model: Path) -> None:
    """Whatever the padding tokens are, the balance and contrastive losses of a padded
    batch are the same: only real tokens count, both for a batch as training collates it
    (4D mask, ``token_mask``) and for a plain 2D attention mask."""
    model, tokenizer = gated(tiny_model, contrastive_weight=0.1)
    router = mote_state(model).router
    examples = [packed(tokenizer, model, c) for c in CHAINS]
    assert len({len(e["input_ids"]) for e in examples}) > 1  # the batch is padded
    ids = torch.tensor([[5, 9, 13, 17, 21, 25], [6, 10, 14, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    for batch_of in (
        lambda pad: StepCollator(pad, with_step_ids=False, with_token_mask=True)(examples),
        lambda pad: {"input_ids": torch.where(mask > 0, ids, pad), "attention_mask": mask},
    ):
        losses = []
        for pad in (0, 40):
            model(**{k: v for k, v in batch_of(pad).items() if k != "labels"})
            losses.append({k: v.item() for k, v in router.take_aux().items()})
        assert set(losses[0]) == {"balance", "contrastive"}
        assert losses[0] == pytest.approx(losses[1], abs=1e-6)


def test_contrastive_loss_is_low_when_experts_see_tokens_apart(tiny_model: Path) -> None:
    """The supervised contrastive loss over the experts' lora_A views: identical experts
    score high, experts whose views fill disjoint rank coordinates much lower."""
    model, _ = gated(tiny_model, contrastive_weight=0.1)
    router = mote_state(model).router
    layer = model.model.layers[0].mlp.gate_proj
    x = torch.randn(32, layer.in_features, generator=torch.Generator().manual_seed(3)).abs()
    a = torch.randn_like(layer.lora_A[STEPS[0]].weight).abs()
    with torch.no_grad():
        for name in STEPS:
            layer.lora_A[name].weight.copy_(a)
    layer(x)
    same = router.take_aux()["contrastive"].item()
    # an anchor's own token seen by the other experts is as close as can be: far above
    # the loss of a perfect separation, log((n - 1) / (n - 1)) = 0 at best
    assert same > math.log(len(STEPS))
    block = a.shape[0] // len(STEPS)  # each expert writes its own rank coordinates
    with torch.no_grad():
        for e, name in enumerate(STEPS):
            w = torch.zeros_like(a)
            w[e * block : (e + 1) * block] = a[e * block : (e + 1) * block]
            layer.lora_A[name].weight.copy_(w)
    layer(x)
    apart = router.take_aux()["contrastive"].item()
    assert apart < same - 1.0
    assert CONTRASTIVE_TEMPERATURE == 0.1


@pytest.mark.parametrize("method", ["vanilla_moe", "mixlora"])
def test_gated_methods_train_reload_and_decode(
    tiny_model: Path, tmp_path: Path, method: str, capsys
) -> None:
    config = MoteTrainConfig(method=method, **COMMON)
    resolved = config.resolved_mote()
    assert resolved.routing == "gate" and not resolved.shared_expert and config.skip_prob == 0
    assert resolved.contrastive_weight == (0.1 if method == "mixlora" else 0.0)
    result = train_mote(CHAINS, tiny_model, tmp_path / method, config)
    assert 0.9 < result.metrics["last_balance_loss"] < 3.0
    assert ("last_contrastive_loss" in result.metrics) == (method == "mixlora")
    model, tokenizer = load_mote(result.path)
    layer = model.model.layers[0].self_attn.q_proj
    assert set(layer.lora_A) == set(STEPS) and layer.lora_gate.weight.shape[0] == len(STEPS)
    assert layer.lora_gate.weight.abs().sum() > 0
    ids = torch.tensor([prompt_ids(tokenizer, CHAINS[0]["question"])])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        again, _ = load_mote(result.path)
        torch.testing.assert_close(again(input_ids=ids).logits, before)
    out = generate_steps(model, tokenizer, [CHAINS[1]["question"]], mode="full",
                         max_new_tokens=12, max_step_tokens=3)[0]  # fmt: skip
    assert out.steps == list(STEPS)
    capsys.readouterr()
    assert main(["mote-export", str(result.path), str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err
    assert "gated ablation model" in err and len(err.strip().splitlines()) == 1


def test_no_both_has_neither_shared_expert_nor_skipping() -> None:
    config = MoteTrainConfig(method="mote_no_both")
    assert not config.resolved_mote().shared_expert and config.skip_prob == 0.0
    assert MoteTrainConfig(method="mote").resolved_mote().shared_expert
    assert MoteTrainConfig(method="expanded").resolved_mote().recompute_at_switch
    assert not MoteTrainConfig(method="mote").resolved_mote().recompute_at_switch


@pytest.mark.parametrize("mode", ["full", "adaptive"])
def test_expanded_decoding_recomputes_the_context_with_each_steps_expert(
    tiny_model: Path, mode: str
) -> None:
    """Each generated token's logits = one forward over question + everything before it
    with every token routed to the step then being written (the question's routing before
    the first start token): how the expanded baseline's examples were trained."""
    model, tokenizer = fresh_mote(tiny_model, recompute_at_switch=True)
    randomize_experts(model)
    model.eval()
    question = CHAINS[0]["question"]
    out = generate_steps(model, tokenizer, [question], mode=mode, max_new_tokens=14,
                         max_step_tokens=3, return_logits=True)[0]  # fmt: skip
    assert out.logits is not None and len(out.logits) == len(out.token_ids)
    if mode == "full":
        assert out.steps == list(STEPS)
    tokens = mote_state(model).tokens
    prompt = prompt_ids(tokenizer, question)
    step, switched = None, 0
    with torch.no_grad():
        for t, token in enumerate(out.token_ids):
            ids = torch.tensor([prompt + out.token_ids[:t]])
            kwargs = {} if step is None else {"step_ids": torch.full_like(ids, step)}
            want = model(input_ids=ids, **kwargs).logits[0, -1]
            torch.testing.assert_close(out.logits[t], want, rtol=1e-4, atol=1e-4)
            if tokens.step_of_start(token) is not None:
                step, switched = tokens.step_of_start(token), switched + 1
    assert switched == len(out.steps) >= 1
    # the shared cache (MoTE's decoding) gives other logits after the first switch
    mote_state(model).config.recompute_at_switch = False
    cached = generate_steps(model, tokenizer, [question], mode=mode, max_new_tokens=14,
                            max_step_tokens=3, return_logits=True)[0]  # fmt: skip
    n = min(len(cached.token_ids), len(out.token_ids))
    assert not torch.allclose(cached.logits[:n], out.logits[:n], atol=1e-4)


def test_expanded_reply_streams_phase_by_phase(tiny_model: Path) -> None:
    from selfalign.mote.chat import mote_reply, mote_reply_stream

    model, tokenizer = fresh_mote(tiny_model, recompute_at_switch=True)
    randomize_experts(model)
    model.eval()
    history = [{"role": "user", "content": CHAINS[3]["question"]}]
    settings = dict(show_steps=True, mode="full", max_new_tokens=30)
    want = mote_reply(model, tokenizer, history, **settings)
    assert "".join(mote_reply_stream(model, tokenizer, history, **settings)) == want
    assert "[analysis]" in want
