"""The MoTE linear layer: peft LoRA experts with hard per-token routing.

peft's own ``lora.Linear`` sums every active adapter over every token; MoTE needs each
token to use one step expert plus the shared expert::

    y = W0 x + alpha * E_step(x) + (1 - alpha) * E_shared(x)

``MoteLinear`` subclasses ``lora.Linear`` (so peft still creates, initialises, places and
names the LoRA weights, one adapter per expert) and replaces only ``forward``. Tokens are
gathered per expert, so an expert's ``lora_A`` sees exactly the tokens routed to it.
All layers read the routing of the current forward pass from one shared ``Router``.

The gated ablation rows (Vanilla MoE, MixLoRA) route instead with a learned linear gate
per layer (``lora_gate``, trained with the experts): each token goes to its ``top_k``
step experts, weighted by the gate's renormalised softmax. Each layer then leaves its
auxiliary losses on the router for the trainer: Switch Transformer's load balancing
(experts x sum of token share x mean gate probability; 1 when balanced), and with a
contrastive weight an expert-contrastive term in the spirit of MoELoRA/MixLoRA: the
experts' rank-space views (``lora_A``) of a few tokens, contrasted so that each expert's
views of different tokens lie closer than other experts' views (supervised contrastive
loss, the expert as the label). It acts on ``lora_A`` because ``lora_B`` starts at zero,
where the experts' outputs are all zero and cannot be contrasted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear

from selfalign.mote.config import SHARED
from selfalign.text.steps import QUESTION, STEPS

NO_STEP_EXPERT = -1  # route value for "shared expert only"
CONTRASTIVE_TOKENS = 32  # tokens per layer and forward whose expert views are contrasted
CONTRASTIVE_TEMPERATURE = 0.1


@dataclass
class Router:
    """Routing state shared by every MoTE layer of one model.

    ``expert_ids`` (batch, seq) holds, for the forward pass in progress, the index in
    ``STEPS`` of each token's step expert (or ``NO_STEP_EXPERT``). It stays set until the
    next forward so activation-checkpointing recomputation sees the same routing.
    """

    alpha: float = 0.5
    shared: bool = True
    question_expert: int = STEPS.index("answer")  # eval-time route for question tokens
    seed: int = 0
    expert_ids: torch.Tensor | None = None
    rows: list[torch.Tensor] = field(default_factory=list)  # flat token indices per expert
    last_step: torch.Tensor | None = None  # step of each row's last token (for decoding)
    force_step: int | None = None  # set: a prefill routes every token to this step
    gate_top_k: int | None = None  # set: a learned gate routes (the gated ablation rows)
    contrastive: bool = False  # gated layers also leave the expert-contrastive loss
    token_mask: torch.Tensor | None = None  # gated: flat mask of real (not padding) tokens
    aux_losses: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    def route(self, expert_ids: torch.Tensor) -> None:
        """Set the routing; token indices are found once here, not in every layer."""
        flat = expert_ids.reshape(-1)
        self.expert_ids = expert_ids
        self.rows = [(flat == i).nonzero().squeeze(-1) for i in range(len(STEPS))]

    def add_aux(self, name: str, value: torch.Tensor) -> None:
        self.aux_losses.setdefault(name, []).append(value)

    def take_aux(self) -> dict[str, torch.Tensor]:
        """The mean of each auxiliary loss over the layers of the last forward pass."""
        out = {k: torch.stack(v).mean() for k, v in self.aux_losses.items() if v}
        self.aux_losses = {}
        return out

    @property
    def step_weight(self) -> float:
        """Weight of the step expert: alpha with a shared expert, 1 without one."""
        return self.alpha if self.shared else 1.0

    def assign(
        self,
        step_ids: torch.Tensor,
        *,
        training: bool,
        question_expert: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Step ids -> expert indices. Question tokens of each sequence go to
        ``question_expert[row]`` when given (the training collator draws it), else to a
        random expert in training (seeded), else to the configured expert."""
        experts = step_ids - 1
        if question_expert is not None:
            question = question_expert.to(step_ids.device).reshape(-1, 1).expand_as(step_ids)
        elif training:
            choice = torch.randint(len(STEPS), (step_ids.shape[0], 1), generator=self.generator)
            question = choice.to(step_ids.device).expand_as(step_ids)
        else:
            question = torch.full_like(step_ids, self.question_expert)
        return torch.where(step_ids == QUESTION, question, experts)


