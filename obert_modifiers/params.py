"""Recipe parameters of the four recipe tags, declared once.

One pydantic model per tag (:class:`OBertPruningParams`, :class:`LayerDropParams`,
:class:`OBertQuantizationParams`, :class:`OBertDistillationParams`) holds every recipe key with its
type, default and bounds, and the rules between keys. Any adapter builds from them: the SparseML
modifiers in :mod:`obert_modifiers.modifiers` today (``OBertPruningModifier(**recipe)`` is
``validate_recipe(OBertPruningParams, recipe)`` plus lifecycle), a SparseML-free one next. Adding a
parameter is one field here (plus its use in the adapter's lifecycle).

What every model shares (:class:`RecipeParams`):

- unknown keys are refused (``extra="forbid"``) and reported with the closest valid key
  (``did you mean 'damp'?``);
- YAML 1.1 coercion, in one ``mode="before"`` validator: PyYAML reads ``1e-7`` (no dot) as a
  string, SparseML's ``str()`` round trip writes ``1e-07``, and quoted ``'true'`` is a string; such
  values become the number or flag their field declares. Past that the fields are strict: ``1.5``
  is not a whole number, ``yes`` is not a flag;
- :func:`validate_recipe` turns pydantic's ``ValidationError`` into one
  :class:`RecipeParameterError` line naming the tag, the key, the
  value and what is expected, the same text in training and in ``obert recipe check``.

This module imports neither SparseML nor torch.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from obert_modifiers.errors import ObertError

__all__ = [
    "INTERPOLATIONS",
    "WEIGHT_STRATEGIES",
    "LAYER_DROP_STRATEGIES",
    "RecipeKeyError",
    "RecipeParams",
    "OBertPruningParams",
    "LayerDropParams",
    "OBertQuantizationParams",
    "OBertDistillationParams",
    "ZipLMPruningParams",
    "ZIPLM_STRUCTURES",
    "ZIPLM_ALLOCATIONS",
    "LATENCY_RUNTIMES",
    "PARAMS",
    "describe",
    "mask_group",
    "unknown_key_text",
    "validate_recipe",
]

# the choices are checked again by the math in algorithms/ (tests/test_params.py keeps them equal)
INTERPOLATIONS = ("linear", "cubic", "inverse_cubic")
WEIGHT_STRATEGIES = ("tensor", "channel")
LAYER_DROP_STRATEGIES = ("uniform", "importance")
ZIPLM_STRUCTURES = ("heads", "ffn_neurons", "attention_blocks", "ffn_blocks")
ZIPLM_ALLOCATIONS = ("search", "uniform")
LATENCY_RUNTIMES = ("onnxruntime", "deepsparse", "flops")  # obert_modifiers.latency: 2 measured, 1 counted
LATENCY_PRECISIONS = ("fp32", "int8")
_NAMES = "a list of names or 're:' patterns"
_NUMBERS = ("a number", "a whole number")


class RecipeParameterError(ObertError, ValueError):
    """A recipe gave a modifier a bad value. The message names modifier, key, value and what is expected."""

    def __init__(self, modifier: str, key: str, value: Any, expected: str):
        self.modifier, self.key, self.value, self.expected = modifier, key, value, expected
        super().__init__(f"!{modifier}: recipe key '{key}' = {value!r} is invalid: expected {expected}")


class RecipeKeyError(RecipeParameterError):
    """A key the modifier does not take (with the closest valid ones), or a required key left out."""

    def __init__(self, modifier: str, key: str, message: str, expected: str):
        super().__init__(modifier, key, None, expected)
        self.args = (message,)


class Invalid(ValueError):
    """Raised by the models' validators: ``expected`` is what the key should hold; ``key``/``value``
    name another key than the one being validated (rules between keys)."""

    def __init__(self, expected: str, key: str | None = None, value: Any = None):
        super().__init__(expected)
        self.expected, self.key, self.value = expected, key, value


def key(default: Any = ..., *, expected: str | None = None, doc: str = "", **bounds: Any) -> Any:
    """A recipe key: its default (none: required), bounds (``ge``, ``gt``, ``le``, ``lt``), what a
    message says it expects when that is not derived from its type, and one line of documentation."""
    extra = {"expected": expected} if expected else None
    return Field(default, description=doc, json_schema_extra=extra, **bounds)


def mask_group(mask_type: str) -> int:
    """Weights pruned together: ``'unstructured'`` -> 1, ``'blockN'`` -> N (N >= 2); ValueError
    otherwise (the same rule as ``algorithms.obs.parse_mask_type``)."""
    if mask_type == "unstructured":
        return 1
    if mask_type.startswith("block") and mask_type[5:].isdigit() and int(mask_type[5:]) >= 2:
        return int(mask_type[5:])
    raise ValueError(f"mask_type {mask_type!r}")


# --------------------------------------------------------------------------------------------
# shared: YAML 1.1 coercion and messages
# --------------------------------------------------------------------------------------------


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the annotation without ``Optional``/``Annotated``, whether None is allowed)."""
    optional = False
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            optional = optional or len(args) < len(typing.get_args(annotation))
            if len(args) != 1:
                return annotation, optional
            annotation = args[0]
        else:
            return annotation, optional


