"""The lifecycle of a recipe plan on a training loop, without SparseML (pure torch, no transformers).

:class:`RecipeRunner` drives the modifiers of a :class:`~obert_modifiers.native.recipe.RecipePlan`
with the calls and epochs of SparseML's ``ScheduledOptimizer`` step wrapper, so a recipe does the
same thing at the same optimizer step on both stacks:

- ``steps_per_epoch`` is SparseML's: ``ceil(len(train_dataset) / (per_device_batch * world *
  gradient_accumulation))`` (:func:`sparseml_steps_per_epoch`); the epoch at optimizer step ``n``
  (counted from 0) is ``n // steps_per_epoch + (n % steps_per_epoch) / steps_per_epoch``.
- :meth:`RecipeRunner.apply_structure` runs before the optimizer exists (SparseML's
  ``apply_structure``): layer drop and QAT that start at epoch 0 (or -1).
- before every optimizer step (after the step's backward and gradient clipping):
  :meth:`~RecipeRunner.before_optimizer_step` runs each modifier's scheduled update (a pruning step,
  the recipe's learning rate, QAT start, observer freeze, a later layer drop) when SparseML's
  ``update_ready`` rule says so, then their ``optimizer_pre_step`` (gradients of pruned weights
  zeroed); after it, :meth:`~RecipeRunner.after_optimizer_step` re-applies the masks and counts the
  step.
- the distillation loss (:meth:`RecipeRunner.distillation_loss`) at the trainer's epoch, as
  SparseML's trainer passes ``state.epoch`` to ``loss_update``.

Each recipe tag has one small class here (lifecycle only); the math is in
:mod:`obert_modifiers.algorithms`. Their state (masks, pruning steps done, flags) is
:meth:`RecipeRunner.state_dict`, saved with every checkpoint so that a resumed run continues
exactly where the interrupted one stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy
import torch
from torch import nn

from obert_modifiers.algorithms import distillation as kd
from obert_modifiers.algorithms import layer_drop as drop
from obert_modifiers.algorithms import quantization as qat
from obert_modifiers.algorithms.obs import obs_prune_step
from obert_modifiers.algorithms.sparsity import PruningSchedule, epoch_from_steps
from obert_modifiers.errors import ObertError
from obert_modifiers.native.recipe import PlannedModifier, RecipePlan, lr_at

__all__ = [
    "GradientSource",
    "NativeModifier",
    "RecipeRunner",
    "RecipeRunError",
    "find_params",
    "sparseml_steps_per_epoch",
]

_LOGGER = logging.getLogger(__name__)
ALL_PRUNABLE = ("__ALL__", "__ALL_PRUNABLE__")


class RecipeRunError(ObertError, RuntimeError):
    """A recipe cannot run on this model or trainer; the message names the recipe key and why."""


def sparseml_steps_per_epoch(
    num_samples: int, per_device_batch_size: int, world_size: int, accumulation: int
) -> int:
    """Optimizer steps per epoch as SparseML's trainer computes them (``create_optimizer``)."""
    total = per_device_batch_size * max(world_size, 1) * accumulation
    return max(math.ceil(num_samples / total), 1)


