"""``!OBertDistillationModifier``: knowledge distillation from a teacher (SparseML adapter; the losses
are in :mod:`obert_modifiers.algorithms.distillation`).

Recipe keys::

    - !OBertDistillationModifier
      start_epoch: 0.0
      end_epoch: -1            # -1: until training ends
      hardness: 1.0            # loss = (1 - hardness) * task + hardness * KD   (SparseML semantics)
      temperature: 2.0         # KD = KL(softmax(t/T) || softmax(s/T)) * T^2    (SparseML's formula)
      distill_output_keys: [logits]   # [start_logits, end_logits] for question answering
      teacher_input_keys: null # inputs given to the teacher (default: the student's, without labels)
      hidden_weight: 0.0       # + hidden_weight * MSE(proj(student layer i), teacher layer map[i])
      attention_weight: 0.0    # + attention_weight * KL(teacher attention || student attention)
      layer_map: null          # student layer i -> teacher layer; default: config.obert_layer_map

The teacher is the trainer's ``distillation_teacher`` (stock CLIs: ``--distill_teacher PATH``), or
``self``: the model as it was before any modifier changed it. SparseML applies structural modifiers
(layer drop, QAT) before it initializes the others, so a copy taken at ``initialize`` would already
be changed; instead the teacher is rebuilt from the checkpoint the model was loaded from
(``config._name_or_path``, which the stock scripts set to ``--model_name_or_path``). Only when the model
has no such folder (a plain module in a script) is a deep copy of the module at ``initialize`` used.
The teacher lives in this modifier, never in the model: it runs in eval mode under ``no_grad`` and is
never saved. Learned projections (hidden sizes that differ) are added to the optimizer as an extra
parameter group that is left out of the optimizer's ``state_dict``.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import torch
from sparseml.optim import BaseModifier
from sparseml.pytorch.sparsification.modifier import PyTorchModifierYAML, ScheduledUpdateModifier
from sparseml.sparsification import SparsificationTypes
from torch import nn

from obert_modifiers.algorithms import distillation as algo
from obert_modifiers.algorithms.layer_drop import LAYER_MAP_KEY, find_encoder_layers
from obert_modifiers.modifiers._base import RecipeParameterError, recipe_properties, store_recipe
from obert_modifiers.params import OBertDistillationParams, validate_recipe

_LOGGER = logging.getLogger(__name__)
_NAME = "OBertDistillationModifier"
PROJECTION_GROUP_KEY = "obert_distillation_projections"
DEFAULT_OUTPUT_KEYS = ("logits", "start_logits", "end_logits")


@PyTorchModifierYAML()
@recipe_properties(
    OBertDistillationParams,
    settable=(
        "hardness",
        "temperature",
        "distill_output_keys",
        "teacher_input_keys",
        "hidden_weight",
        "attention_weight",
        "layer_map",
    ),
)
class OBertDistillationModifier(ScheduledUpdateModifier):
    """Logit (+ optional hidden-state and attention) distillation with SparseML's hardness/temperature
    (recipe keys: :class:`~obert_modifiers.params.OBertDistillationParams`)."""

    def __init__(self, **recipe: Any):
        params = validate_recipe(OBertDistillationParams, recipe)
        super().__init__(
            start_epoch=params.start_epoch,
            end_epoch=params.end_epoch,
            update_frequency=params.update_frequency,
            end_comparator=-1,
        )
        store_recipe(self, params)
        self._reset_state()

    def _reset_state(self) -> None:
        self._teacher: nn.Module | None = None
        self._enabled_kd = False
        self._student_hooks: list = []
        self._teacher_hooks: list = []
        self._hooked_student_ids: tuple = ()
        self._student_cache: dict = {"hidden": {}, "attention": {}}
        self._teacher_cache: dict = {"hidden": {}, "attention": {}}
        self._pairs: list | None = None
        self._projections: nn.ModuleDict | None = None
        self._projection_optimizer = None
        self._logged: dict = {}

    # ------------------------------------------------------------------ recipe keys
    @BaseModifier.sparsification_types.getter
    def sparsification_types(self) -> list:
        # distillation: SparseML's HF trainer only calls loss_update when some modifier declares it
        return [SparsificationTypes.distillation]

    @property
    def teacher(self) -> nn.Module | None:
        """The teacher module in use (``None`` before ``initialize`` / when disabled)."""
        return self._teacher

    # ------------------------------------------------------------------ lifecycle
    def initialize(
        self,
        module: nn.Module,
        epoch: float = 0,
        loggers=None,
        distillation_teacher: nn.Module | str | None = "disable",
        **kwargs: Any,
    ) -> None:
        super().initialize(module, epoch, loggers, **kwargs)
        if distillation_teacher is None or distillation_teacher == "disable":
            _LOGGER.warning(
                f"!{_NAME}: no distillation teacher given (--distill_teacher); distillation is off"
            )
            return
        if distillation_teacher == "self":
            teacher = self._rebuild_original(module)
        elif isinstance(distillation_teacher, nn.Module):
            teacher = distillation_teacher
        else:
            raise ValueError(
                f"!{_NAME}: distillation_teacher must be a model, 'self' or 'disable', "
                f"got {distillation_teacher!r}"
            )
        teacher.eval()
        teacher.requires_grad_(False)
        self._teacher = teacher
        self._enabled_kd = True
        if self._hidden_weight or self._attention_weight:
            self._hook_teacher()
            self._hook_student(module)

    def loss_update(
        self,
        loss: torch.Tensor,
        module: nn.Module,
        optimizer,
        epoch: float,
        steps_per_epoch: int,
        student_outputs: Any = None,
        student_inputs: Any = None,
        teacher_inputs: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        loss = super().loss_update(loss, module, optimizer, epoch, steps_per_epoch, **kwargs)
        if not self._enabled_kd or not self._active(epoch):
            return loss
        if student_outputs is None or student_inputs is None:
            raise ValueError(f"!{_NAME}: loss_update needs student_outputs and student_inputs")
        wants_layers = bool(self._hidden_weight or self._attention_weight)
        if wants_layers:
            self._hook_student(module)
        teacher_outputs = self._run_teacher(student_inputs, teacher_inputs)
        kd = algo.logit_distillation_loss(
            student_outputs, teacher_outputs, self._temperature, self._output_keys(student_outputs)
        )
        hidden = attention = None
        if wants_layers:
            hidden, attention = self._layer_losses(module, student_inputs)
        total = algo.combine_losses(
            loss, kd, self._hardness, hidden, self._hidden_weight, attention, self._attention_weight
        )
        terms = {"task_loss": loss, "distillation_loss": kd, "total_loss": total}
        terms.update({"hidden_loss": hidden, "attention_loss": attention})
        self._logged = {k: v.detach() for k, v in terms.items() if v is not None}
        return total

    def optimizer_pre_step(self, module: nn.Module, optimizer, epoch: float, steps_per_epoch: int) -> None:
        super().optimizer_pre_step(module, optimizer, epoch, steps_per_epoch)
        if self._projections is not None and self._projection_optimizer is not optimizer:
            self._add_projection_group(optimizer)
        if self._projection_optimizer is optimizer:  # follow the model's learning rate schedule
            group = next(g for g in optimizer.param_groups if g.get(PROJECTION_GROUP_KEY))
            group["lr"] = optimizer.param_groups[0]["lr"]

    def log_update(self, module: nn.Module, optimizer, epoch: float, steps_per_epoch: int) -> None:
        super().log_update(module, optimizer, epoch, steps_per_epoch)
        if self._logged:
            pairs = [
                (k, float(v.detach()) if torch.is_tensor(v) else float(v)) for k, v in self._logged.items()
            ]
            self.log_named_scalars(name_value_pairs=pairs, epoch=epoch, steps_per_epoch=steps_per_epoch)

    def finalize(self, module: nn.Module | None = None, reset_loggers: bool = True, **kwargs: Any) -> None:
        super().finalize(module, reset_loggers, **kwargs)
        for handle in self._student_hooks + self._teacher_hooks:
            handle.remove()
        self._reset_state()

    # ------------------------------------------------------------------ internals
    def _active(self, epoch: float | None) -> bool:
        epoch = 0.0 if epoch is None else epoch
        started = self.start_epoch == -1 or epoch >= self.start_epoch
        ended = self.end_epoch != -1 and epoch >= self.end_epoch
        return started and not ended

    def _output_keys(self, student_outputs: Any) -> list | None:
        if self._distill_output_keys:
            return self._distill_output_keys
        if isinstance(student_outputs, dict):
            keys = [k for k in DEFAULT_OUTPUT_KEYS if k in student_outputs]
            return keys or None
        return None

    def _rebuild_original(self, module: nn.Module) -> nn.Module:
        source = getattr(getattr(module, "config", None), "_name_or_path", None)
        if source and os.path.isdir(source) and hasattr(type(module), "from_pretrained"):
            teacher, info = type(module).from_pretrained(source, output_loading_info=True)
            missing = info.get("missing_keys") or []
            prefix = f"{getattr(type(module), 'base_model_prefix', '')}."
            head = [name for name in missing if prefix == "." or not name.startswith(prefix)]
            if head:  # a base checkpoint (MiniLM-L6 as shipped): the task head would be random
                raise RuntimeError(
                    f"!{_NAME}: teacher 'self' is rebuilt from {source}, which has no task head "
                    f"(missing {head[:4]}): a base checkpoint, so the teacher's logits would be random. "
                    "Fine-tune a teacher on the task first (e.g. recipes/minilm_teacher.yaml) and pass "
                    "--distill_teacher PATH_TO_IT, or start this run from that fine-tuned checkpoint"
                )
            if missing:
                raise RuntimeError(
                    f"!{_NAME}: teacher 'self' is rebuilt from {source}, but loading it misses weights "
                    f"{missing[:5]}... (a checkpoint that only loads with its recipe, e.g. QAT); pass "
                    "--distill_teacher PATH to a plain checkpoint instead"
                )
            _LOGGER.info(f"!{_NAME}: teacher 'self' = the model as loaded from {source}, before any modifier")
            return teacher.to(next(module.parameters()).device)
        _LOGGER.warning(
            f"!{_NAME}: teacher 'self': the model has no checkpoint folder (config._name_or_path); using a "
            "copy of the model as it is now, which includes structural changes already applied"
        )
        return copy.deepcopy(module)

    def _teacher_inputs(self, student_inputs: Any, teacher_inputs: Any) -> Any:
        if teacher_inputs is not None:
            return teacher_inputs
        if isinstance(student_inputs, dict):
            if self._teacher_input_keys:
                return {k: student_inputs[k] for k in self._teacher_input_keys}
            return {k: v for k, v in student_inputs.items() if k != "labels"}
        return student_inputs

    @torch.no_grad()
    def _run_teacher(self, student_inputs: Any, teacher_inputs: Any) -> Any:
        inputs = self._teacher_inputs(student_inputs, teacher_inputs)
        device = _device_of(inputs)
        teacher = self._teacher
        if device is not None and next(teacher.parameters()).device != device:
            teacher.to(device)
        teacher.eval()
        if isinstance(inputs, dict):
            return teacher(**inputs)
        if isinstance(inputs, (list, tuple)):
            return teacher(*inputs)
        return teacher(inputs)

    # hidden states / attention --------------------------------------------------------
    def _hook_teacher(self) -> None:
        _, layers = find_encoder_layers(self._teacher)
        self._teacher_hooks = _cache_hooks(layers, self._teacher_cache, self._attention_weight > 0, False)

    def _hook_student(self, module: nn.Module) -> None:
        _, layers = find_encoder_layers(module)
        ids = tuple(id(layer) for layer in layers)
        if ids == self._hooked_student_ids:
            return
        for handle in self._student_hooks:
            handle.remove()
        self._student_cache["hidden"].clear()
        self._student_cache["attention"].clear()
        self._student_hooks = _cache_hooks(layers, self._student_cache, self._attention_weight > 0, True)
        self._hooked_student_ids = ids
        _, teacher_layers = find_encoder_layers(self._teacher)
        recorded = getattr(getattr(module, "config", None), LAYER_MAP_KEY, None)
        try:
            mapping = algo.resolve_layer_map(len(layers), len(teacher_layers), self._layer_map, recorded)
        except ValueError as error:
            raise RecipeParameterError(_NAME, "layer_map", self._layer_map, str(error)) from None
        self._pairs = list(enumerate(mapping))
        _LOGGER.info(f"!{_NAME}: student layer -> teacher layer: {mapping}")

    def _layer_losses(self, module: nn.Module, student_inputs: Any) -> tuple:
        student_hidden = self._student_cache["hidden"]
        if not student_hidden:  # hooks were attached after this step's forward pass: from the next step on
            return None, None
        mask = student_inputs.get("attention_mask") if isinstance(student_inputs, dict) else None
        hidden = attention = None
        if self._hidden_weight:
            students = [student_hidden[s] for s, _ in self._pairs]
            teachers = [self._teacher_cache["hidden"][t] for _, t in self._pairs]
            projections = self._projection_list(
                students[0].size(-1), teachers[0].size(-1), students[0].device
            )
            hidden = algo.hidden_state_loss(students, teachers, projections, mask)
        if self._attention_weight:
            students = [self._student_cache["attention"].get(s) for s, _ in self._pairs]
            teachers = [self._teacher_cache["attention"].get(t) for _, t in self._pairs]
            if any(a is None for a in students + teachers):
                gone = [s for s, _ in self._pairs if s in _removed_attention(module)]
                if gone:
                    raise RuntimeError(
                        f"!{_NAME}: attention_weight > 0, but student layer(s) {gone} have no attention "
                        "block left (removed by structured pruning, e.g. !ZipLMPruningModifier): set "
                        "attention_weight: 0 (hidden_weight still pairs the layers)"
                    )
                raise RuntimeError(
                    f"!{_NAME}: attention_weight needs BERT-style self-attention (an "
                    "'attention.self.dropout' or 'attention.dropout' module applied to the attention "
                    "probabilities in every layer)"
                )
            attention = algo.attention_loss(students, teachers, mask)
        for cache in (self._student_cache, self._teacher_cache):
            cache["hidden"].clear()
            cache["attention"].clear()
        return hidden, attention

    def _projection_list(self, student_size: int, teacher_size: int, device) -> list | None:
        if student_size == teacher_size:
            return None
        if self._projections is None:
            self._projections = nn.ModuleDict(
                {str(s): algo.make_projection(student_size, teacher_size) for s, _ in self._pairs}
            ).to(device)
            _LOGGER.info(f"!{_NAME}: learned projections {student_size} -> {teacher_size} for hidden states")
        return [self._projections[str(s)] for s, _ in self._pairs]

    def _add_projection_group(self, optimizer) -> None:
        """Train the projections with the model's optimizer, in a group left out of its state_dict (so
        a saved optimizer.pt still matches the model's parameters when training resumes)."""
        params = list(self._projections.parameters())
        defaults = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        optimizer.add_param_group({**defaults, "params": params, PROJECTION_GROUP_KEY: True})
        self._projection_optimizer = optimizer
        if hasattr(optimizer, "register_state_dict_post_hook"):
            optimizer.register_state_dict_post_hook(_without_projection_group)


