"""``!OBertPruningModifier``: Optimal BERT Surgeon gradual pruning (SparseML adapter; the math is in
:mod:`obert_modifiers.algorithms.obs`, :mod:`~obert_modifiers.algorithms.fisher` and
:mod:`~obert_modifiers.algorithms.sparsity`).

Recipe keys are those of SparseML's ``OBSPruningModifier`` (so a published oBERT recipe ports by
changing its tag), plus ``memory_budget_gb``::

    - !OBertPruningModifier
      params:
        - re:bert.encoder.layer.*.attention.self.(query|key|value).weight
        - re:bert.encoder.layer.*.(attention.output|intermediate|output).dense.weight
      init_sparsity: 0.7
      final_sparsity: 0.9
      start_epoch: 2.0
      end_epoch: 26.0
      update_frequency: 4.0
      inter_func: cubic          # linear | cubic | inverse_cubic
      mask_type: unstructured    # unstructured | block4 | blockN
      global_sparsity: true
      leave_enabled: true
      num_grads: 1024
      damp: 1e-7
      fisher_block_size: 50
      grad_sampler_kwargs: {batch_size: 16}
      num_recomputations: 1
      memory_budget_gb: null     # e.g. 2.0: cap on the step's extra memory (groups in turn)

Lifecycle: the trainer's ``grad_sampler`` (initialize kwarg) supplies gradients; a pruning step runs
in ``update`` when the schedule says so, on gradient batches seeded by (seed, training step), and
leaves the step's training gradients for the optimizer; masks are re-applied after every optimizer
step while the modifier is active (and after ``end_epoch`` with ``leave_enabled``).

Resume: SparseML restarts its step counter at epoch 0 when training resumes from a checkpoint, but
it passes the checkpoint's epoch to ``apply_structure``; the modifier records it there, replays its
schedule up to that point, takes the masks from the zeros of the loaded weights, and shifts the
epochs it sees accordingly. With the per-step gradient seeds and the optimizer state restored
(``compat.scheduled_optimizer_state``), a resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy
import torch
from sparseml.optim import BaseModifier
from sparseml.pytorch.sparsification.modifier import PyTorchModifierYAML, ScheduledUpdateModifier
from sparseml.pytorch.utils import GradSampler, get_named_layers_and_params_by_regex, get_prunable_layers
from sparseml.sparsification import SparsificationTypes
from torch.nn import Module

from obert_modifiers.algorithms.obs import obs_prune_step, parse_mask_type, plan_memory
from obert_modifiers.algorithms.sparsity import PruningSchedule, epoch_from_steps
from obert_modifiers.modifiers._base import RecipeParameterError, recipe_properties, store_recipe
from obert_modifiers.params import OBertPruningParams, validate_recipe

__all__ = ["OBertPruningModifier"]

_LOGGER = logging.getLogger(__name__)
_NAME = "OBertPruningModifier"


@PyTorchModifierYAML()
@recipe_properties(OBertPruningParams)
class OBertPruningModifier(ScheduledUpdateModifier):
    """Gradual second-order (OBS) pruning with a block-diagonal empirical Fisher inverse (recipe keys:
    :class:`~obert_modifiers.params.OBertPruningParams`)."""

    def __init__(self, **recipe: Any):
        params = validate_recipe(OBertPruningParams, recipe)
        store_recipe(self, params)
        super().__init__(
            start_epoch=params.start_epoch,
            min_start=0.0,
            end_epoch=params.end_epoch,
            min_end=0.0,
            end_comparator=0,
            update_frequency=params.update_frequency,
            min_frequency=0.0,
        )
        self._reset_state()

    def _reset_state(self) -> None:
        self._names: list = []
        self._weights: list = []
        self._masks: list = []
        self._grad_sampler = None
        self._module = None
        self._steps_done = 0
        self._last_step_epoch: float | None = None
        self._last_sparsity: list | None = None
        self._pruning_ended = False
        self._resume_epoch = 0.0
        self._resume_steps: int | None = None
        self._last_stats = None

    @property
    def _schedule(self) -> PruningSchedule:
        # built from the current props: staged recipes shift start/end with advance_epochs
        return PruningSchedule(
            self._init_sparsity,
            self._final_sparsity,
            self.start_epoch,
            self.end_epoch,
            self.update_frequency,
            self._inter_func,
        )

    # ------------------------------------------------------------------ recipe properties
    # (one ModifierProp per recipe key, made by @recipe_properties from OBertPruningParams)
    @BaseModifier.sparsification_types.getter
    def sparsification_types(self) -> list:
        return [SparsificationTypes.pruning]

    # ------------------------------------------------------------------ lifecycle
    def apply_structure(
        self, module: Module, epoch: float = 0.0, loggers=None, finalize: bool = False, **kwargs
    ):
        """Not structural: SparseML calls this with the checkpoint's epoch when training resumes,
        which is the only place that epoch reaches a modifier; remember it."""
        if math.isfinite(epoch) and epoch > 0:
            self._resume_epoch = float(epoch)

    def initialize(self, module: Module, epoch: float = 0, loggers=None, **kwargs) -> None:
        super().initialize(module, epoch, loggers, **kwargs)
        sampler = kwargs.get("grad_sampler")
        if not isinstance(sampler, dict) or not {"data_loader_builder", "loss_function"} <= set(sampler):
            raise RuntimeError(
                f"!{_NAME} needs gradients: initialize it with "
                "grad_sampler={'data_loader_builder': fn(kwargs), "
                "'loss_function': fn(outputs, target)} (SparseML's transformers Trainer passes it; with a "
                "manager of your own call manager.initialize(model, grad_sampler=...))."
            )
        self._module = module
        self._names, self._weights = self._find_params(module)
        self._check_memory_budget()
        self._grad_sampler = sampler
        # the gradient batches of a pruning step are a function of (this seed, the step): see _sampler
        self._sampler_seed = torch.initial_seed()
        if self._resume_epoch > 0:  # resumed: pruned weights are the zeros of the loaded checkpoint
            self._masks = [w.detach() != 0 for w in self._weights]
        else:
            self._masks = [torch.ones_like(w, dtype=torch.bool) for w in self._weights]
        if math.isinf(epoch):  # one-shot (manager.apply): prune straight to final_sparsity
            self._prune(module, self._final_sparsity, epoch=epoch, steps_per_epoch=1)
            self._pruning_ended = True

    def _check_memory_budget(self) -> None:
        """Fail at initialize, not at the first pruning step, when the budget cannot be met."""
        if self._memory_budget_gb is None:
            return
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        try:
            plan_memory(
                [w.numel() for w in self._weights],
                block_size=self._fisher_block_size,
                num_grads=math.ceil(self._num_grads / world) * world,
                budget_bytes=int(self._memory_budget_gb * 2**30),
                mask_group=parse_mask_type(self._mask_type),
            )
        except ValueError as error:
            raise RecipeParameterError(
                _NAME,
                "memory_budget_gb",
                self._memory_budget_gb,
                f"a budget these {len(self._weights)} parameters fit in ({error})",
            ) from None

    def _find_params(self, module: Module) -> tuple:
        if any(p in ("__ALL__", "__ALL_PRUNABLE__") for p in self._params):
            named = [(f"{name}.weight", layer.weight) for name, layer in get_prunable_layers(module)]
        else:
            named = [
                (f"{nlp.layer_name}.{nlp.param_name}", nlp.param)
                for nlp in get_named_layers_and_params_by_regex(module, self._params)
            ]
        if not named:
            raise RecipeParameterError(
                _NAME, "params", self._params, "names or 're:' patterns matching model weights"
            )
        return [n for n, _ in named], [p for _, p in named]

    def _schedule_epoch(self, epoch: float, steps_per_epoch: int) -> float:
        """The epoch on the schedule: SparseML's counter plus the resumed checkpoint's steps."""
        if self._resume_epoch <= 0 or not math.isfinite(epoch):
            return epoch
        if self._resume_steps is None:
            self._resume_steps = round(self._resume_epoch * steps_per_epoch)
            done, last, ended = self._schedule.replay(self._resume_steps, steps_per_epoch)
            self._steps_done, self._last_step_epoch, self._pruning_ended = done, last, ended
            if done:
                self._started = True
                self._last_sparsity = [self._schedule.target(last)] * len(self._weights)
            _LOGGER.info(
                "!%s resumed at step %d (epoch %.4g): %d pruning step(s) already done",
                _NAME,
                self._resume_steps,
                self._resume_epoch,
                done,
            )
        return epoch_from_steps(round(epoch * steps_per_epoch) + self._resume_steps, steps_per_epoch)

    def update_ready(self, epoch: float, steps_per_epoch: int) -> bool:
        if not self._enabled or not self._initialized:
            return False
        epoch = self._schedule_epoch(epoch, steps_per_epoch)
        return self._schedule.is_due(epoch, self._last_step_epoch, self._pruning_ended)

    def scheduled_update(self, module: Module, optimizer, epoch: float, steps_per_epoch: int) -> None:
        if not self.update_ready(epoch, steps_per_epoch):
            raise RuntimeError("update_ready returns False, this must be true to call scheduled_update")
        epoch = self._schedule_epoch(epoch, steps_per_epoch)
        self._schedule_called = True
        try:
            self.update(module, optimizer, epoch=epoch, steps_per_epoch=steps_per_epoch)
        finally:
            self._schedule_called = False
        self._started = True
        if self._pruning_ended:
            self._ended = True

    def update(self, module: Module, optimizer, epoch: float, steps_per_epoch: int) -> None:
        super().update(module, optimizer, epoch, steps_per_epoch)
        self._prune(module, self._schedule.target(epoch), epoch=epoch, steps_per_epoch=steps_per_epoch)
        self._last_step_epoch = epoch
        if epoch >= self.end_epoch:
            self._pruning_ended = True

    def _sampler(self, epoch: float, steps_per_epoch: int, rank: int) -> GradSampler:
        """A gradient sampler over a data stream of its own for the pruning step at ``epoch``.

        Its batches depend only on the seed read at initialize (the trainer's ``--seed``), the
        training step the pruning step runs at and the rank, never on earlier pruning steps or on the
        global RNG: a run resumed from a checkpoint draws exactly the batches the uninterrupted run
        drew. The trainer's ``data_loader_builder`` gets the recipe's ``grad_sampler_kwargs`` plus
        ``generator`` (a seeded ``torch.Generator`` that its DataLoader shuffles with).
        """
        step = round(epoch * steps_per_epoch) if math.isfinite(epoch) else -1
        entropy = [self._sampler_seed, step + 1, rank]
        seed = int(numpy.random.SeedSequence(entropy).generate_state(1, dtype=numpy.uint64)[0]) >> 1
        kwargs = {**(self._grad_sampler_kwargs or {}), "generator": torch.Generator().manual_seed(seed)}
        batches = self._grad_sampler["data_loader_builder"](kwargs)
        return GradSampler(batches, self._grad_sampler["loss_function"])

    def _prune(self, module: Module, target: float, epoch: float, steps_per_epoch: int) -> None:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        tracked = {id(w) for w in self._weights}
        others = [p for p in module.parameters() if id(p) not in tracked]
        was_training = module.training
        sampler = self._sampler(epoch, steps_per_epoch, rank)
        # the pruning step runs inside the optimizer step: the gradients of this step's training batch
        # are already in .grad; keep them aside so the optimizer still trains on that batch
        training_grads = [(p, p.grad) for p in module.parameters()]
        for p, _ in training_grads:
            p.grad = None
        module.eval()  # deterministic gradients (no dropout), as SparseML's OBS does

        def sample(count: int):
            yield from sampler.iter_module_backwards(module, count, progress_bar=rank == 0)

        try:
            stats = obs_prune_step(
                self._weights,
                self._masks,
                [target] * len(self._weights),
                sample,
                num_grads=self._num_grads,
                damp=self._damp,
                fisher_block_size=self._fisher_block_size,
                mask_type=self._mask_type,
                global_sparsity=self._global_sparsity,
                num_recomputations=self._num_recomputations,
                last_sparsity=self._last_sparsity,
                memory_budget_gb=self._memory_budget_gb,
                other_params=others,
            )
        finally:
            module.train(was_training)
            for p, grad in training_grads:  # drops the sampler's gradients
                p.grad = grad
        self._steps_done += 1
        self._last_sparsity = [target] * len(self._weights)
        self._last_stats = stats
        self._log_step(stats, target, epoch, steps_per_epoch)

    def _log_step(self, stats, target: float, epoch: float, steps_per_epoch: int) -> None:
        _LOGGER.info(
            "!%s step %d at epoch %.4g: target %.4f achieved %.4f (grads %.1fs, fisher %.1fs, inverse %.1fs)",
            _NAME,
            self._steps_done,
            epoch,
            target,
            stats.achieved,
            stats.grad_seconds,
            stats.fisher_seconds,
            stats.inverse_seconds,
        )
        if self.loggers is None:
            return
        epoch = epoch if math.isfinite(epoch) else None
        values = {
            "target_sparsity": target,
            "achieved_sparsity": stats.achieved,
            "grad_collection_seconds": stats.grad_seconds,
            "fisher_accumulation_seconds": stats.fisher_seconds,
            "inverse_seconds": stats.inverse_seconds,
            "obs_update_seconds": stats.update_seconds,
            "num_grads": float(stats.num_grads),
            "pruning_steps_done": float(self._steps_done),
        }
        self.log_named_scalars(values.items(), epoch=epoch, steps_per_epoch=steps_per_epoch)
        for name, sparsity in zip(self._names, stats.per_param_sparsity, strict=False):
            self.log_scalar(
                sparsity, tag=f"ParamPruning/{name}", epoch=epoch, steps_per_epoch=steps_per_epoch
            )

    @property
    def masks_active(self) -> bool:
        if not self._initialized or (self._steps_done == 0 and self._resume_epoch <= 0):
            return False
        return self._leave_enabled or not self._pruning_ended

    @torch.no_grad()
    def apply_masks(self) -> None:
        for weight, mask in zip(self._weights, self._masks, strict=False):
            weight.data.mul_(mask.to(weight.dtype))

    def optimizer_post_step(self, module: Module, optimizer, epoch: float, steps_per_epoch: int) -> None:
        super().optimizer_post_step(module, optimizer, epoch, steps_per_epoch)
        if self.masks_active:  # the optimizer (momentum) may have moved pruned weights off zero
            self.apply_masks()

    def finalize(self, module: Module | None = None, reset_loggers: bool = True, **kwargs) -> None:
        if self._initialized and self._leave_enabled and self._steps_done > 0:
            self.apply_masks()
        super().finalize(module, reset_loggers, **kwargs)
        self._grad_sampler = None

    # ------------------------------------------------------------------ state (resume)
    def state_dict(self) -> dict:
        return {
            "masks": {name: mask.clone() for name, mask in zip(self._names, self._masks, strict=False)},
            "steps_done": self._steps_done,
            "last_step_epoch": self._last_step_epoch,
            "last_sparsity": self._last_sparsity,
            "ended": self._pruning_ended,
        }

    def load_state_dict(self, state_dict: dict, strict: bool = True) -> None:
        if not self._initialized:
            raise RuntimeError(f"!{_NAME}: initialize the modifier before loading its state")
        masks = state_dict.get("masks", {})
        missing = [n for n in self._names if n not in masks]
        extra = [n for n in masks if n not in self._names]
        if strict and (missing or extra):
            raise KeyError(f"!{_NAME} state: missing masks {missing}, unexpected masks {extra}")
        for i, name in enumerate(self._names):
            if name in masks:
                self._masks[i] = masks[name].to(self._weights[i].device).bool().view(self._weights[i].shape)
        self._steps_done = int(state_dict.get("steps_done", 0))
        self._last_step_epoch = state_dict.get("last_step_epoch")
        self._last_sparsity = state_dict.get("last_sparsity")
        self._pruning_ended = bool(state_dict.get("ended", False))
        if self._steps_done:
            self._started = True
            self.apply_masks()

    @property
    def last_stats(self):
        """``PruneStepStats`` of the last pruning step (timings, achieved sparsity), or None."""
        return self._last_stats

    @property
    def pruning_steps_done(self) -> int:
        return self._steps_done

    @property
    def param_names(self) -> list:
        return list(self._names)

    @property
    def keep_masks(self) -> list:
        return list(self._masks)
