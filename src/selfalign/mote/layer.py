"""The MoTE linear layer: peft LoRA experts with hard per-token routing.

peft's own ``lora.Linear`` sums every active adapter over every token; MoTE needs each
token to use one step expert plus the shared expert::

    y = W0 x + alpha * E_step(x) + (1 - alpha) * E_shared(x)

``MoteLinear`` subclasses ``lora.Linear`` (so peft still creates, initialises, places and
names the LoRA weights, one adapter per expert) and replaces only ``forward``. Tokens are
gathered per expert, so an expert's ``lora_A`` sees exactly the tokens routed to it.
All layers read the routing of the current forward pass from one shared ``Router``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft.tuners.lora import Linear as LoraLinear

from selfalign.mote.config import SHARED
from selfalign.text.steps import QUESTION, STEPS

NO_STEP_EXPERT = -1  # route value for "shared expert only"


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
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    def route(self, expert_ids: torch.Tensor) -> None:
        """Set the routing; token indices are found once here, not in every layer."""
        flat = expert_ids.reshape(-1)
        self.expert_ids = expert_ids
        self.rows = [(flat == i).nonzero().squeeze(-1) for i in range(len(STEPS))]

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
