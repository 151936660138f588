"""``!OBertPruningModifier`` and ``!ConstantPruningModifier``: keep-masks over named weights."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import numpy
import torch
from torch import nn

from obert_modifiers.algorithms.obs import obs_prune_step
from obert_modifiers.algorithms.sparsity import PruningSchedule
from obert_modifiers.native.modifiers.base import (
    NativeModifier,
    RecipeRunError,
    StepContext,
    _rank,
    find_params,
)
from obert_modifiers.native.recipe import PlannedModifier

if TYPE_CHECKING:
    from obert_modifiers.native.lifecycle import RecipeRunner

_LOGGER = logging.getLogger(__name__)


class Masked(NativeModifier):
    """Shared by the pruning modifiers: keep-masks over named weights, applied after every step."""

    def __init__(self, planned: PlannedModifier):
        super().__init__(planned)
        self.names: list[str] = []
        self.weights: list[nn.Parameter] = []
        self.masks: list[torch.Tensor] = []

    @property
    def masks_active(self) -> bool:
        return bool(self.masks)

    def masks_by_name(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.masks, strict=True))

    @torch.no_grad()
    def apply_masks(self) -> None:
        for weight, mask in zip(self.weights, self.masks, strict=True):
            weight.data.mul_(mask.to(weight.dtype))

    def pre_step(self, ctx: StepContext) -> None:
        if self.masks_active:
            for weight, mask in zip(self.weights, self.masks, strict=True):
                if weight.grad is not None:
                    weight.grad.mul_(mask.to(weight.grad.dtype))

    def post_step(self, ctx: StepContext) -> None:
        if self.masks_active:  # the optimizer (momentum, weight decay) may move pruned weights off zero
            self.apply_masks()

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "masks": {n: m.clone().cpu() for n, m in self.masks_by_name().items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        masks = state.get("masks") or {}
        if masks:
            missing = [n for n in self.names if n not in masks]
            if missing:
                raise RecipeRunError(f"!{self.tag}: the checkpoint's state has no mask for {missing[:3]}")
            self.masks = [
                masks[n].to(w.device).bool().view(w.shape)
                for n, w in zip(self.names, self.weights, strict=True)
            ]


class OBertPruning(Masked):
    """``!OBertPruningModifier``: oBERT pruning steps when :class:`PruningSchedule` says so (SparseML's
    rule), on gradients drawn from a data stream seeded by (seed, step, rank) as the SparseML adapter
    does; the step's own training gradients are set aside and given back to the optimizer."""

    def __init__(self, planned: PlannedModifier):
        super().__init__(planned)
        self.steps_done = 0
        self.last_step_epoch: float | None = None
        self.last_sparsity: list[float] | None = None
        self.pruning_ended = False
        self.history: list[dict] = []  # (epoch, step, target, achieved) of every pruning step
        p = self.params
        self.schedule = PruningSchedule(
            p.init_sparsity,
            p.final_sparsity,
            self.start_epoch,
            self.end_epoch,
            p.update_frequency,
            p.inter_func,
        )

    def bind(self, runner: RecipeRunner) -> None:
        if self.names:
            return
        named = find_params(runner.model, self.params.params, self.tag)
        self.names = [n for n, _ in named]
        self.weights = [w for _, w in named]
        self.masks = []

    @property
    def masks_active(self) -> bool:
        return (
            bool(self.masks) and self.steps_done > 0 and (self.params.leave_enabled or not self.pruning_ended)
        )

    def update_ready(self, epoch: float) -> bool:
        return self.schedule.is_due(epoch, self.last_step_epoch, self.pruning_ended)

    def scheduled_update(self, ctx: StepContext) -> None:
        self.update(ctx)
        self.started = True
        self.ended = self.pruning_ended

    def update(self, ctx: StepContext) -> None:
        runner = ctx.runner
        if not self.masks:
            self.masks = [torch.ones_like(w, dtype=torch.bool) for w in self.weights]
        target = self.schedule.target(ctx.epoch)
        stats = self._prune(ctx.model, runner, target, ctx.step)
        self.steps_done += 1
        self.last_step_epoch = ctx.epoch
        self.last_sparsity = [target] * len(self.weights)
        if ctx.epoch >= self.end_epoch:
            self.pruning_ended = True
        self.history.append(
            {"epoch": ctx.epoch, "step": ctx.step, "target": target, "achieved": stats.achieved}
        )
        runner.metrics.update({"obert_target_sparsity": target, "obert_achieved_sparsity": stats.achieved})
        _LOGGER.info(
            "!%s step %d at epoch %.4g: target %.4f achieved %.4f",
            self.tag,
            self.steps_done,
            ctx.epoch,
            target,
            stats.achieved,
        )

    def _prune(self, model: nn.Module, runner: RecipeRunner, target: float, step: int):
        source = runner.gradients
        if source is None:
            raise RecipeRunError(
                f"!{self.tag} needs training data for its gradients: give the trainer a train_dataset"
            )
        rank = _rank()
        entropy = [source.seed, step + 1, rank]
        seed = int(numpy.random.SeedSequence(entropy).generate_state(1, dtype=numpy.uint64)[0]) >> 1
        batch_size = (self.params.grad_sampler_kwargs or {}).get("batch_size")
        batches = source.batches(batch_size, torch.Generator().manual_seed(seed))
        tracked = {id(w) for w in self.weights}
        others = [p for p in model.parameters() if id(p) not in tracked]
        training_grads = [(p, p.grad) for p in model.parameters()]
        for p, _ in training_grads:
            p.grad = None
        was_training = model.training
        model.eval()  # deterministic gradients (no dropout), as SparseML's OBS does

        def sample(count: int) -> Iterator[int]:
            for index in range(count):
                model.zero_grad()
                source.loss(model(**next(batches))).backward()
                yield index + 1

        try:
            return obs_prune_step(
                self.weights,
                self.masks,
                [target] * len(self.weights),
                sample,
                num_grads=self.params.num_grads,
                damp=self.params.damp,
                fisher_block_size=self.params.fisher_block_size,
                mask_type=self.params.mask_type,
                global_sparsity=self.params.global_sparsity,
                num_recomputations=self.params.num_recomputations,
                last_sparsity=self.last_sparsity,
                memory_budget_gb=self.params.memory_budget_gb,
                other_params=others,
            )
        finally:
            model.train(was_training)
            for p, grad in training_grads:
                p.grad = grad

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "steps_done": self.steps_done,
            "last_step_epoch": self.last_step_epoch,
            "last_sparsity": self.last_sparsity,
            "pruning_ended": self.pruning_ended,
            "history": list(self.history),
        }

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        self.steps_done = int(state.get("steps_done", 0))
        self.last_step_epoch = state.get("last_step_epoch")
        self.last_sparsity = state.get("last_sparsity")
        self.pruning_ended = bool(state.get("pruning_ended", False))
        self.history = list(state.get("history", []))


class ConstantPruning(Masked):
    """``!ConstantPruningModifier``: the zeros of ``params`` at ``start_epoch`` stay zero (gradients
    masked before, weights masked after every optimizer step) until ``end_epoch``."""

    def bind(self, runner: RecipeRunner) -> None:
        if not self.names:
            patterns = [self.params.params] if isinstance(self.params.params, str) else self.params.params
            named = find_params(runner.model, patterns, self.tag)
            self.names = [n for n, _ in named]
            self.weights = [w for _, w in named]

    @property
    def masks_active(self) -> bool:
        return bool(self.masks) and not self.ended

    def update(self, ctx: StepContext) -> None:
        if self.start_pending(ctx.epoch) and not self.masks:
            self.masks = [w.detach() != 0 for w in self.weights]
