"""``!ZipLMPruningModifier``: structured second-order pruning to speed-up targets (ZipLM; SparseML
adapter, lifecycle only: the math is in :mod:`obert_modifiers.algorithms.structured_obs`,
:mod:`~obert_modifiers.algorithms.latency_search` and :mod:`~obert_modifiers.algorithms.shrink`,
the latency tables in :mod:`obert_modifiers.latency`).

Recipe keys (:class:`~obert_modifiers.params.ZipLMPruningParams`)::

    - !ZipLMPruningModifier
      start_epoch: 0.0
      update_frequency: 1.0            # epochs between steps
      speedup_targets: [2.0, 3.0]      # one step per target; each step's model is saved
      structures: [heads, ffn_neurons, attention_blocks, ffn_blocks]
      num_calibration_samples: 1024
      calibration_batch_size: 32
      damp: 0.01                       # H + damp * mean(diag H) * I
      ffn_chunk: 16
      allocation: search               # search | uniform (same width in every layer; an ablation)
      weight_update: true              # false: remove without the OBS update (an ablation)
      latency_runtime: onnxruntime     # onnxruntime (measured, cached on disk) | flops
      latency_threads: 2
      latency_batch_size: 1
      latency_sequence_length: 128
      latency_precision: fp32          # int8 when QAT follows
      latency_cache_dir: null
      latency_table_file: null         # a table measured on the deployment machine (obert latency-table)
      # written by the modifier after every step (the saved recipe.yaml re-checks them on reload):
      structure: null                  # {format: 1, heads: [per layer], ffn: [per layer]}
      steps_done: 0

Lifecycle. ``initialize`` takes the trainer's ``grad_sampler`` (its train data). Step ``k`` runs in
``update`` at ``start_epoch + k * update_frequency``: calibration batches drawn with seed
``seed + k`` (a resumed or repeated run draws the same ones; the training RNG is left alone) feed
forward pre-hooks on every attention output projection and FFN output projection (input Hessians);
a structured-OBS database per block; the latency table (cached) and the search for the step's
target; the physical shrink with the OBS-updated weights; the optimizer then holds the new
parameters, its state (Adam moments) sliced to the kept rows/columns. The structure goes into the
model config (``obert_structure``, ``pruned_heads``, ``obert_ziplm`` with the prediction) and into
this modifier's ``structure`` key, so the saved ``recipe.yaml`` records it.

With a list of targets, before step ``k+1`` prunes (and at ``finalize`` for the last one) the model
at target ``k`` is saved, staged and renamed into place, to ``<output_dir>/ziplm-<target>x/`` (the
trainer's ``output_dir``, or ``save_dir`` when given through ``grad_sampler``).

Reload (``apply_structure``, e.g. ``epoch=inf`` from ``obert export`` or SparseML's recipe reload):
a model built from the saved ``config.json`` already has the shapes (transformers re-applies
``pruned_heads``; the ``structure_config`` compat fix re-applies ``obert_structure``); the modifier
checks that they equal the recorded ``structure`` and swaps in the exportable stand-ins for removed
blocks. A model with other shapes is refused: giving it the shapes here would leave random weights
where SparseML's reload (which reloads only when parameter *names* change) keeps none.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from sparseml.optim import BaseModifier
from sparseml.pytorch.sparsification.modifier import PyTorchModifierYAML, ScheduledUpdateModifier
from sparseml.sparsification import SparsificationTypes
from torch import nn

from obert_modifiers.algorithms import latency_search, shrink, ziplm
from obert_modifiers.algorithms import structured_obs as sobs
from obert_modifiers.algorithms.ziplm import (  # noqa: F401 - re-exported: they lived here
    _Block,
    _block,
    _single_thread,
    family_dir_name,
    move_optimizer_state,
    prediction,
)
from obert_modifiers.modifiers._base import recipe_properties, store_recipe
from obert_modifiers.params import ZipLMPruningParams, validate_recipe

__all__ = ["ZipLMPruningModifier", "ZIPLM_KEY", "move_optimizer_state", "family_dir_name", "resume_structure"]

_LOGGER = logging.getLogger(__name__)
_NAME = "ZipLMPruningModifier"
ZIPLM_KEY = "obert_ziplm"  # config key: the last step's target, prediction and latency key


@PyTorchModifierYAML()
@recipe_properties(ZipLMPruningParams)
class ZipLMPruningModifier(ScheduledUpdateModifier):
    """Remove attention heads, FFN neurons and whole blocks with structured OBS until the latency table
    predicts each speed-up target (recipe keys: :class:`~obert_modifiers.params.ZipLMPruningParams`)."""

    def __init__(self, **recipe: Any):
        params = validate_recipe(ZipLMPruningParams, recipe)
        store_recipe(self, params)
        self._targets = params.step_targets
        super().__init__(
            start_epoch=params.start_epoch,
            min_start=0.0,
            end_epoch=params.last_step_epoch if params.end_epoch == -1 else params.end_epoch,
            min_end=0.0,
            end_comparator=0,
            update_frequency=params.update_frequency,
            min_frequency=0.0,
        )
        self._grad_sampler: dict | None = None
        self._trainer: Any = None
        self._module: nn.Module | None = None
        self._last_choice: latency_search.StructureChoice | None = None
        self._table: latency_search.LatencyTable | None = None
        self._saved: list[Path] = []
        self._resume_epoch = 0.0  # the checkpoint's epoch when training resumed (apply_structure)

    @BaseModifier.sparsification_types.getter
    def sparsification_types(self) -> list[SparsificationTypes]:
        return [SparsificationTypes.structured]

    # ------------------------------------------------------------------ lifecycle
    def apply_structure(self, module: nn.Module, epoch: float = 0.0, loggers=None, finalize=False, **kwargs):
        """Check a reloaded model against the recorded ``structure`` and swap in the stand-ins; a
        model whose shapes differ is refused (its weights could not be the trained ones)."""
        if math.isfinite(epoch) and epoch > 0:
            # SparseML resumes with the checkpoint's epoch here, then counts its steps from 0 again
            self._resume_epoch = float(epoch)
        recorded = self._structure
        if recorded is None:
            return  # nothing pruned yet: a fresh run
        try:
            current = shrink.read_structure(module)
        except shrink.ShrinkError as error:
            raise RuntimeError(f"!{_NAME}: cannot re-apply the recorded structure: {error}") from None
        if (current["heads"], current["ffn"]) != (recorded["heads"], recorded["ffn"]):
            raise RuntimeError(
                f"!{_NAME}: the recipe records heads {recorded['heads']} and FFN widths {recorded['ffn']} "
                f"per layer, but the model has heads {current['heads']} and FFN widths {current['ffn']}; "
                "load the model folder saved with this recipe (its config.json records obert_structure: "
                "from_pretrained, or obert_modifiers.algorithms.shrink.load_shrunk_model) instead of "
                "re-shaping another model, which would leave random weights"
            )
        shrink.apply_structure(module, recorded)  # stand-ins for removed blocks (weights kept)

    def initialize(self, module: nn.Module, epoch: float = 0, loggers=None, **kwargs: Any) -> None:
        super().initialize(module, epoch, loggers, **kwargs)
        self._module = module
        sampler = kwargs.get("grad_sampler")
        pending = self._steps_done < len(self._targets)
        if pending and (not isinstance(sampler, dict) or "data_loader_builder" not in sampler):
            raise RuntimeError(
                f"!{_NAME} needs calibration data: initialize it with grad_sampler={{'data_loader_builder': "
                "fn(kwargs)}} (SparseML's transformers Trainer passes it; with a manager of your own call "
                "manager.initialize(model, grad_sampler=...))"
            )
        if pending and self._latency_table_file is not None:
            from obert_modifiers.latency import read_table_file

            # a missing or unfit table file fails here, not an epoch later (the depth is checked at
            # the step: a layer drop may come first)
            read_table_file(self._latency_table_file, module.config, depth=False, **self._latency_setting())
        elif pending:  # a table file needs no runtime here
            from obert_modifiers.latency import require_runtime

            require_runtime(self._latency_runtime)  # a missing runtime fails here, not an epoch later
        self._grad_sampler = sampler
        builder = sampler.get("data_loader_builder") if isinstance(sampler, dict) else None
        self._trainer = getattr(builder, "__self__", None)  # the trainer, when the builder is its method
        if math.isinf(epoch):  # one-shot (manager.apply): every step at once
            while self._steps_done < len(self._targets):
                self._step(module, None)

    def update_ready(self, epoch: float, steps_per_epoch: int) -> bool:
        if not self._enabled or not self._initialized or self._steps_done >= len(self._targets):
            return False
        due = self.start_epoch + self._steps_done * self.update_frequency
        return self._schedule_epoch(epoch) >= due - 1e-9

    def _schedule_epoch(self, epoch: float) -> float:
        """The epoch on the recipe's schedule: SparseML's step counter restarts at 0 when training
        resumes from a checkpoint, so the checkpoint's epoch is added back."""
        return epoch + self._resume_epoch if math.isfinite(epoch) else epoch

    def scheduled_update(self, module: nn.Module, optimizer, epoch: float, steps_per_epoch: int) -> None:
        if not self.update_ready(epoch, steps_per_epoch):
            raise RuntimeError("update_ready returns False, this must be true to call scheduled_update")
        self._schedule_called = True
        try:
            self.update(module, optimizer, epoch=epoch, steps_per_epoch=steps_per_epoch)
        finally:
            self._schedule_called = False
        self._started = True
        if self._steps_done >= len(self._targets):
            self._ended = True

    def update(self, module: nn.Module, optimizer, epoch: float, steps_per_epoch: int) -> None:
        super().update(module, optimizer, epoch, steps_per_epoch)
        if self._steps_done and len(self._speedup_targets) > 1:
            self._save_member(module, self._targets[self._steps_done - 1])
        self._step(module, optimizer, epoch, steps_per_epoch)

    def finalize(self, module: nn.Module | None = None, reset_loggers: bool = True, **kwargs: Any) -> None:
        module = module if module is not None else self._module
        if module is not None and len(self._speedup_targets) > 1 and self._steps_done == len(self._targets):
            self._save_member(module, self._targets[-1])
        self._grad_sampler = None
        self._trainer = None
        super().finalize(module, reset_loggers, **kwargs)

    # ------------------------------------------------------------------ one pruning step
    def _latency_table(self, module: nn.Module) -> latency_search.LatencyTable:
        from obert_modifiers.latency import latency_table

        if self._table is None:
            self._table = latency_table(
                module.config,
                cache_dir=self._latency_cache_dir,
                table_file=self._latency_table_file,
                **self._latency_setting(),
            )
        return self._table

    def _latency_setting(self) -> dict[str, Any]:
        return {
            "runtime": self._latency_runtime,
            "threads": self._latency_threads,
            "batch_size": self._latency_batch_size,
            "sequence_length": self._latency_sequence_length,
            "precision": self._latency_precision,
        }

    def _step(self, module: nn.Module, optimizer, epoch: float = math.inf, steps_per_epoch: int = 1) -> None:
        # calibration batches (seed + step) and the new layers' initialisation draw from a forked RNG:
        # a step chooses the same structure on a re-run and leaves the training RNG where it was
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        devices = [torch.cuda.current_device()] if cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self._seed + self._steps_done)
            self._step_seeded(module, optimizer, epoch, steps_per_epoch)

    def _step_seeded(self, module: nn.Module, optimizer, epoch: float, steps_per_epoch: int) -> None:
        began = time.perf_counter()
        step = self._steps_done
        target = self._targets[step]
        layers = shrink.encoder_layers(module)
        table = self._latency_table(module)
        was_training = module.training
        module.eval()
        try:
            hessians = self._calibrate(module, layers, step)
            with _single_thread():
                attention, ffn = self._databases(layers, hessians, table)
        finally:
            module.train(was_training)
        search = (
            latency_search.search_uniform
            if self._allocation == "uniform"
            else latency_search.search_structure
        )
        choice = search(table, [db.errors for db in attention], [db.errors for db in ffn], target)
        slices = ziplm.apply_choice(module, attention, ffn, choice, weight_update=self._weight_update)
        move_optimizer_state(optimizer, slices)
        self._record(module, target, choice, table)
        self._log_step(choice, target, epoch, steps_per_epoch, time.perf_counter() - began)

    def _calibration_batches(self, step: int):
        builder = self._grad_sampler["data_loader_builder"]
        loader = builder({"batch_size": self._calibration_batch_size})
        seen = 0
        for item in loader:
            sample = item[1] if isinstance(item, list | tuple) and len(item) == 3 else item
            if not isinstance(sample, dict):
                raise RuntimeError(
                    f"!{_NAME}: calibration batches must be dicts of model inputs, got {type(sample)}"
                )
            sample = {k: v for k, v in sample.items() if k != "labels"}
            yield sample
            seen += len(next(iter(sample.values())))
            if seen >= self._num_calibration_samples:
                return

    def _calibrate(self, module: nn.Module, layers, step: int) -> dict[str, sobs.InputHessian]:
        batches = self._calibration_batches(step)
        return ziplm.calibrate(module, layers, batches, self._num_calibration_samples, step)

    def _databases(self, layers, hessians, table) -> tuple[list, list]:
        return ziplm.databases(layers, hessians, table, self._structures, self._damp, self._ffn_chunk)

    def _record(self, module: nn.Module, target: float, choice, table) -> None:
        structure = shrink.read_structure(module)
        self._structure = structure
        self._steps_done += 1
        self._last_choice = choice
        module.config.update({ZIPLM_KEY: prediction(choice, table, target)})

    def _log_step(self, choice, target: float, epoch: float, steps_per_epoch: int, seconds: float) -> None:
        _LOGGER.info(
            "!%s step %d: target %gx, predicted %.3gx (%.4g of %.4g %s); heads %s, FFN %s; %.1f s",
            _NAME, self._steps_done, target, choice.speedup, choice.predicted, choice.dense,
            self._table.unit, self._structure["heads"], self._structure["ffn"], seconds,
        )  # fmt: skip
        if self.loggers is not None:
            values = {"ziplm_target_speedup": target, "ziplm_predicted_speedup": choice.speedup}
            epoch = epoch if math.isfinite(epoch) else None
            self.log_named_scalars(values.items(), epoch=epoch, steps_per_epoch=steps_per_epoch)

    # ------------------------------------------------------------------ family members
    def _family_root(self) -> Path | None:
        root = os.environ.get("OBERT_ZIPLM_FAMILY_DIR")
        if root:
            return Path(root)
        args = getattr(self._trainer, "args", None)
        out = getattr(args, "output_dir", None)
        return Path(out) if out else None

    def _save_member(self, module: nn.Module, target: float) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_rank() != 0:
                return  # one writer
        root = self._family_root()
        if root is None:
            hint = "no trainer; set OBERT_ZIPLM_FAMILY_DIR"
            _LOGGER.warning("!%s: no output folder for the %gx model (%s)", _NAME, target, hint)
            return
        from obert_modifiers.deployment import atomic_write_text, staged_dir

        folder = root / family_dir_name(target)
        structure = shrink.read_structure(module)
        with staged_dir(folder, overwrite=True) as stage:
            module.config.update({shrink.STRUCTURE_KEY: structure})
            module.save_pretrained(stage, safe_serialization=False)
            tokenizer = getattr(self._trainer, "tokenizer", None)
            if tokenizer is not None:
                tokenizer.save_pretrained(stage)
            atomic_write_text(Path(stage) / "recipe.yaml", self._member_recipe(structure))
        self._saved.append(folder)
        _LOGGER.info("!%s: saved the %gx model to %s", _NAME, target, folder)

    def _member_recipe(self, structure: dict) -> str:
        """A recipe that re-applies exactly this member's structure (and nothing else) on reload."""
        import yaml

        keys = {
            "speedup_targets": [float(t) for t in self._speedup_targets[: self._steps_done]],
            "start_epoch": float(self.start_epoch),
            "update_frequency": float(self.update_frequency),
            "structures": list(self._structures),
            "latency_runtime": self._latency_runtime,
            "latency_threads": self._latency_threads,
            "latency_batch_size": self._latency_batch_size,
            "latency_sequence_length": self._latency_sequence_length,
            "latency_precision": self._latency_precision,
            "structure": structure,
            "steps_done": self._steps_done,
        }
        if len(keys["speedup_targets"]) != self._steps_done:  # one target, several steps
            keys["speedup_targets"] = [float(self._targets[self._steps_done - 1])]
            keys["steps_done"] = 1
        body = yaml.safe_dump(keys, sort_keys=False, default_flow_style=None)
        lines = "".join(f"    {line}\n" for line in body.splitlines())
        return f"version: 1.1.0\n\nmodifiers:\n  - !{_NAME}\n{lines}"

    @property
    def saved_members(self) -> list[Path]:
        """Folders of the family members saved so far."""
        return list(self._saved)

    @property
    def last_choice(self) -> latency_search.StructureChoice | None:
        return self._last_choice