def _coerce(value: Any, annotation: Any) -> Any:
    """YAML 1.1 strings (``'1e-7'``, ``'1024'``, ``'true'``) and whole floats for integer keys
    (SparseML writes ``8.0`` back for an ``eval()`` result) become what ``annotation`` declares."""
    annotation, _ = _unwrap(annotation)
    if typing.get_origin(annotation) is list and isinstance(value, list | tuple):
        (item,) = typing.get_args(annotation) or (Any,)
        return [_coerce(v, item) for v in value]
    if annotation is bool and isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if annotation in (float, int) and isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return value
    if annotation is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _kind_text(annotation: Any) -> str | None:
    """What a message calls a value of ``annotation`` (None: the field's own ``expected``)."""
    annotation, _ = _unwrap(annotation)
    if typing.get_origin(annotation) is list:
        annotation, _ = _unwrap(typing.get_args(annotation)[0])
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "a whole number"
    if annotation is float:
        return "a number"
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(annotation)))
    return None


def _expected_text(field: FieldInfo | None, error: Mapping[str, Any]) -> str:
    ctx = error.get("ctx") or {}
    kind = _kind_text(field.annotation) if field is not None else None
    explicit = (field.json_schema_extra or {}).get("expected") if field is not None else None
    for bound, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if bound in ctx:
            return f"{kind or 'a number'} {op} {ctx[bound]}"
    top_level = len(error["loc"]) == 1
    if explicit and (top_level or kind not in _NUMBERS):
        return explicit
    if kind in _NUMBERS and top_level and _unwrap(field.annotation)[1]:
        return f"{kind}, or null"
    return kind or error.get("msg", "a valid value")


def describe(field: FieldInfo) -> str:
    """What a key holds, with its bounds: ``a number >= 0.0 and <= 1.0``."""
    text = (field.json_schema_extra or {}).get("expected") or _kind_text(field.annotation) or "a value"
    bounds = [
        f"{op} {getattr(item, bound)}"
        for item in field.metadata
        for bound, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
        if hasattr(item, bound)
    ]
    if bounds:
        text += " " + " and ".join(bounds)
    return text + (", or null" if _unwrap(field.annotation)[1] else "")


def unknown_key_text(modifier: str, key: str, valid: list[str]) -> str:
    """``!Tag: unknown recipe key 'dmap'; did you mean 'damp'? Valid keys: ...``"""
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "."
    return f"!{modifier}: unknown recipe key '{key}'{hint} Valid keys: {', '.join(sorted(valid))}"


