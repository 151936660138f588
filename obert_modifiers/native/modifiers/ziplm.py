"""``!ZipLMPruningModifier``: structured OBS steps to speed-up targets."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from obert_modifiers.native.modifiers.base import (
    NativeModifier,
    RecipeRunError,
    StepContext,
)
from obert_modifiers.native.recipe import PlannedModifier, RecipePlan

if TYPE_CHECKING:
    from obert_modifiers.native.lifecycle import RecipeRunner

_LOGGER = logging.getLogger(__name__)


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
        from obert_modifiers.latency import LatencyTableError, read_table_file, require_runtime

        p = self.params
        if self.steps_done < len(self.targets):  # fail before training, not at the step
            try:
                shrink.encoder_layers(runner.model)
                if p.latency_table_file is None:  # a table file needs no runtime here
                    require_runtime(p.latency_runtime)
                else:  # a missing or unfit table file fails here (its depth at the step: a drop may
                    # come first)
                    read_table_file(p.latency_table_file, runner.model.config, depth=False, **self._setting())
            except (shrink.ShrinkError, LatencyTableError) as error:
                raise RecipeRunError(f"!{self.tag}: {error}") from None

    def _table(self, model):
        from obert_modifiers.latency import latency_table

        p = self.params
        return latency_table(
            model.config, cache_dir=p.latency_cache_dir, progress=False, table_file=p.latency_table_file,
            **self._setting(),
        )

    def _setting(self) -> dict:
        p = self.params
        return {
            "runtime": p.latency_runtime, "threads": p.latency_threads, "batch_size": p.latency_batch_size,
            "sequence_length": p.latency_sequence_length, "precision": p.latency_precision,
        }  # fmt: skip

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

        began = time.perf_counter()  # the step's cost, as the SparseML adapter logs it (table included)
        p, model, runner = self.params, ctx.model, ctx.runner
        if runner.gradients is None:
            raise RecipeRunError(f"!{self.tag} needs calibration data: give the trainer a train_dataset")
        step, target = self.steps_done, self.targets[self.steps_done]
        try:
            layers = shrink.encoder_layers(model)
        except shrink.ShrinkError as error:
            raise RecipeRunError(f"!{self.tag}: {error}") from None
        if self.table is None:
            self.table = self._table(model)
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
        search = (
            latency_search.search_uniform if p.allocation == "uniform" else latency_search.search_structure
        )
        choice = search(self.table, [db.errors for db in attention], [db.errors for db in ffn], target)
        slices = ziplm.apply_choice(model, attention, ffn, choice, weight_update=p.weight_update)
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
        _LOGGER.info("!%s step %d: target %gx, predicted %.3gx; heads %s, FFN %s; %.1f s", self.tag,
                     self.steps_done, target, choice.speedup, structure["heads"], structure["ffn"],
                     time.perf_counter() - began)  # fmt: skip

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