def _without_projection_group(_optimizer, state_dict: dict) -> dict:
    groups = state_dict["param_groups"]
    ours = [g for g in groups if g.get(PROJECTION_GROUP_KEY)]
    if not ours:
        return state_dict
    dropped = {index for g in ours for index in g["params"]}
    state_dict["param_groups"] = [g for g in groups if not g.get(PROJECTION_GROUP_KEY)]
    state_dict["state"] = {k: v for k, v in state_dict["state"].items() if k not in dropped}
    return state_dict


def _cache_hooks(layers: nn.ModuleList, cache: dict, attention: bool, training_only: bool) -> list:
    """Forward hooks that store each layer's output hidden states (and, for attention distillation,
    the attention probabilities entering the attention dropout) in ``cache``; with ``training_only``
    (the student) nothing is kept from evaluation passes."""
    handles = []
    for index, layer in enumerate(layers):

        def hidden_hook(module, _args, output, index=index):
            if training_only and not module.training:
                return
            cache["hidden"][index] = output[0] if isinstance(output, tuple) else output

        handles.append(layer.register_forward_hook(hidden_hook))
        if attention:
            dropout = _attention_dropout(layer)
            if dropout is not None:

                def attention_hook(module, args, index=index):
                    if training_only and not module.training:
                        return
                    cache["attention"][index] = args[0]

                handles.append(dropout.register_forward_pre_hook(attention_hook))
    return handles


def _attention_dropout(layer: nn.Module) -> nn.Module | None:
    for name in ("attention.self.dropout", "attention.dropout"):
        try:
            return layer.get_submodule(name)
        except AttributeError:
            continue
    return None


def _device_of(inputs: Any) -> torch.device | None:
    if torch.is_tensor(inputs):
        return inputs.device
    values = (
        inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (list, tuple)) else []
    )
    for value in values:
        if torch.is_tensor(value):
            return value.device
    return None


def _removed_attention(module: nn.Module) -> set[int]:
    """Encoder layers whose attention block is a stand-in (every head removed): they have no maps."""
    from obert_modifiers.algorithms.layer_drop import LayerDropError, find_encoder_layers

    try:
        _, layers = find_encoder_layers(module)
    except LayerDropError:
        return set()
    names = [type(getattr(layer, "attention", None)).__name__ for layer in layers]
    return {i for i, name in enumerate(names) if name == "RemovedAttention"}