class RecipeParams(BaseModel):
    """Base of the per-tag models: strict fields, unknown keys refused, YAML 1.1 coercion."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    tag: ClassVar[str]

    @model_validator(mode="before")
    @classmethod
    def _yaml_1_1(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        fields = cls.model_fields
        return {k: _coerce(v, fields[k].annotation) if k in fields else v for k, v in data.items()}

    def recipe_values(self) -> dict[str, Any]:
        """Every key with its validated value."""
        return {name: getattr(self, name) for name in type(self).model_fields}

    def sparseml_values(self) -> dict[str, Any]:
        """Every key as SparseML's modifier holds (sorts by and serialises) it: the recipe's values,
        except where the adapter derives one (``!ZipLMPruningModifier``'s ``end_epoch: -1``)."""
        return self.recipe_values()


def validate_recipe(model: type[RecipeParams], recipe: Mapping[str, Any]) -> RecipeParams:
    """``model`` built from one modifier's recipe keys, or :class:`RecipeParameterError` (a
    :class:`RecipeKeyError` for an unknown or missing key) whose one line names the tag, the key,
    the value given and what is expected. Unknown keys are reported first (a misspelled required
    key is also a missing one), then the keys in declaration order."""
    try:
        return model.model_validate(dict(recipe))
    except ValidationError as validation:
        errors = validation.errors(include_url=False)
    errors.sort(key=lambda e: e["type"] != "extra_forbidden")
    error = errors[0]
    tag, fields = model.tag, model.model_fields
    name = str(error["loc"][0]) if error["loc"] else None
    if error["type"] == "extra_forbidden":
        raise RecipeKeyError(tag, name, unknown_key_text(tag, name, list(fields)), "a valid key") from None
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, Invalid):
        name = cause.key or name
        value = recipe[name] if name in recipe else cause.value
        raise RecipeParameterError(tag, name, value, cause.expected) from None
    if error["type"] == "missing":
        expected = describe(fields[name])
        message = f"!{tag}: required recipe key '{name}' is missing: expected {expected}"
        raise RecipeKeyError(tag, name, message, expected) from None
    expected = _expected_text(fields.get(name), error)
    value = recipe.get(name)
    index = error["loc"][1] if len(error["loc"]) > 1 else None
    if isinstance(index, int) and _kind_text(fields[name].annotation) in _NUMBERS:
        value = value[index]  # an item of a list of numbers: name the item
    raise RecipeParameterError(tag, name, value, expected) from None


# --------------------------------------------------------------------------------------------
# field types shared by several tags
# --------------------------------------------------------------------------------------------

WholeAtLeast0 = Annotated[int, Field(ge=0)]


def _names(value: Any) -> Any:
    """A single name is a one-item list (``params: __ALL_PRUNABLE__``, ``exclude: classifier``)."""
    return [value] if isinstance(value, str) else value


def _check_window(start: float, end: float) -> None:
    """start >= 0 or -1 (from the beginning); end -1 (to the end of training) or >= start."""
    if start < 0 and start != -1:
        raise Invalid("a number >= 0, or -1", "start_epoch", start)
    if end != -1 and end < start:
        raise Invalid(f"-1 or a number >= start_epoch ({start})", "end_epoch", end)


# --------------------------------------------------------------------------------------------
# the four tags
# --------------------------------------------------------------------------------------------