def resume_structure(model: nn.Module, manager: Any, checkpoint: str | os.PathLike) -> bool:
    """Resuming from ``checkpoint`` (``--resume_from_checkpoint``) between two pruning steps: give the
    freshly built ``model`` the shapes the checkpoint's ``config.json`` records (its heads through
    transformers' ``prune_heads``, then the FFN widths and stand-ins) so that the checkpoint's weights
    and optimizer state fit, and give every ``!ZipLMPruningModifier`` of ``manager`` (the run's recipe,
    in order) the ``structure`` and ``steps_done`` the checkpoint's ``recipe.yaml`` records, so that it
    continues with the next step. Returns whether the checkpoint held a structure. Compat fix
    ``ziplm_resume`` calls it before SparseML applies the recipe and reloads the weights."""
    import json

    folder = Path(checkpoint)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    recorded = config.get(shrink.STRUCTURE_KEY)
    if not isinstance(recorded, dict):
        return False
    mine = _ziplm_modifiers(manager)
    saved = []
    if (folder / "recipe.yaml").is_file():
        from sparseml.pytorch.optim import ScheduledModifierManager

        saved = _ziplm_modifiers(ScheduledModifierManager.from_yaml(str(folder / "recipe.yaml")))
    if len(saved) != len(mine):
        raise RuntimeError(
            f"!{_NAME}: {folder} was saved by a recipe with {len(saved)} {_NAME}(s), the run's recipe has "
            f"{len(mine)}; resume with the recipe the checkpoint was trained with"
        )
    pruned = {int(k): list(v) for k, v in (config.get("pruned_heads") or {}).items()}
    have = {int(k): sorted(v) for k, v in (getattr(model.config, "pruned_heads", None) or {}).items()}
    if pruned and pruned != have:
        model.prune_heads({k: sorted(set(v) - set(have.get(k, []))) for k, v in pruned.items()})
    model.config.update({shrink.STRUCTURE_KEY: recorded, ZIPLM_KEY: config.get(ZIPLM_KEY)})
    shrink.apply_structure(model, recorded)
    for modifier, source in zip(mine, saved, strict=True):
        modifier._structure, modifier._steps_done = source._structure, source._steps_done
    _LOGGER.info(
        "!%s: resuming from %s after %s pruning step(s): heads %s, FFN %s",
        _NAME, folder, [m._steps_done for m in mine], recorded.get("heads"), recorded.get("ffn"),
    )  # fmt: skip
    return True


def _ziplm_modifiers(manager: Any) -> list[ZipLMPruningModifier]:
    modifiers = getattr(manager, "iter_modifiers", None)
    found = modifiers() if callable(modifiers) else getattr(manager, "modifiers", []) or []
    return [m for m in found if isinstance(m, ZipLMPruningModifier)]
