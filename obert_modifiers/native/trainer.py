"""The native Trainer adapter: a recipe runs inside a Hugging Face ``Trainer`` of transformers 5,
with SparseML's lifecycle and no SparseML.

Two lines in a training script::

    from obert_modifiers.native import RecipeTrainer
    trainer = RecipeTrainer(recipe="recipes/minilm_3l_drop_prune_qat.yaml", recipe_args="final_sparsity=0.8",
                            teacher="path/to/teacher", model=model, args=args, train_dataset=train, ...)
    trainer.train()

What it does, as SparseML's ``transformers`` trainer does (docs/native.md):

- ``args.num_train_epochs`` becomes the recipe's ``max_epochs``; ``steps_per_epoch`` is SparseML's
  (``ceil(len(train_dataset) / (per_device_train_batch_size * world_size * gradient_accumulation_steps))``);
- structure that exists from epoch 0 (layer drop, QAT) is applied in ``__init__``, before the
  optimizer exists; the teacher ``'self'`` is the model as given, before that;
- around every optimizer step (after gradient clipping) the :class:`RecipeRunner` runs the modifiers'
  scheduled updates (pruning steps, the recipe's learning rate, QAT start, observer freeze) and
  keeps pruned weights at zero; a recipe with learning-rate modifiers replaces the trainer's
  scheduler by a constant one (SparseML's ``MultiplicativeLR(lambda _: 1.0)``);
- ``compute_loss`` adds distillation while a ``!OBertDistillationModifier`` is active (at
  ``state.epoch``, what SparseML passes), the loss of a micro-batch being its mean, as in SparseML;
- ``save_model`` writes ``recipe.yaml`` next to the weights (SparseML's format); every checkpoint
  also holds ``obert_native_state.pt`` (masks, pruning steps, flags), and
  ``train(resume_from_checkpoint=...)``
  rebuilds the checkpoint's structure before its weights load, so a resumed run ends as an
  uninterrupted one.

For a trainer class of your own, mix :class:`RecipeTrainerMixin` in before it:
``class MyTrainer(RecipeTrainerMixin, QuestionAnsweringTrainer)``.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from obert_modifiers.native.attention import quantize_attention, use_attention
from obert_modifiers.native.lifecycle import (
    Distillation,
    GradientSource,
    RecipeRunError,
    RecipeRunner,
    deep_copy_model,
    sparseml_steps_per_epoch,
)
from obert_modifiers.native.recipe import RecipePlan, compose, load_recipe

__all__ = ["STATE_NAME", "RecipeCallback", "RecipeTrainer", "RecipeTrainerMixin", "load_teacher"]

_LOGGER = logging.getLogger(__name__)
STATE_NAME = "obert_native_state.pt"


class RecipeCallback(TrainerCallback):
    """Calls the runner around every optimizer step (``on_pre_optimizer_step`` comes after the
    step's backward passes and gradient clipping, as SparseML's wrapped ``optimizer.step`` does)."""

    def __init__(self, runner: RecipeRunner):
        self.runner = runner

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.runner.before_optimizer_step(optimizer)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.runner.after_optimizer_step(optimizer)

    def on_train_end(self, args, state, control, **kwargs):
        self.runner.finalize()


def load_teacher(teacher: nn.Module | str | os.PathLike | None, student: nn.Module) -> nn.Module | None:
    """The distillation teacher as SparseML's trainer takes it: a model, a folder (loaded with the
    student's class, else the ``Auto`` class of the student's head), ``'self'`` (a frozen copy of
    the student as given, before any modifier changed it), or ``None`` / ``'disable'`` (off)."""
    if teacher is None or teacher == "disable":
        return None
    if teacher == "self":
        return deep_copy_model(student)
    if isinstance(teacher, nn.Module):
        model = teacher
    else:
        folder = Path(teacher)
        if not folder.is_dir():
            raise RecipeRunError(
                f"teacher {str(teacher)!r}: not a model folder (a model, a folder, 'self' or 'disable')"
            )
        model = _from_pretrained_like(student, folder)
    model.eval()
    model.requires_grad_(False)
    return model


def _from_pretrained_like(student: nn.Module, folder: Path) -> nn.Module:
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    if config.model_type == getattr(getattr(student, "config", None), "model_type", None):
        return type(student).from_pretrained(folder)
    head = type(student).__name__
    for suffix in (
        "ForSequenceClassification",
        "ForQuestionAnswering",
        "ForTokenClassification",
        "ForMaskedLM",
    ):
        if head.endswith(suffix):
            return getattr(transformers, f"AutoModel{suffix}").from_pretrained(folder)
    return transformers.AutoModel.from_pretrained(folder)


def _record_attention(model: nn.Module) -> None:
    try:
        use_attention(model)
    except ValueError as error:
        raise RecipeRunError(
            f"!OBertDistillationModifier: recipe key 'attention_weight' > 0: {error}"
        ) from None


class RecipeLR(torch.optim.lr_scheduler.MultiplicativeLR):
    """SparseML's placeholder scheduler (``MultiplicativeLR(lambda _: 1.0)``: the rate the recipe
    set stays) that reports the rate the optimizer holds, so the trainer logs the rate each step used."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        super().__init__(optimizer, _one)

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]