class OBertPruningParams(RecipeParams):
    """``!OBertPruningModifier``: the keys of SparseML's ``OBSPruningModifier`` plus
    ``memory_budget_gb``."""

    tag: ClassVar[str] = "OBertPruningModifier"

    init_sparsity: float = key(ge=0.0, le=1.0, doc="sparsity of the first pruning step")
    final_sparsity: float = key(ge=0.0, le=1.0, doc="sparsity of the last pruning step (< 1)")
    start_epoch: float = key(ge=0.0, doc="epoch of the first pruning step")
    end_epoch: float = key(doc="epoch of the last pruning step (>= start_epoch)")
    update_frequency: float = key(gt=0.0, doc="epochs between pruning steps")
    params: list[str] = key(expected=_NAMES, doc="weights to prune: names or 're:' patterns")
    inter_func: Literal[INTERPOLATIONS] = key("cubic", doc="sparsity schedule between the steps")
    mask_type: str = key(
        "unstructured",
        expected="'unstructured', 'block4' or 'blockN'",
        doc="'unstructured', or 'blockN': runs of N consecutive input weights pruned together",
    )
    fisher_block_size: int = key(50, ge=1, doc="size of the diagonal blocks of the Fisher inverse")
    grad_sampler_kwargs: dict[str, Any] | None = key(
        None,
        expected="a mapping of DataLoader arguments (batch_size: 8)",
        doc="arguments of the gradient sampler's DataLoader (batch_size: 8)",
    )
    leave_enabled: bool = key(True, doc="keep applying the masks after end_epoch")
    global_sparsity: bool = key(True, doc="one threshold over all pruned weights (else per tensor)")
    num_grads: int = key(1024, ge=1, doc="gradients in each Fisher estimate")
    damp: float = key(1e-7, gt=0.0, doc="dampening added to the Fisher diagonal")
    num_recomputations: int = key(1, ge=1, doc="Fisher recomputations within one pruning step")
    memory_budget_gb: float | None = key(
        None, gt=0.0, doc="cap on a pruning step's extra memory (null: no cap)"
    )

    @field_validator("params", mode="before")
    @classmethod
    def _one_name(cls, value: Any) -> Any:
        return _names(value)

    @field_validator("params")
    @classmethod
    def _some_params(cls, value: list[str]) -> list[str]:
        if not value:
            raise Invalid("at least one name or 're:' pattern")
        return value

    @field_validator("mask_type")
    @classmethod
    def _mask_type(cls, value: str) -> str:
        mask_group(value)
        return value

    @field_validator("grad_sampler_kwargs")
    @classmethod
    def _no_empty_kwargs(cls, value: dict | None) -> dict | None:
        return dict(value) if value else None

    @model_validator(mode="after")
    def _rules(self) -> OBertPruningParams:
        if self.final_sparsity >= 1.0:
            raise Invalid("a number < 1", "final_sparsity", self.final_sparsity)
        if self.final_sparsity < self.init_sparsity:
            raise Invalid(
                f"a number >= init_sparsity ({self.init_sparsity})", "final_sparsity", self.final_sparsity
            )
        if self.end_epoch < self.start_epoch:
            raise Invalid(f"a number >= start_epoch ({self.start_epoch})", "end_epoch", self.end_epoch)
        group = mask_group(self.mask_type)
        if self.fisher_block_size % group:
            raise Invalid(
                f"a multiple of {group} for mask_type {self.mask_type}",
                "fisher_block_size",
                self.fisher_block_size,
            )
        return self