class MoteLinear(LoraLinear):
    """LoRA linear layer whose adapters are MoTE experts (``STEPS`` + ``SHARED``)."""

    router: Router | None = None

    def _expert(self, name: str, x: torch.Tensor) -> torch.Tensor:
        lora_a = self.lora_A[name]
        x = self._cast_input_dtype(x, lora_a.weight.dtype)
        return self.lora_B[name](lora_a(self.lora_dropout[name](x))) * self.scaling[name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        if self.merged:
            raise RuntimeError("MoTE layers cannot be merged in place; use export_merged_step")
        router = self.router
        if router is not None and router.gate_top_k is not None:
            delta = self._gated(x.reshape(-1, x.shape[-1]), router)
            return result + delta.reshape(result.shape).to(result.dtype)
        routes = None if router is None else router.expert_ids
        if routes is None or routes.shape != x.shape[:-1]:
            raise RuntimeError(
                "MoTE layer called without routing for this input; call the model with "
                "input_ids (step ids are derived from the delimiters) or step_ids="
            )
        flat_x = x.reshape(-1, x.shape[-1])
        delta = torch.zeros(
            flat_x.shape[0],
            result.shape[-1],
            device=x.device,
            dtype=self.lora_B[STEPS[0]].weight.dtype,
        )
        for name, rows in zip(STEPS, router.rows, strict=True):
            # With grad on, run empty experts too: their weights stay in the graph (DDP).
            if rows.numel() == 0 and not torch.is_grad_enabled():
                continue
            out = self._expert(name, flat_x.index_select(0, rows))
            # under bf16 autocast (the Trainer's bf16) the expert's output is bf16
            delta = delta.index_add(0, rows, out.to(delta.dtype), alpha=router.step_weight)
        if router.shared:
            delta = delta + (1.0 - router.alpha) * self._expert(SHARED, flat_x)
        return result + delta.reshape(result.shape).to(result.dtype)

    def _gated(self, flat_x: torch.Tensor, router: Router) -> torch.Tensor:
        """Top-k gated mixture of the step experts (see the module docstring)."""
        gate = self.lora_gate
        probs = gate(self._cast_input_dtype(flat_x, gate.weight.dtype)).float().softmax(-1)
        top_p, top_i = probs.topk(router.gate_top_k, -1)
        top_p = top_p / top_p.sum(-1, keepdim=True)
        delta = torch.zeros(flat_x.shape[0], self.out_features, device=flat_x.device,
                            dtype=self.lora_B[STEPS[0]].weight.dtype)  # fmt: skip
        for e, name in enumerate(STEPS):
            chosen = top_i == e
            rows = chosen.any(-1).nonzero().squeeze(-1)
            if rows.numel() == 0 and not torch.is_grad_enabled():
                continue
            weight = (top_p * chosen).sum(-1).index_select(0, rows).unsqueeze(-1)
            out = self._expert(name, flat_x.index_select(0, rows))
            delta = delta.index_add(0, rows, (out * weight).to(delta.dtype))
        if torch.is_grad_enabled():  # the aux losses, over real tokens (padding left out)
            keep = router.token_mask
            if keep is not None and keep.numel() == flat_x.shape[0]:
                probs, top_i, flat_x = probs[keep], top_i[keep], flat_x[keep]
            share = F.one_hot(top_i, len(STEPS)).float().sum(1).mean(0) / router.gate_top_k
            router.add_aux("balance", len(STEPS) * (share * probs.mean(0)).sum())
            if router.contrastive:
                router.add_aux("contrastive", self._contrastive(flat_x))
        return delta

    def _contrastive(self, flat_x: torch.Tensor) -> torch.Tensor:
        """Supervised contrastive loss over every expert's ``lora_A`` view of a few tokens
        (evenly spaced), the expert as the label."""
        n = flat_x.shape[0]
        picks = torch.linspace(0, n - 1, min(n, CONTRASTIVE_TOKENS), device=flat_x.device).long()
        x = flat_x.index_select(0, picks)
        views = []
        for name in STEPS:
            lora_a = self.lora_A[name]
            view = lora_a(self._cast_input_dtype(x, lora_a.weight.dtype)).float()
            views.append(F.normalize(view, dim=-1))
        views = torch.cat(views)
        labels = torch.arange(len(STEPS), device=x.device).repeat_interleave(len(picks))
        sim = views @ views.T / CONTRASTIVE_TEMPERATURE
        self_mask = torch.eye(len(views), dtype=torch.bool, device=x.device)
        sim = sim.masked_fill(self_mask, -torch.inf)
        positive = (labels[:, None] == labels[None, :]) & ~self_mask
        log_prob = sim - sim.logsumexp(-1, keepdim=True)
        return -(log_prob.masked_fill(~positive, 0).sum(-1) / positive.sum(-1).clamp(min=1)).mean()

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise RuntimeError("MoTE layers cannot be merged in place; use export_merged_step")

    def step_delta_weight(self, step: str) -> torch.Tensor:
        """Weight update that makes W0 + delta behave like this layer for tokens of ``step``."""
        router = self.router
        assert router is not None
        delta = router.step_weight * self.get_delta_weight(step)
        if router.shared:
            delta = delta + (1.0 - router.alpha) * self.get_delta_weight(SHARED)
        return delta