def _one(_epoch: int) -> float:
    return 1.0


class RecipeTrainerMixin:
    """The recipe lifecycle for a ``transformers.Trainer`` (sub)class; see the module docstring.

    :param recipe: a recipe file (``.yaml``, ``.md``), YAML text or a :class:`RecipePlan`
    :param recipe_args: variables overridden (a dict, JSON or ``k=v,k2=v2``), as ``--recipe_args``
    :param teacher: the distillation teacher (:func:`load_teacher`)
    :param model_recipe: the recipe saved with the model this run starts from (its ``recipe.yaml``,
        whose structure :func:`~obert_modifiers.native.reload.load_model` rebuilt): the saved
        ``recipe.yaml`` is then both recipes composed as SparseML's trainer composes them
        (``compose_staged``), so the new folder reloads with every stage's structure
    """

    def __init__(
        self,
        *args: Any,
        recipe: str | os.PathLike | RecipePlan,
        recipe_args: str | Mapping[str, Any] | None = None,
        teacher: nn.Module | str | os.PathLike | None = None,
        model_recipe: str | os.PathLike | RecipePlan | None = None,
        **kwargs: Any,
    ):
        plan = recipe if isinstance(recipe, RecipePlan) else load_recipe(recipe, recipe_args)
        if model_recipe is not None and not isinstance(model_recipe, RecipePlan):
            model_recipe = load_recipe(model_recipe)
        self.model_recipe = model_recipe
        model = kwargs.get("model", args[0] if args else None)
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if model is None or training_args is None:
            raise RecipeRunError("RecipeTrainer needs model= and args= (TrainingArguments)")
        if plan.max_epochs > 0:
            _LOGGER.warning("num_train_epochs set from the recipe: %s", plan.max_epochs)
            training_args.num_train_epochs = plan.max_epochs
        self.teacher = load_teacher(teacher, model)
        super().__init__(*args, **kwargs)
        # SparseML's trainer (transformers 4.40): the loss of a micro-batch is its mean, divided by
        # the accumulation steps; the KD term is a per-batch mean too
        self.model_accepts_loss_kwargs = False
        self.recipe_plan = plan
        self.recipe_runner = RecipeRunner(
            plan,
            self.model,
            gradients=GradientSource(self._recipe_batches, seed=self.args.seed),
            quantize_attention=quantize_attention,
            record_attention=_record_attention,
            output_dir=self.args.output_dir,
            tokenizer=self.processing_class,
        )
        if self.optimizer is not None and any(
            m.start_epoch <= 0 for m in plan.modifiers if m.tag in ("LayerDropModifier",)
        ):
            raise RecipeRunError(
                f"{plan.source}: !LayerDropModifier changes the parameters before training; "
                "let the trainer create the optimizer (do not pass optimizers=...)"
            )
        self.recipe_runner.apply_structure()
        if self.recipe_runner.has_distillation:
            if self.teacher is None:
                _LOGGER.warning(
                    "the recipe distils but no teacher was given (teacher=...): distillation is off"
                )
            else:
                self.teacher.to(self.args.device)
                self._teacher_columns = set(inspect.signature(self.teacher.forward).parameters)
                self.recipe_runner.prepare_distillation(self.teacher)
        self.add_callback(RecipeCallback(self.recipe_runner))

    # lifecycle ---------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        runner = self.recipe_runner
        if self.train_dataset is None or not hasattr(self.train_dataset, "__len__"):
            raise RecipeRunError(
                "RecipeTrainer needs a train_dataset with a length (SparseML's steps per epoch)"
            )
        runner.steps_per_epoch = sparseml_steps_per_epoch(
            len(self.train_dataset),
            self.args.per_device_train_batch_size,
            self.args.world_size,
            self.args.gradient_accumulation_steps,
        )
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        if resume_from_checkpoint:
            self._resume_recipe(Path(resume_from_checkpoint))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _resume_recipe(self, checkpoint: Path) -> None:
        path = checkpoint / STATE_NAME
        if not path.is_file():
            raise RecipeRunError(f"{checkpoint}: no {STATE_NAME}; it was not saved by RecipeTrainer")
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("steps_per_epoch") != self.recipe_runner.steps_per_epoch:
            raise RecipeRunError(
                f"{checkpoint}: trained with {state.get('steps_per_epoch')} steps per epoch, now "
                f"{self.recipe_runner.steps_per_epoch}: resume with the same data, batch size and devices"
            )
        self.recipe_runner.structure_state(state)
        self.recipe_runner.load_state_dict(state)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The trainer's log, with the recipe's epoch and the latest modifier values (pruning targets
        and achieved sparsity, ZipLM speed-ups, observer freeze) while training."""
        if "loss" in logs:
            logs = {**logs, "recipe_epoch": self.recipe_runner.epoch, **self.recipe_runner.metrics}
        super().log(logs, *args, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_scheduler is None and self.recipe_runner.has_lr_modifiers:
            # the recipe sets the rate before every optimizer step; this scheduler leaves it alone
            self.lr_scheduler = RecipeLR(optimizer or self.optimizer)
            self._created_lr_scheduler = True
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)

    def compute_loss(
        self, model: nn.Module, inputs: dict, return_outputs: bool = False, num_items_in_batch=None
    ):
        runner = self.recipe_runner
        epoch = self.state.epoch or 0.0
        if self.teacher is None or not any(d.active(epoch) for d in runner.of_type(Distillation)):
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        extra = {"output_attentions": True} if runner.wants_attentions(epoch) else {}
        outputs = model(**inputs, **extra)
        task_loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs[0]
        teacher_inputs = {k: v for k, v in inputs.items() if k in self._teacher_columns}
        loss = runner.distillation_loss(task_loss, outputs, self.teacher, teacher_inputs, epoch)
        return (loss, outputs) if return_outputs else loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            plan = compose(self.model_recipe, self.recipe_plan) if self.model_recipe else self.recipe_plan
            plan.save(output_dir or self.args.output_dir)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = (
                Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            torch.save(self.recipe_runner.state_dict(), folder / STATE_NAME)

    # data for the modifiers --------------------------------------------------------------------
    def _recipe_batches(self, batch_size: int | None, generator: torch.Generator | None) -> Iterator[dict]:
        """The train dataset as SparseML's gradient sampler reads it (the compat fix
        ``grad_sampler_loader``): unused columns removed, the trainer's collator, shuffled with
        ``generator``, ``batch_size`` (the recipe's ``grad_sampler_kwargs``) or the train batch size."""
        dataset, collator = self.train_dataset, self.data_collator
        if hasattr(dataset, "column_names"):
            dataset = self._remove_unused_columns(dataset, description="gradient sampling")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="gradient sampling")
        loader = DataLoader(
            dataset,
            batch_size=batch_size or self.args.per_device_train_batch_size,
            shuffle=True,
            collate_fn=collator,
            generator=generator,
            num_workers=self.args.dataloader_num_workers,
        )
        while True:
            yield from (self._prepare_inputs(batch) for batch in loader)


class RecipeTrainer(RecipeTrainerMixin, Trainer):
    """``transformers.Trainer`` running a recipe (:class:`RecipeTrainerMixin`)."""