def find_params(
    model: nn.Module, patterns: Sequence[str], tag: str, key: str = "params"
) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for the recipe's names or ``re:`` patterns, in module order, as SparseML's
    ``get_named_layers_and_params_by_regex`` finds them (``re.match`` on ``layer.param``; each
    layer's own parameters). ``__ALL_PRUNABLE__``: every Linear / Embedding / ConvNd weight. A name
    or pattern that matches no parameter is an error naming it (SparseML silently skips it)."""
    if any(p in ALL_PRUNABLE for p in patterns):
        kinds = (nn.Linear, nn.Embedding, nn.modules.conv._ConvNd)
        return [(f"{name}.weight", m.weight) for name, m in model.named_modules() if isinstance(m, kinds)]
    found: list[tuple[str, nn.Parameter]] = []
    hits = dict.fromkeys(patterns, 0)
    for layer_name, layer in model.named_modules():
        for param_name, param in layer.named_parameters(recurse=False):
            full = f"{layer_name}.{param_name}" if layer_name else param_name
            matched = [p for p in patterns if (re.match(p[3:], full) if p.startswith("re:") else full == p)]
            for p in matched:
                hits[p] += 1
            if matched:
                found.append((full, param))
    missing = [p for p, count in hits.items() if count == 0]
    if missing:
        example = next(iter(n for n, _ in model.named_parameters() if n.endswith(".weight")), "?")
        raise RecipeRunError(
            f"!{tag}: recipe key '{key}': {missing[0]!r} matches no parameter of {type(model).__name__} "
            f"(names look like {example!r}; docs/native.md lists each family's patterns)"
        )
    return found


# --------------------------------------------------------------------------------------------
# what the modifiers get from the trainer
# --------------------------------------------------------------------------------------------


@dataclass
class GradientSource:
    """Training batches for the modifiers that need data (oBERT's gradients, importance layer drop):
    ``batches(batch_size, generator)`` yields model inputs (with labels) forever, shuffled with
    ``generator``; ``loss(outputs)`` is the training loss of one batch."""

    batches: Callable[[int | None, torch.Generator | None], Iterator[dict]]
    loss: Callable[[Any], torch.Tensor] = lambda outputs: (
        outputs["loss"] if isinstance(outputs, Mapping) else outputs[0]
    )
    seed: int = 0


@dataclass
class StepContext:
    """What a modifier gets at an optimizer step (SparseML's ``update(module, optimizer, epoch,
    steps_per_epoch)``), plus the runner for the data and the transformers hooks it holds."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    epoch: float
    step: int
    steps_per_epoch: int
    runner: RecipeRunner


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


# --------------------------------------------------------------------------------------------
# one class per recipe tag
# --------------------------------------------------------------------------------------------


class NativeModifier:
    """SparseML's ``ScheduledModifier`` schedule (``start_pending``/``end_pending``/``update_ready``)
    and lifecycle hooks; a subclass overrides what its tag does."""

    update_frequency: float | None = None  # ScheduledUpdateModifier: -1 every step, > 0 every N epochs

    def __init__(self, planned: PlannedModifier):
        self.planned = planned
        self.params = planned.params
        self.tag = planned.tag
        self.start_epoch = planned.start_epoch
        self.end_epoch = planned.end_epoch
        self.started = False
        self.ended = False
        self.last_update_epoch = -1.0

    # SparseML's schedule ------------------------------------------------------------------
    def start_pending(self, epoch: float) -> bool:
        return (
            not self.started
            and not self.ended
            and (epoch >= self.start_epoch >= 0.0 or self.start_epoch == -1.0)
        )

    def end_pending(self, epoch: float) -> bool:
        return not self.ended and self.started and epoch >= self.end_epoch >= 0.0

    def update_ready(self, epoch: float) -> bool:
        ready = self.start_pending(epoch) or self.end_pending(epoch)
        if self.update_frequency is not None:
            ready = ready or (
                self.started
                and epoch > self.start_epoch
                and not self.ended
                and (
                    self.update_frequency == -1.0
                    or (
                        self.last_update_epoch >= 0.0
                        and epoch >= self.last_update_epoch + self.update_frequency
                    )
                )
            )
        return ready

    def scheduled_update(self, ctx: StepContext) -> None:
        self.update(ctx)
        self.last_update_epoch = ctx.epoch
        if self.start_pending(ctx.epoch):
            self.started = True
        if self.end_pending(ctx.epoch):
            self.ended = True

    # hooks ---------------------------------------------------------------------------------
    def bind(self, runner: RecipeRunner) -> None:
        """The model is final for this modifier's purposes (after structure): find parameters."""

    def apply_structure(self, model: nn.Module, runner: RecipeRunner) -> None:
        """Before the optimizer exists (SparseML's ``apply_structure``)."""

    def update(self, ctx: StepContext) -> None:
        pass

    def pre_step(self, ctx: StepContext) -> None:
        pass

    def post_step(self, ctx: StepContext) -> None:
        pass

    def state_dict(self) -> dict:
        return {"started": self.started, "ended": self.ended, "last_update_epoch": self.last_update_epoch}

    def load_state_dict(self, state: Mapping) -> None:
        self.started = bool(state.get("started", False))
        self.ended = bool(state.get("ended", False))
        self.last_update_epoch = float(state.get("last_update_epoch", -1.0))


class EpochRange(NativeModifier):
    """``!EpochRangeModifier``: only sets the epochs trained (the plan's ``max_epochs``)."""


class LearningRateFunction(NativeModifier):
    """``!LearningRateFunctionModifier``: the rate :func:`~obert_modifiers.native.recipe.lr_at`
    gives, set at every optimizer step within ``[start_epoch, end_epoch]``."""

    update_frequency = -1.0

    def update(self, ctx: StepContext) -> None:
        rate = lr_at(self.params, ctx.epoch, ctx.steps_per_epoch)
        _set_lr(ctx.optimizer, rate, self.params.param_groups)


class SetLearningRate(NativeModifier):
    """``!SetLearningRateModifier``: one rate from ``start_epoch`` on (set once)."""

    def __init__(self, planned: PlannedModifier):
        super().__init__(planned)
        self.applied = False

    def update_ready(self, epoch: float) -> bool:
        return not self.applied and (
            self.start_epoch < 0 or (self.start_epoch - epoch) < 2.220446049250313e-16
        )

    def update(self, ctx: StepContext) -> None:
        if self.params.learning_rate is not None:
            _set_lr(ctx.optimizer, self.params.learning_rate, self.params.param_groups)
        self.applied = True

    def state_dict(self) -> dict:
        return {**super().state_dict(), "applied": self.applied}

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        self.applied = bool(state.get("applied", False))


def _set_lr(optimizer: torch.optim.Optimizer | None, rate: float, groups: Sequence[int] | None) -> None:
    if optimizer is None:
        return
    for index, group in enumerate(optimizer.param_groups):
        if not groups or index in groups:
            group["lr"] = rate


class _Masked(NativeModifier):
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


class OBertPruning(_Masked):
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


class ConstantPruning(_Masked):
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


class LayerDrop(NativeModifier):
    """``!LayerDropModifier``: encoder layers removed for real, before the optimizer exists when the
    drop starts at epoch 0 (or -1); a later drop also takes the dropped layers' parameters out of the
    optimizer. The chosen layers are recorded in the plan (``layers``, ``num_layers``), so the
    ``recipe.yaml`` saved with the model re-applies the same drop."""

    def __init__(self, planned: PlannedModifier):
        super().__init__(planned)
        self.applied = False

    def apply_structure(self, model: nn.Module, runner: RecipeRunner) -> None:
        if self.start_epoch <= 0:
            self._apply(model, runner)
            self.started = True

    def update(self, ctx: StepContext) -> None:
        if not self.applied:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                raise RecipeRunError(
                    f"!{self.tag}: recipe key 'start_epoch' = {self.start_epoch}: under torch.distributed "
                    "layers can only be dropped before training (start_epoch 0 or -1; DDP holds them)"
                )
            self._apply(ctx.model, ctx.runner)
            _forget_dropped_parameters(ctx.model, ctx.optimizer)

    def _apply(self, model: nn.Module, runner: RecipeRunner) -> None:
        if self.applied:
            return
        p = self.params
        name, layers = drop.find_encoder_layers(model)
        current = len(layers)
        history = drop.drop_history(model)
        if (
            history
            and p.num_layers is not None
            and history[-1][0] == p.num_layers
            and current != p.num_layers
        ):
            self.applied = True  # this drop was already applied to the saved model (recorded in its config)
            return
        num_layers = p.num_layers if p.num_layers is not None else current
        if current != num_layers:
            raise RecipeRunError(
                f"!{self.tag}: recipe key 'num_layers' = {num_layers}, but the model's '{name}' "
                f"has {current} layers"
            )
        try:
            if p.layers is not None:
                kept = drop.keep_from_drop(num_layers, p.layers)
            elif p.strategy == "uniform":
                kept = drop.uniform_keep(num_layers, p.keep)
            else:
                kept = self._by_importance(model, runner, layers)
        except drop.LayerDropError as error:
            raise RecipeRunError(f"!{self.tag}: {error}") from None
        if p.keep is not None and len(kept) != p.keep:
            raise RecipeRunError(
                f"!{self.tag}: recipe key 'keep' = {p.keep}, but 'layers' leaves {len(kept)}"
            )
        layer_map = drop.drop_layers(model, kept)
        _trim_layer_types(model, kept)
        dropped = [i for i in range(num_layers) if i not in kept]
        self.planned.params = self.params = p.model_copy(update={"layers": dropped, "num_layers": num_layers})
        self.applied = True
        _LOGGER.info(
            "!%s: dropped layers %s of %d; kept -> original: %s", self.tag, dropped, num_layers, layer_map
        )

    def _by_importance(self, model: nn.Module, runner: RecipeRunner, layers: nn.ModuleList) -> list[int]:
        source = runner.gradients
        if source is None:
            raise RecipeRunError(f"!{self.tag}: 'strategy: importance' needs training data (a train_dataset)")
        stream = source.batches(None, torch.Generator().manual_seed(source.seed))
        batches = [(next(stream), None) for _ in range(self.params.importance_batches)]
        order = drop.greedy_drop_order(
            model,
            batches,
            lambda outputs, _target: source.loss(outputs),
            len(layers) - self.params.keep,
            layers,
        )
        dropped = {index for index, _ in order}
        return [i for i in range(len(layers)) if i not in dropped]

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "applied": self.applied,
            "layers": self.planned.params.layers,
            "num_layers": self.planned.params.num_layers,
        }

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)