class LayerDropParams(RecipeParams):
    """``!LayerDropModifier``: which encoder layers go (``layers``, or ``keep`` N chosen by
    ``strategy``)."""

    tag: ClassVar[str] = "LayerDropModifier"

    layers: list[WholeAtLeast0] | None = key(
        None,
        expected="a non-empty list of layer indices to drop",
        doc="encoder layer indices to remove (recorded here after an importance choice)",
    )
    keep: int | None = key(None, ge=1, doc="number of layers to keep (instead of 'layers')")
    strategy: Literal[LAYER_DROP_STRATEGIES] = key("uniform", doc="how 'keep' chooses the layers")
    importance_batches: int = key(8, ge=1, doc="training batches that score the layers (importance)")
    num_layers: int | None = key(None, ge=1, doc="the layer count the recipe was written for (checked)")
    start_epoch: float = key(-1.0, doc="when the layers are removed (-1: before training)")
    end_epoch: float = key(-1.0, doc="marks the end of the recipe stage only: layers never come back")

    @field_validator("layers")
    @classmethod
    def _layer_set(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and not value:
            raise Invalid("a non-empty list of layer indices to drop")
        return None if value is None else sorted(set(value))

    @model_validator(mode="after")
    def _rules(self) -> LayerDropParams:
        _check_window(self.start_epoch, self.end_epoch)
        if self.layers is None and self.keep is None:
            raise Invalid("either 'layers' (indices to drop) or 'keep'", "layers", None)
        if self.num_layers is None:
            return self
        if self.keep is not None and self.keep > self.num_layers:
            raise Invalid(f"at most num_layers ({self.num_layers})", "keep", self.keep)
        if self.layers is not None:
            if self.layers[-1] >= self.num_layers or len(self.layers) >= self.num_layers:
                raise Invalid(
                    f"indices below num_layers ({self.num_layers}) that leave at least one layer",
                    "layers",
                    self.layers,
                )
            if self.keep is not None and self.num_layers - len(self.layers) != self.keep:
                left = self.num_layers - len(self.layers)
                raise Invalid(f"num_layers - len(layers) = {left}", "keep", self.keep)
        return self


class OBertQuantizationParams(RecipeParams):
    """``!OBertQuantizationModifier``: INT8 quantization-aware training."""

    tag: ClassVar[str] = "OBertQuantizationModifier"

    start_epoch: float = key(-1.0, doc="epoch at which fake quantization starts (-1: from the beginning)")
    end_epoch: float = key(-1.0, doc="-1: QAT stays on; a number only marks the end of the recipe stage")
    freeze_observer_epoch: float | None = key(
        None, doc="epoch after which quantization ranges stop updating (null: at export)"
    )
    weight_strategy: Literal[WEIGHT_STRATEGIES] = key(
        "tensor", doc="one weight scale per tensor, or per output channel"
    )
    quantize_matmuls: bool = key(True, doc="also quantize the attention matmuls")
    quantize_embeddings: bool = key(True, doc="also fake-quantize the embedding tables (UINT8)")
    exclude: list[str] = key(
        ["classifier"], expected=_NAMES, doc="modules left in float: names, class names or 're:' patterns"
    )

    @field_validator("exclude", mode="before")
    @classmethod
    def _default_exclude(cls, value: Any) -> Any:
        return ["classifier"] if value is None else _names(value)

    @model_validator(mode="after")
    def _rules(self) -> OBertQuantizationParams:
        start = self.start_epoch
        if start < 0 and start != -1:
            raise Invalid("a number >= 0, or -1", "start_epoch", start)
        # QAT cannot be switched off once started: an end only marks the stage end (SparseML's
        # compose_staged writes the stage's last epoch here when a later recipe builds on this one)
        if self.end_epoch != -1 and self.end_epoch < max(start, 0.0):
            raise Invalid(
                f"-1 (QAT stays on), or a number >= start_epoch ({start})", "end_epoch", self.end_epoch
            )
        freeze = self.freeze_observer_epoch
        if freeze is not None and freeze < max(start, 0.0):
            raise Invalid(f"null or a number >= start_epoch ({start})", "freeze_observer_epoch", freeze)
        return self


OutputKeys = list[str | int] | None


class OBertDistillationParams(RecipeParams):
    """``!OBertDistillationModifier``: logits (+ hidden-state and attention) distillation."""

    tag: ClassVar[str] = "OBertDistillationModifier"

    start_epoch: float = key(-1.0, doc="when distillation starts (-1: from the beginning)")
    end_epoch: float = key(-1.0, doc="when it ends (-1: at the end of training)")
    update_frequency: float = key(-1.0, doc="unused (SparseML's scheduled-update key)")
    hardness: float = key(0.5, ge=0.0, le=1.0, doc="loss = (1 - hardness) * task + hardness * KD")
    temperature: float = key(2.0, gt=0.0, doc="softmax temperature of the KD term")
    distill_output_keys: OutputKeys = key(
        None,
        expected="a list of output names (or indices)",
        doc="model outputs distilled (null: logits / start_logits, end_logits)",
    )
    teacher_input_keys: OutputKeys = key(
        None,
        expected="a list of input names (or indices)",
        doc="inputs given to the teacher (null: the student's, without labels)",
    )
    hidden_weight: float = key(0.0, ge=0.0, doc="weight of the hidden-state MSE term")
    attention_weight: float = key(0.0, ge=0.0, doc="weight of the attention KL term")
    layer_map: list[WholeAtLeast0] | None = key(
        None,
        expected="a list: student layer i -> teacher layer",
        doc="student layer i -> teacher layer (null: the model config's obert_layer_map)",
    )

    @field_validator("distill_output_keys", "teacher_input_keys", mode="before")
    @classmethod
    def _one_key(cls, value: Any) -> Any:
        return [value] if isinstance(value, str | int) and not isinstance(value, bool) else value

    @field_validator("distill_output_keys", "teacher_input_keys")
    @classmethod
    def _no_empty_keys(cls, value: list | None) -> list | None:
        return value or None

    @field_validator("layer_map")
    @classmethod
    def _some_layers(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and not value:
            raise Invalid("a list: student layer i -> teacher layer")
        return value

    @model_validator(mode="after")
    def _rules(self) -> OBertDistillationParams:
        _check_window(self.start_epoch, self.end_epoch)
        return self


class ZipLMPruningParams(RecipeParams):
    """``!ZipLMPruningModifier``: structured second-order pruning (heads, FFN neurons, whole blocks) to
    speed-up targets measured on a latency table."""

    tag: ClassVar[str] = "ZipLMPruningModifier"

    start_epoch: float = key(0.0, ge=0.0, doc="epoch of the first pruning step")
    end_epoch: float = key(
        -1.0, doc="epoch of the last pruning step (-1: start_epoch + (steps - 1) * update_frequency)"
    )
    update_frequency: float = key(1.0, gt=0.0, doc="epochs between pruning steps")
    speedup_targets: list[float] = key(
        expected="a speed-up > 1, or an increasing list of them (one per pruning step)",
        doc="speed-up over the dense model per step; a list saves every step's model (a family)",
    )
    structures: list[Literal[ZIPLM_STRUCTURES]] = key(
        list(ZIPLM_STRUCTURES),
        expected="a non-empty list of " + ", ".join(map(repr, ZIPLM_STRUCTURES)),
        doc="what may go: heads, ffn_neurons, attention_blocks (all heads), ffn_blocks (all neurons)",
    )
    num_calibration_samples: int = key(
        1024, ge=1, doc="training sequences whose layer inputs form the Hessians"
    )
    calibration_batch_size: int = key(32, ge=1, doc="batch size of the calibration forward passes")
    damp: float = key(0.01, ge=0.0, doc="relative dampening: H + damp * mean(diag H) * I")
    ffn_chunk: int = key(16, ge=1, doc="FFN neurons removed jointly per OBS update (1: exact greedy)")
    allocation: Literal[ZIPLM_ALLOCATIONS] = key(
        "search",
        doc="how much each layer keeps: search (per-layer, the latency-table search) or uniform (the same "
        "heads and FFN width in every layer, the least-error one that meets the target; an ablation)",
    )
    weight_update: bool = key(
        True, doc="apply the OBS update to the kept weights (false: only remove; an ablation)"
    )
    latency_runtime: Literal[LATENCY_RUNTIMES] = key(
        "onnxruntime",
        doc="latency table source: onnxruntime or deepsparse (measured here, cached) or flops (counted)",
    )
    latency_threads: int = key(2, ge=1, doc="intra-op threads of the measured table (the deployment's)")
    latency_batch_size: int = key(1, ge=1, doc="batch size of the measured table")
    latency_sequence_length: int = key(128, ge=1, doc="sequence length of the measured table")
    latency_precision: Literal[LATENCY_PRECISIONS] = key(
        "fp32", doc="fp32, or int8 (ORT's dynamic INT8 form) when QAT follows"
    )
    latency_cache_dir: str | None = key(
        None, expected="a folder path", doc="where tables are cached (null: <obert cache>/latency)"
    )
    latency_table_file: str | None = key(
        None,
        expected="a path to a latency table JSON",
        doc="a table measured elsewhere (`obert latency-table` on the deployment machine), used instead of "
        "measuring here; it must be of the model's shape and the latency_* keys' setting",
    )
    seed: int = key(0, ge=0, doc="seed of the calibration batches (step k draws with seed + k)")
    structure: dict[str, Any] | None = key(
        None,
        expected="what the modifier records: {format: 1, heads: [...], ffn: [...]}",
        doc="RECORDED after each step: per-layer heads and FFN neurons kept (re-checked on reload)",
    )
    steps_done: int = key(0, ge=0, doc="RECORDED: pruning steps already taken (targets reached)")

    @field_validator("speedup_targets", mode="before")
    @classmethod
    def _one_target(cls, value: Any) -> Any:
        if isinstance(value, int | float | str) and not isinstance(value, bool):
            value = [value]
        return _coerce(value, list[float])

    @field_validator("speedup_targets")
    @classmethod
    def _targets(cls, value: list[float]) -> list[float]:
        if not value or any(t <= 1.0 for t in value):
            raise Invalid("a speed-up > 1, or an increasing list of them (one per pruning step)")
        if any(b <= a for a, b in zip(value, value[1:], strict=False)):
            raise Invalid("a strictly increasing list of speed-ups (one per pruning step)")
        return value

    @field_validator("structures", mode="before")
    @classmethod
    def _one_structure(cls, value: Any) -> Any:
        return _names(value)

    @field_validator("structures")
    @classmethod
    def _some_structures(cls, value: list[str]) -> list[str]:
        if not value:
            raise Invalid("a non-empty list of " + ", ".join(map(repr, ZIPLM_STRUCTURES)))
        return sorted(set(value), key=ZIPLM_STRUCTURES.index)

    @field_validator("structure")
    @classmethod
    def _structure(cls, value: dict | None) -> dict | None:
        if value is None:
            return None
        lists = [value.get(k) for k in ("heads", "ffn")]
        if value.get("format") != 1 or not all(
            isinstance(v, list) and all(isinstance(i, int) and i >= 0 for i in v) for v in lists
        ) or len(lists[0]) != len(lists[1]):
            raise Invalid("what the modifier records: {format: 1, heads: [...], ffn: [...]}")
        return dict(value)

    @model_validator(mode="after")
    def _rules(self) -> ZipLMPruningParams:
        if self.end_epoch != -1 and self.end_epoch < self.start_epoch:
            raise Invalid(f"-1 or a number >= start_epoch ({self.start_epoch})", "end_epoch", self.end_epoch)
        last = self.last_step_epoch
        if len(self.speedup_targets) > 1 and self.end_epoch != -1 and last > self.end_epoch + 1e-9:
            raise Invalid(
                f"-1 or >= {last:g}: {len(self.speedup_targets)} targets take steps at start_epoch + "
                f"k * update_frequency",
                "end_epoch",
                self.end_epoch,
            )
        if self.steps_done > len(self.step_targets):
            steps = len(self.step_targets)
            raise Invalid(f"at most the {steps} pruning steps", "steps_done", self.steps_done)
        return self

    @property
    def step_targets(self) -> list[float]:
        """The speed-up of every pruning step: the list as given, or for one target with a window
        (end_epoch > start_epoch) a step every update_frequency, the targets rising linearly to it."""
        if len(self.speedup_targets) > 1 or self.end_epoch == -1:
            return list(self.speedup_targets)
        steps = int((self.end_epoch - self.start_epoch) / self.update_frequency + 1e-9) + 1
        final = self.speedup_targets[0]
        return [1.0 + (final - 1.0) * (k + 1) / steps for k in range(steps)]

    @property
    def last_step_epoch(self) -> float:
        return self.start_epoch + (len(self.step_targets) - 1) * self.update_frequency

    def sparseml_values(self) -> dict[str, Any]:
        """The SparseML adapter passes ``end_epoch: -1`` on as the last step's epoch."""
        values = self.recipe_values()
        if values["end_epoch"] == -1:
            values["end_epoch"] = self.last_step_epoch
        return values


PARAMS: dict[str, type[RecipeParams]] = {
    model.tag: model
    for model in (
        OBertPruningParams,
        LayerDropParams,
        OBertQuantizationParams,
        OBertDistillationParams,
        ZipLMPruningParams,
    )
}
