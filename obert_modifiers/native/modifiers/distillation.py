"""``!OBertDistillationModifier``: logits, hidden-state and attention distillation."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from obert_modifiers.algorithms import distillation as kd
from obert_modifiers.algorithms import layer_drop as drop
from obert_modifiers.native.modifiers.base import (
    NativeModifier,
    RecipeRunError,
    StepContext,
)
from obert_modifiers.native.recipe import PlannedModifier

if TYPE_CHECKING:
    from obert_modifiers.native.lifecycle import RecipeRunner

_LOGGER = logging.getLogger(__name__)


class Distillation(NativeModifier):
    """``!OBertDistillationModifier``: ``(1 - hardness) * task + hardness * KD`` (+ hidden-state MSE,
    + attention KL) while ``start_epoch <= epoch < end_epoch``; the teacher is frozen, in eval mode,
    never saved. Attention maps come from the models' ``attentions`` outputs: with
    ``attention_weight > 0`` student and teacher compute attention with ``obert_qat`` (eager attention,
    which returns them; ``runner.record_attention``) and are called with ``output_attentions=True``."""

    update_frequency = -1.0

    def __init__(self, planned: PlannedModifier):
        super().__init__(planned)
        self.student_hidden: dict[int, torch.Tensor] = {}
        self.teacher_hidden: dict[int, torch.Tensor] = {}
        self.handles: list = []
        self.hooked: tuple = ()
        self.pairs: list[tuple[int, int]] = []
        self.projections: nn.ModuleDict | None = None
        self.projection_optimizer = None

    def active(self, epoch: float | None) -> bool:
        epoch = 0.0 if epoch is None else epoch
        started = self.start_epoch == -1 or epoch >= self.start_epoch
        return started and not (self.end_epoch != -1 and epoch >= self.end_epoch)

    def bind(self, runner: RecipeRunner) -> None:
        if self.params.attention_weight:
            if runner.record_attention is None:
                raise RecipeRunError(
                    f"!{self.tag}: recipe key 'attention_weight' > 0 needs attention maps: run it through "
                    "RecipeTrainer (it switches the models to attention that returns them)"
                )
            runner.record_attention(runner.model)

    @property
    def wants_attentions(self) -> bool:
        return bool(self.params.attention_weight)

    def loss(
        self,
        runner: RecipeRunner,
        task_loss: torch.Tensor,
        student_outputs: Any,
        teacher_outputs: Any,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        p = self.params
        keys = p.distill_output_keys
        if not keys and isinstance(student_outputs, Mapping):
            keys = [k for k in ("logits", "start_logits", "end_logits") if k in student_outputs] or None
        logits = kd.logit_distillation_loss(student_outputs, teacher_outputs, p.temperature, keys)
        hidden = None
        if p.hidden_weight and self.student_hidden:
            students = [self.student_hidden[s] for s, _ in self.pairs]
            teachers = [self.teacher_hidden[t] for _, t in self.pairs]
            hidden = kd.hidden_state_loss(
                students, teachers, self._projections(students, teachers), attention_mask
            )
        attention = None
        if p.attention_weight:
            students = _attentions(student_outputs)
            teachers = _attentions(teacher_outputs)
            if not students or not teachers:
                raise RecipeRunError(
                    f"!{self.tag}: recipe key 'attention_weight' > 0, but the models returned no "
                    "attention maps"
                )
            attention = kd.attention_loss(
                [students[s] for s, _ in self.pairs], [teachers[t] for _, t in self.pairs], attention_mask
            )
        self.student_hidden.clear()
        self.teacher_hidden.clear()
        return kd.combine_losses(
            task_loss, logits, p.hardness, hidden, p.hidden_weight, attention, p.attention_weight
        )

    def hook(self, student: nn.Module, teacher: nn.Module) -> None:
        """The student -> teacher layer pairs, and forward hooks that keep each encoder layer's output
        (hidden-state distillation)."""
        if not (self.params.hidden_weight or self.params.attention_weight):
            return
        _, layers = drop.find_encoder_layers(student)
        ids = tuple(id(layer) for layer in layers)
        if ids == self.hooked:
            return
        for handle in self.handles:
            handle.remove()
        _, teacher_layers = drop.find_encoder_layers(teacher)
        recorded = getattr(getattr(student, "config", None), drop.LAYER_MAP_KEY, None)
        try:
            mapping = kd.resolve_layer_map(len(layers), len(teacher_layers), self.params.layer_map, recorded)
        except ValueError as error:
            raise RecipeRunError(f"!{self.tag}: recipe key 'layer_map': {error}") from None
        self.pairs = list(enumerate(mapping))
        self.hooked = ids
        if self.params.hidden_weight:
            self.handles = _output_hooks(layers, self.student_hidden, training_only=True)
            self.handles += _output_hooks(teacher_layers, self.teacher_hidden, training_only=False)

    def _projections(self, students: list, teachers: list) -> list | None:
        width, target = students[0].size(-1), teachers[0].size(-1)
        if width == target:
            return None
        if self.projections is None:
            self.projections = nn.ModuleDict(
                {str(s): kd.make_projection(width, target) for s, _ in self.pairs}
            ).to(students[0].device)
        return [self.projections[str(s)] for s, _ in self.pairs]

    def pre_step(self, ctx: StepContext) -> None:
        """Learned projections train with an optimizer of their own (AdamW at the model's current
        rate): adding them to the trainer's optimizer would break its scheduler (one rate per group)
        and the checkpoint's optimizer state. They are not saved in checkpoints."""
        if self.projections is None or ctx.optimizer is None:
            return
        rate = ctx.optimizer.param_groups[0]["lr"]
        if self.projection_optimizer is None:
            self.projection_optimizer = torch.optim.AdamW(self.projections.parameters(), lr=rate)
        for group in self.projection_optimizer.param_groups:
            group["lr"] = rate

    def post_step(self, ctx: StepContext) -> None:
        if self.projection_optimizer is not None:
            self.projection_optimizer.step()
            self.projection_optimizer.zero_grad(set_to_none=True)


def _attentions(outputs: Any) -> Sequence[torch.Tensor] | None:
    if isinstance(outputs, Mapping):
        return outputs.get("attentions")
    return getattr(outputs, "attentions", None)


def _output_hooks(layers: nn.ModuleList, cache: dict, training_only: bool) -> list:
    handles = []
    for index, layer in enumerate(layers):

        def hook(module, _args, output, index=index):
            if training_only and not module.training:
                return
            cache[index] = output[0] if isinstance(output, tuple) else output

        handles.append(layer.register_forward_hook(hook))
    return handles