def _broadcast_quantizers(model: nn.Module) -> None:
    """Under torch.distributed, rank 0's scales and zero points on every rank once the ranges are
    frozen (each rank's observers saw other batches), so every rank holds the same model."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    for fake_quant in qat.fake_quantizers(model):
        for buffer in fake_quant.buffers():
            torch.distributed.broadcast(buffer.data, src=0)


def _trim_layer_types(model: nn.Module, kept: Sequence[int]) -> None:
    """transformers 5 configs that list a type per layer (ModernBERT's ``layer_types``) must keep
    one entry per remaining layer, or ``save_pretrained`` refuses the config."""
    config = getattr(model, "config", None)
    types = getattr(config, "layer_types", None)
    if isinstance(types, list | tuple) and len(types) > len(kept):
        config.layer_types = [types[i] for i in kept]


def _forget_dropped_parameters(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    if optimizer is None:
        return
    live = {id(p) for p in model.parameters()}
    for group in optimizer.param_groups:
        stale = [p for p in group["params"] if id(p) not in live]
        if stale:
            group["params"] = [p for p in group["params"] if id(p) in live]
            for p in stale:
                optimizer.state.pop(p, None)


class Quantization(NativeModifier):
    """``!OBertQuantizationModifier``: fake-quantized Linear / Embedding layers (shared parameters), the
    attention matmuls through transformers' attention-function registry (:mod:`.attention`, set by the
    trainer as ``runner.quantize_attention``), observers frozen at ``freeze_observer_epoch``, sparse
    weights kept sparse (masks taken at the first QAT step)."""

    def __init__(self, planned: PlannedModifier):
        super().__init__(planned)
        self.applied = False
        self.frozen = False
        self.plan: qat.QuantizationPlan | None = None
        self.weights: dict[str, nn.Parameter] = {}
        self.masks: dict[str, torch.Tensor] | None = None

    def apply_structure(self, model: nn.Module, runner: RecipeRunner) -> None:
        if self.start_epoch <= 0:
            self.quantize(model, runner)
            self.started = True

    def quantize(self, model: nn.Module, runner: RecipeRunner) -> None:
        if self.applied:
            return
        p = self.params
        self.plan = qat.quantize_model(
            model,
            weight_strategy=p.weight_strategy,
            quantize_matmuls=False,
            quantize_embeddings=p.quantize_embeddings,
            exclude=p.exclude,
        )
        if p.quantize_matmuls and runner.quantize_attention is not None:
            self.plan.matmuls += runner.quantize_attention(model, p.exclude)
        if self.plan.num_quantized == 0:
            raise RecipeRunError(
                f"!{self.tag}: nothing to quantize in {type(model).__name__} "
                f"(recipe key 'exclude' = {p.exclude})"
            )
        self.weights = qat.quantized_weights(model)
        self.masks = None
        self.applied = True
        _LOGGER.info(
            "!%s: INT8 fake quantization on %d linear layers, %d attention matmuls, %d embeddings",
            self.tag,
            len(self.plan.linears),
            len(self.plan.matmuls),
            len(self.plan.embeddings),
        )

    def _freeze_pending(self, epoch: float) -> bool:
        freeze = self.params.freeze_observer_epoch
        return self.applied and not self.frozen and freeze is not None and epoch >= freeze

    def update_ready(self, epoch: float) -> bool:
        return super().update_ready(epoch) or self._freeze_pending(epoch)

    def update(self, ctx: StepContext) -> None:
        if not self.applied and (self.start_epoch == -1 or ctx.epoch >= self.start_epoch):
            self.quantize(ctx.model, ctx.runner)
        if self._freeze_pending(ctx.epoch):
            qat.freeze_observers(ctx.model)
            _broadcast_quantizers(ctx.model)
            self.frozen = True
            ctx.runner.metrics["qat_observers_frozen"] = 1.0
            _LOGGER.info("!%s: observers frozen at epoch %.4g", self.tag, ctx.epoch)

    def pre_step(self, ctx: StepContext) -> None:
        if not self.applied:
            return
        if self.masks is None:  # taken at the first QAT step, after a resume loaded the weights
            self.masks = qat.weight_masks(self.weights)
        qat.mask_gradients(self.weights, self.masks)

    def post_step(self, ctx: StepContext) -> None:
        if self.applied and self.masks:
            qat.apply_masks(self.weights, self.masks)

    def state_dict(self) -> dict:
        masks = {n: m.cpu().clone() for n, m in (self.masks or {}).items()}
        return {
            **super().state_dict(),
            "applied": self.applied,
            "frozen": self.frozen,
            "masks": masks if self.masks is not None else None,
        }

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        self.frozen = bool(state.get("frozen", False))
        masks = state.get("masks")
        if self.applied and masks is not None:
            self.masks = {n: m.to(self.weights[n].device).bool() for n, m in masks.items()}


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


class ZipLMPruning(NativeModifier):
    """``!ZipLMPruningModifier``: structured OBS steps at ``start_epoch + k * update_frequency`` (the
    SparseML adapter's schedule), each on calibration batches drawn with seed ``seed + k`` under a
    forked RNG (training's RNG is left alone): input Hessians, OBS databases, the latency search for
    the step's speed-up target, the physical shrink, the optimizer's state moved onto the shrunk
    parameters (:mod:`obert_modifiers.algorithms.ziplm`). The structure is recorded in the plan
    (``structure``, ``steps_done``) and the model config, as the SparseML adapter records it."""

    def __init__(self, planned: PlannedModifier):
        super().__init__(planned)
        self.targets = self.params.step_targets
        self.steps_done = self.params.steps_done
        self.table = None
        self.history: list[dict] = []
        self.members: list[Path] = []

    def bind(self, runner: RecipeRunner) -> None:
        from obert_modifiers.algorithms import shrink

        if self.steps_done < len(self.targets):  # fail before training, not at the step
            try:
                shrink.encoder_layers(runner.model)
            except shrink.ShrinkError as error:
                raise RecipeRunError(f"!{self.tag}: {error}") from None

    def update_ready(self, epoch: float) -> bool:
        if self.steps_done >= len(self.targets):
            return False
        return epoch >= self.params.start_epoch + self.steps_done * self.params.update_frequency - 1e-9

    def scheduled_update(self, ctx: StepContext) -> None:
        self.update(ctx)
        self.started = True
        self.ended = self.steps_done >= len(self.targets)

    def update(self, ctx: StepContext) -> None:
        if len(self.params.speedup_targets) > 1 and self.steps_done:
            self.save_member(ctx.model, ctx.runner)  # the model at the previous target, trained since
        with torch.random.fork_rng():
            torch.manual_seed(self.params.seed + self.steps_done)
            self._step(ctx)

    def _step(self, ctx: StepContext) -> None:
        from obert_modifiers.algorithms import latency_search, shrink, ziplm
        from obert_modifiers.latency import latency_table

        p, model, runner = self.params, ctx.model, ctx.runner
        if runner.gradients is None:
            raise RecipeRunError(f"!{self.tag} needs calibration data: give the trainer a train_dataset")
        step, target = self.steps_done, self.targets[self.steps_done]
        try:
            layers = shrink.encoder_layers(model)
        except shrink.ShrinkError as error:
            raise RecipeRunError(f"!{self.tag}: {error}") from None
        if self.table is None:
            self.table = latency_table(
                model.config, runtime=p.latency_runtime, threads=p.latency_threads,
                batch_size=p.latency_batch_size, sequence_length=p.latency_sequence_length,
                precision=p.latency_precision, cache_dir=p.latency_cache_dir, progress=False,
            )  # fmt: skip
        was_training = model.training
        model.eval()
        try:
            hessians = ziplm.calibrate(
                model, layers, self._batches(runner, step), p.num_calibration_samples, step
            )
            with ziplm._single_thread():
                attention, ffn = ziplm.databases(
                    layers, hessians, self.table, p.structures, p.damp, p.ffn_chunk
                )
        finally:
            model.train(was_training)
        choice = latency_search.search_structure(
            self.table, [db.errors for db in attention], [db.errors for db in ffn], target
        )
        slices = ziplm.apply_choice(model, attention, ffn, choice)
        ziplm.move_optimizer_state(ctx.optimizer, slices)
        self.steps_done += 1
        structure = shrink.read_structure(model)
        model.config.update({"obert_ziplm": ziplm.prediction(choice, self.table, target)})
        self.planned.params = self.params = p.model_copy(
            update={"structure": structure, "steps_done": self.steps_done}
        )
        record = {"epoch": ctx.epoch, "step": ctx.step, "target": target, "predicted": choice.speedup}
        self.history.append({**record, "structure": structure})
        runner.metrics.update({"ziplm_target_speedup": target, "ziplm_predicted_speedup": choice.speedup})
        _LOGGER.info("!%s step %d: target %gx, predicted %.3gx; heads %s, FFN %s", self.tag, self.steps_done,
                     target, choice.speedup, structure["heads"], structure["ffn"])  # fmt: skip

    def save_member(self, model: nn.Module, runner: RecipeRunner) -> Path | None:
        """With a list of targets, the model at the last target reached goes to
        ``<output_dir>/ziplm-<target>x`` (``OBERT_ZIPLM_FAMILY_DIR`` overrides the folder), with a
        recipe that rebuilds exactly its structure, as the SparseML adapter saves family members."""
        import os

        from obert_modifiers.algorithms import shrink
        from obert_modifiers.algorithms.ziplm import family_dir_name
        from obert_modifiers.deployment import staged_dir

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_rank() != 0:
                return None
        root = os.environ.get("OBERT_ZIPLM_FAMILY_DIR") or runner.output_dir
        if not root or not self.steps_done:
            return None
        target = self.targets[self.steps_done - 1]
        folder = Path(root) / family_dir_name(target)
        structure = shrink.read_structure(model)
        done = self.steps_done
        targets = (
            list(self.params.speedup_targets[:done]) if len(self.params.speedup_targets) > 1 else [target]
        )
        member = self.params.model_copy(
            update={"speedup_targets": targets, "structure": structure, "steps_done": len(targets)}
        )
        planned = dataclasses.replace(self.planned, params=member, stage=None, epochs=None, extra={})
        with staged_dir(folder, overwrite=True) as stage:
            model.save_pretrained(stage)
            if runner.tokenizer is not None:
                runner.tokenizer.save_pretrained(stage)
            RecipePlan(source=str(folder), stages={None: [planned]}).save(stage)
        self.members.append(folder)
        _LOGGER.info("!%s: saved the %gx model to %s", self.tag, target, folder)
        return folder

    def _batches(self, runner: RecipeRunner, step: int) -> Iterator[dict]:
        source = runner.gradients
        stream = source.batches(
            self.params.calibration_batch_size, torch.Generator().manual_seed(self.params.seed + step)
        )
        seen = 0
        while seen < self.params.num_calibration_samples:
            batch = {k: v for k, v in next(stream).items() if k != "labels"}
            yield batch
            seen += len(next(iter(batch.values())))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "steps_done": self.steps_done, "structure": self.params.structure,
                "history": list(self.history)}  # fmt: skip

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        self.steps_done = int(state.get("steps_done", 0))
        self.history = list(state.get("history", []))


MODIFIERS: dict[str, type[NativeModifier]] = {
    "EpochRangeModifier": EpochRange,
    "LearningRateFunctionModifier": LearningRateFunction,
    "SetLearningRateModifier": SetLearningRate,
    "ConstantPruningModifier": ConstantPruning,
    "OBertPruningModifier": OBertPruning,
    "LayerDropModifier": LayerDrop,
    "OBertQuantizationModifier": Quantization,
    "OBertDistillationModifier": Distillation,
    "ZipLMPruningModifier": ZipLMPruning,
}


# --------------------------------------------------------------------------------------------
# the runner
# --------------------------------------------------------------------------------------------


@dataclass
class RecipeRunner:
    """Runs ``plan`` on ``model``: call :meth:`apply_structure` before the optimizer exists,
    :meth:`before_optimizer_step` / :meth:`after_optimizer_step` around every optimizer step, and
    :meth:`distillation_loss` in the loss. ``gradients`` feeds the modifiers that need data;
    ``quantize_attention(model, exclude) -> [names]`` quantizes the attention matmuls (set by the
    transformers adapter)."""

    plan: RecipePlan
    model: nn.Module
    steps_per_epoch: int = 1
    gradients: GradientSource | None = None
    quantize_attention: Callable[[nn.Module, Sequence[str]], list[str]] | None = None
    output_dir: str | None = None  # where ZipLM family members go
    tokenizer: Any = None  # saved with them
    record_attention: Callable[[nn.Module], None] | None = None
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # the latest of each, for the trainer's log
    lr_trace: list[tuple[int, float, float]] = field(default_factory=list)  # (step, epoch, lr of group 0)
    modifiers: list[NativeModifier] = field(init=False)

    def __post_init__(self) -> None:
        unknown = [m.tag for m in self.plan.modifiers if m.tag not in MODIFIERS]
        if unknown:
            raise RecipeRunError(
                f"{self.plan.source}: '!{unknown[0]}' does not run on the native adapter yet (it runs "
                f"{', '.join('!' + t for t in MODIFIERS)}); train this recipe on the SparseML stack"
            )
        self.modifiers = [MODIFIERS[m.tag](m) for m in self.plan.modifiers]
        self.structured = False

    # queries ------------------------------------------------------------------------------
    @property
    def epoch(self) -> float:
        return epoch_from_steps(self.step, self.steps_per_epoch)

    def of_type(self, kind: type) -> list:
        return [m for m in self.modifiers if isinstance(m, kind)]

    @property
    def has_lr_modifiers(self) -> bool:
        return bool(self.of_type(LearningRateFunction) or self.of_type(SetLearningRate))

    @property
    def has_distillation(self) -> bool:
        return bool(self.of_type(Distillation))

    def prepare_distillation(self, teacher: nn.Module) -> None:
        """Pair layers and attach the hidden-state hooks before training, so the first step's
        forward pass is already recorded."""
        for modifier in self.of_type(Distillation):
            modifier.hook(self.model, teacher)

    def wants_attentions(self, epoch: float | None) -> bool:
        """Whether the student must return its attention maps at ``epoch``."""
        return any(d.wants_attentions and d.active(epoch) for d in self.of_type(Distillation))

    # lifecycle ----------------------------------------------------------------------------
    def apply_structure(self) -> None:
        """Structure that exists from the start (layer drop, QAT at epoch 0), then the parameters
        each modifier works on. Call before the optimizer is created."""
        if self.structured:
            return
        for modifier in self.modifiers:
            modifier.apply_structure(self.model, self)
        self.bind()
        self.structured = True

    def bind(self) -> None:
        for modifier in self.modifiers:
            modifier.bind(self)

    def _context(self, optimizer) -> StepContext:
        return StepContext(self.model, optimizer, self.epoch, self.step, self.steps_per_epoch, self)

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer | None) -> None:
        ctx = self._context(optimizer)
        for modifier in self.modifiers:
            if modifier.update_ready(ctx.epoch):
                modifier.scheduled_update(ctx)
                if isinstance(modifier, LayerDrop | Quantization | ZipLMPruning):
                    self.bind()
        for modifier in self.modifiers:
            modifier.pre_step(ctx)
        if optimizer is not None:
            self.lr_trace.append((self.step, ctx.epoch, float(optimizer.param_groups[0]["lr"])))

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer | None) -> None:
        ctx = self._context(optimizer)
        for modifier in self.modifiers:
            modifier.post_step(ctx)
        self.step += 1

    def distillation_loss(
        self,
        task_loss: torch.Tensor,
        student_outputs: Any,
        teacher: nn.Module,
        teacher_inputs: Mapping,
        epoch: float | None,
    ) -> torch.Tensor:
        """The loss with every active distillation modifier applied in turn (SparseML's
        ``loss_update`` chain); ``task_loss`` unchanged when none is active."""
        loss = task_loss
        for modifier in self.of_type(Distillation):
            if not modifier.active(epoch):
                continue
            modifier.hook(self.model, teacher)
            extra = {}
            if modifier.wants_attentions:
                if self.record_attention is not None:
                    self.record_attention(teacher)
                extra["output_attentions"] = True
            with torch.no_grad():
                teacher_outputs = teacher(**teacher_inputs, **extra)
            loss = modifier.loss(
                self, loss, student_outputs, teacher_outputs, teacher_inputs.get("attention_mask")
            )
        return loss

    def finalize(self) -> None:
        for modifier in self.of_type(_Masked):
            if modifier.masks_active:
                modifier.apply_masks()
        for modifier in self.of_type(ZipLMPruning):
            if len(modifier.params.speedup_targets) > 1 and modifier.steps_done == len(modifier.targets):
                modifier.save_member(self.model, self)

    # state (checkpoints) ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "format": 1,
            "step": self.step,
            "steps_per_epoch": self.steps_per_epoch,
            "modifiers": [{"tag": m.tag, **m.state_dict()} for m in self.modifiers],
            "lr_trace": list(self.lr_trace),
        }

    def structure_state(self, state: Mapping) -> None:
        """Re-create what a checkpoint's state has built (QAT modules, a later layer drop) before
        its weights load."""
        for modifier, saved in zip(self.modifiers, state.get("modifiers", []), strict=False):
            if isinstance(modifier, Quantization) and saved.get("applied"):
                modifier.quantize(self.model, self)
            if isinstance(modifier, ZipLMPruning) and saved.get("structure"):
                from obert_modifiers.algorithms import shrink

                shrink.apply_structure(self.model, saved["structure"])
                modifier.steps_done = int(saved.get("steps_done", 0))
            if isinstance(modifier, LayerDrop) and saved.get("applied") and not modifier.applied:
                modifier.planned.params = modifier.params.model_copy(
                    update={"layers": saved["layers"], "num_layers": saved["num_layers"]}
                )
                modifier.params = modifier.planned.params
                modifier._apply(self.model, self)
        self.bind()

    def load_state_dict(self, state: Mapping) -> None:
        saved = state.get("modifiers", [])
        tags = [s.get("tag") for s in saved]
        if tags != [m.tag for m in self.modifiers]:
            raise RecipeRunError(
                f"{self.plan.source}: the checkpoint was trained with other modifiers ({tags}); "
                "resume with its recipe"
            )
        for modifier, entry in zip(self.modifiers, saved, strict=True):
            modifier.load_state_dict(entry)
        self.step = int(state.get("step", 0))
        self.lr_trace = [tuple(x) for x in state.get("lr_trace", [])]


def deep_copy_model(model: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(model)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher
