"""A native engine for SparseML's v1 recipe language: same YAML in, same modifiers out, no SparseML.

:func:`load_recipe` reads a recipe (``.yaml``, a ``.md`` recipe card's front matter, or YAML text)
the way ``ScheduledModifierManager.from_yaml`` does and returns a typed :class:`RecipePlan`:

- **variables**: top-level (and, in a staged recipe, stage-level) scalars and lists. ``eval(expr)``
  runs SparseML's restricted evaluation (:func:`restricted_eval`: numbers, variables,
  ``+ - * / // ** %`` and ``abs float int min max round``); variables resolve to a fixed point, so
  their order does not matter; ``eval(name)`` of a non-numeric variable (a list, a string) gives it
  unchanged. SparseML's quirks are kept: a stage variable ``eval(name)`` of a *global* name reads the
  global even when the stage shadows it, while modifiers of the stage read the stage's value.
- **recipe_args** (:func:`parse_recipe_args`: a dict, JSON or ``k=v,k2=v2``) replace every variable
  of that name, globally and in every stage, before evaluation; a name that is not a variable is
  refused.
- **modifiers**: every list under a key whose name holds ``modifiers`` (``training_modifiers``,
  ``pruning_modifiers``...), per stage in a staged recipe (a top-level mapping holding such keys).
  Our tags are built into their :mod:`obert_modifiers.params` models (:data:`PARAMS`, so a new tag
  there is a new tag here); the SparseML built-ins published oBERT recipes use are built into the
  small models of :data:`BUILTINS`; any other SparseML built-in is refused by name.
- **order and epochs**: modifiers and stages are sorted as SparseML's manager sorts them (end epoch,
  start epoch, identifier); epochs are absolute within a file (SparseML does not shift stages of
  one file); ``max_epochs`` is the last modifier epoch rounded up (what SparseML's trainer trains).

:meth:`RecipePlan.to_yaml` writes the plan exactly as ``ScheduledModifierManager.save`` does
(``recipe.yaml`` in a saved model folder, :meth:`RecipePlan.save`), so a folder saved on either
stack loads on the other; :func:`compose` appends a recipe to one saved with a checkpoint as
SparseML's trainer does (``compose_staged``: the new recipe's epochs move past the old one's).

Every problem is one :class:`RecipeError` line naming the file, the line, the modifier and the key.
This module imports neither SparseML nor torch.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import hashlib
import json
import math
import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cmp_to_key
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import model_validator
from yaml.constructor import SafeConstructor

from obert_modifiers.errors import ObertError
from obert_modifiers.params import (
    PARAMS,
    Invalid,
    RecipeParameterError,
    RecipeParams,
    key,
    validate_recipe,
)

__all__ = [
    "BUILTINS",
    "LR_FUNCTIONS",
    "RECIPE_NAME",
    "SPARSEML_BUILTINS",
    "PlannedModifier",
    "RecipeError",
    "RecipePlan",
    "compose",
    "load_recipe",
    "lr_at",
    "parse_recipe_args",
    "read_recipe_text",
    "restricted_eval",
]

RECIPE_NAME = "recipe.yaml"  # the file SparseML's trainer writes into a saved model folder
METADATA_KEY = "__metadata__"
RECIPE_VERSION = "1.1.0"
SUFFIXES = (".yaml", ".md")
FRONT_MATTER = re.compile(r"^\s*(?:---|\+\+\+)(.*?)(?:---|\+\+\+)", re.S | re.M)
LR_FUNCTIONS = ("linear", "cosine", "cyclic_linear")  # SparseML 1.8's LearningRateFunctionModifier


class RecipeError(ObertError, ValueError):
    """A recipe the native engine cannot run; the message names the file, line, modifier and key."""


# --------------------------------------------------------------------------------------------
# the SparseML built-ins published oBERT recipes use: one small model each, with SparseML's keys
# --------------------------------------------------------------------------------------------

Number = int | float  # kept as written (SparseML writes ``final_lr: 0`` back as 0, not 0.0)


def _number(value: Any) -> Any:
    """A YAML 1.1 number string (``'5e-5'``) becomes a float, as SparseML's modifiers convert it."""
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return value
    return value


class BuiltinParams(RecipeParams):
    """A SparseML built-in: its recipe keys, validated, and what SparseML writes back
    (:meth:`sparseml_props`). ``number_keys`` are the keys SparseML turns from strings into floats."""

    number_keys: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _number_strings(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            data = {k: _number(v) if k in cls.number_keys else v for k, v in data.items()}
        return data

    def sparseml_props(self) -> dict[str, Any]:
        return {k: v for k, v in self.recipe_values().items() if v is not None}


class EpochRangeParams(BuiltinParams):
    """``!EpochRangeModifier``: the epochs training covers."""

    tag: ClassVar[str] = "EpochRangeModifier"
    number_keys: ClassVar[tuple[str, ...]] = ("start_epoch", "end_epoch")

    start_epoch: float = key(doc="first epoch")
    end_epoch: float = key(doc="last epoch (>= start_epoch, or -1)")

    @model_validator(mode="after")
    def _rules(self) -> EpochRangeParams:
        _schedule(self.start_epoch, self.end_epoch, end_comparator=-1)
        return self


class LearningRateFunctionParams(BuiltinParams):
    """``!LearningRateFunctionModifier``: the learning rate from ``init_lr`` to ``final_lr`` by
    ``lr_func`` between ``start_epoch`` and ``end_epoch`` (:func:`lr_at`)."""

    tag: ClassVar[str] = "LearningRateFunctionModifier"
    number_keys: ClassVar[tuple[str, ...]] = (
        "start_epoch", "end_epoch", "init_lr", "final_lr", "update_frequency"
    )  # fmt: skip

    lr_func: Literal[LR_FUNCTIONS] = key(doc="linear, cosine or cyclic_linear (SparseML 1.8's functions)")
    init_lr: float = key(ge=0.0, le=1.0, doc="learning rate at start_epoch")
    final_lr: Number = key(ge=0.0, le=1.0, doc="learning rate at end_epoch")
    start_epoch: float = key(doc="first epoch of the schedule")
    end_epoch: float = key(doc="last epoch of the schedule (> start_epoch)")
    cycle_epochs: Number = key(1.0, gt=0, doc="cycle length of cyclic_linear, in epochs")
    param_groups: list[int] | None = key(None, doc="optimizer param groups set (null: all)")
    update_frequency: Number = key(-1.0, doc="ignored: SparseML keeps it at -1")

    @model_validator(mode="after")
    def _rules(self) -> LearningRateFunctionParams:
        _schedule(self.start_epoch, self.end_epoch, end_comparator=1)
        return self

    def sparseml_props(self) -> dict[str, Any]:
        return {**super().sparseml_props(), "update_frequency": -1.0}


class SetLearningRateParams(BuiltinParams):
    """``!SetLearningRateModifier``: one learning rate from ``start_epoch`` on."""

    tag: ClassVar[str] = "SetLearningRateModifier"
    number_keys: ClassVar[tuple[str, ...]] = ("start_epoch", "end_epoch", "learning_rate")

    learning_rate: Number | None = key(doc="the learning rate set (null: leave it)")
    param_groups: list[int] | None = key(None, doc="optimizer param groups set (null: all)")
    start_epoch: float = key(-1.0, doc="when it is set (-1: from the beginning)")
    end_epoch: float = key(-1.0, doc="ignored: SparseML keeps it at -1")
    constant_logging: bool | str | int = key(False, doc="log the rate at every step")

    @model_validator(mode="after")
    def _rules(self) -> SetLearningRateParams:
        _schedule(self.start_epoch, -1.0, end_comparator=None)
        return self

    def sparseml_props(self) -> dict[str, Any]:
        logging = self.constant_logging  # SparseML's convert_to_bool
        flag = bool(logging) and "f" not in logging.lower() and "0" not in logging.lower() if isinstance(
            logging, str
        ) else bool(logging)
        return {**super().sparseml_props(), "end_epoch": -1.0, "constant_logging": flag}


class ConstantPruningParams(BuiltinParams):
    """``!ConstantPruningModifier``: keeps the zeros of ``params`` at zero (sparse transfer)."""

    tag: ClassVar[str] = "ConstantPruningModifier"
    number_keys: ClassVar[tuple[str, ...]] = ("start_epoch", "end_epoch", "update_frequency")

    params: str | list[str] = key(expected="a name, a list of names or 're:' patterns, or __ALL_PRUNABLE__")
    start_epoch: float = key(-1.0, doc="when the masks are taken (-1: from the beginning)")
    end_epoch: float = key(-1.0, doc="when they stop being applied (-1: never)")
    update_frequency: Number = key(-1, doc="ignored: SparseML keeps it at -1")

    @model_validator(mode="after")
    def _rules(self) -> ConstantPruningParams:
        _schedule(self.start_epoch, self.end_epoch, end_comparator=-1)
        return self

    def sparseml_props(self) -> dict[str, Any]:
        return {**super().sparseml_props(), "update_frequency": -1}


def _schedule(start: float, end: float, end_comparator: int | None) -> None:
    """SparseML's ``validate_schedule``: start >= -1; end -1 or >= start (> start for
    ``end_comparator`` 1)."""
    if start < -1:
        raise Invalid("a number >= -1 (-1: from the beginning)", "start_epoch", start)
    if end_comparator == 1 and end <= start:
        raise Invalid(f"a number > start_epoch ({start})", "end_epoch", end)
    if end_comparator == -1 and end != -1 and end < start:
        raise Invalid(f"-1 or a number >= start_epoch ({start})", "end_epoch", end)


BUILTINS: dict[str, type[BuiltinParams]] = {
    model.tag: model
    for model in (EpochRangeParams, LearningRateFunctionParams, SetLearningRateParams, ConstantPruningParams)
}

# SparseML 1.8's other PyTorch modifiers: refused by name (train such a recipe on the SparseML stack)
SPARSEML_BUILTINS = (
    "ACDCPruningModifier", "DistillationModifier", "GMPruningModifier", "GlobalMagnitudePruningModifier",
    "LayerPruningModifier", "LayerThinningModifier", "LearningRateModifier", "LegacyGMPruningModifier",
    "MFACPruningModifier", "MagnitudePruningModifier", "MovementPruningModifier", "OBSPruningModifier",
    "PowerpropagationModifier", "QuantizationModifier", "RigLPruningModifier", "SetWeightDecayModifier",
    "StructuredPruningModifier", "ThinningModifier", "TopKASTPruningModifier", "TrainableParamsModifier",
    "LegacyQuantizationModifier", "PerLayerDistillationModifier", "OutputDistillationModifier",
    "SparseGPTModifier", "SmoothQuantModifier", "LogarithmicEqualizationModifier", "ConstantKSModifier",
    "GradualKSModifier", "GMPruningModifierKS", "LayerThinningModifierKS",
)  # fmt: skip


def _models() -> dict[str, type[RecipeParams]]:
    return {**BUILTINS, **PARAMS}


# --------------------------------------------------------------------------------------------
# restricted eval (SparseML's sparseml/utils/restricted_eval.py semantics)
# --------------------------------------------------------------------------------------------

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Pow: operator.pow,
    ast.Mod: operator.mod,
}
_FUNCTIONS = {"abs": abs, "float": float, "int": int, "min": min, "max": max, "round": round}
EVAL_SYNTAX = "numbers, variables, + - * / // ** % and abs float int min max round"


class UnknownVariable(RecipeError):
    def __init__(self, name: str):
        super().__init__(f"unknown variable '{name}'")
        self.name = name


def restricted_eval(expression: str, variables: Mapping[str, Any] | None = None) -> Any:
    """``expression`` evaluated as SparseML's ``restricted_eval`` does. An unknown name raises
    :class:`UnknownVariable`; anything SparseML's evaluator refuses or crashes on (unary minus
    among them: write ``0 - x``) raises :class:`RecipeError`."""
    variables = variables or {}
    try:
        tree = ast.parse(expression.strip())
    except SyntaxError as error:
        raise RecipeError(f"eval({expression}) is not an expression ({error.msg})") from None
    if not tree.body or not isinstance(tree.body[0], ast.Expr):
        raise RecipeError(f"eval({expression}) is not an expression; eval() takes {EVAL_SYNTAX}")
    return _eval_node(tree.body[0].value, variables, expression)


def _eval_node(node: ast.AST, variables: Mapping[str, Any], expression: str) -> Any:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, complex):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in variables:
            return variables[node.id]
        raise UnknownVariable(node.id)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left = _eval_node(node.left, variables, expression)
        right = _eval_node(node.right, variables, expression)
        try:
            return _BINOPS[type(node.op)](left, right)
        except (ArithmeticError, TypeError) as error:
            raise RecipeError(f"eval({expression}) fails: {type(error).__name__}: {error}") from None
    if isinstance(node, ast.UnaryOp):
        raise RecipeError(
            f"eval({expression}): SparseML's eval() cannot negate (a unary '-' crashes it); write (0 - x)"
        )
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
        args = [_eval_node(arg, variables, expression) for arg in node.args]
        kwargs = {kw.arg: _eval_node(kw.value, variables, expression) for kw in node.keywords}
        try:
            return _FUNCTIONS[node.func.id](*args, **kwargs)
        except (ArithmeticError, TypeError, ValueError) as error:
            raise RecipeError(f"eval({expression}) fails: {type(error).__name__}: {error}") from None
    text = ast.get_source_segment(expression.strip(), node) or type(node).__name__
    raise RecipeError(f"eval({expression}): '{text}' is not allowed; eval() takes {EVAL_SYNTAX}")


def _is_eval(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("eval(") and value.endswith(")")


# --------------------------------------------------------------------------------------------
# reading: text, tags, recipe_args
# --------------------------------------------------------------------------------------------


@dataclass
class Tagged:
    """A ``!Tag`` entry as read: its tag, its keys and its line in the file."""

    tag: str
    params: dict[str, Any]
    line: int


def read_recipe_text(source: str | Path) -> tuple[str, int, str]:
    """(the recipe's YAML, its line offset in the file, a name for messages). ``source`` is a
    ``.yaml`` file, a ``.md`` recipe card (its front matter), or YAML text (it holds a newline)."""
    if isinstance(source, str) and ("\n" in source or "\r" in source):
        match = FRONT_MATTER.search(source)
        if match:
            return match.group(1), source[: match.start(1)].count("\n"), "recipe"
        return source, 0, "recipe"
    if str(source).startswith("zoo:"):
        raise RecipeError(
            f"{source}: SparseZoo stubs are not read by the native engine; download the recipe and "
            "give its file"
        )
    path = Path(source)
    if path.suffix.lower() not in SUFFIXES:
        raise RecipeError(
            f"{path}: recipes are read from '.yaml' files or '.md' recipe cards (SparseML rejects "
            f"'{path.suffix}')"
        )
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".md":
        match = FRONT_MATTER.search(text)
        if not match:
            raise RecipeError(f"{path}: no YAML front matter (between '---' lines) in this recipe card")
        return match.group(1), text[: match.start(1)].count("\n"), str(path)
    return text, 0, str(path)


def _load_yaml(text: str, offset: int, name: str) -> Any:
    class Loader(yaml.SafeLoader):
        # YAML's own safe constructors only: SparseML registers its modifiers on SafeLoader
        # ('!pytorch.Tag'), and those must not build SparseML objects here
        yaml_constructors = {
            k: v for k, v in SafeConstructor.yaml_constructors.items() if not str(k).startswith("!")
        }
        yaml_multi_constructors = {
            k: v for k, v in SafeConstructor.yaml_multi_constructors.items() if not str(k).startswith("!")
        }

    def construct(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Tagged:
        line = node.start_mark.line + 1 + offset
        if "." in suffix or "!" in suffix:
            bare = suffix.rsplit(".", 1)[-1]
            raise RecipeError(f"{name}:{line}: tag '!{suffix}': recipes use bare tags (write '!{bare}')")
        if isinstance(node, yaml.MappingNode):
            return Tagged(suffix, loader.construct_mapping(node, deep=True), line)
        if isinstance(node, yaml.ScalarNode) and node.value == "":
            return Tagged(suffix, {}, line)
        raise RecipeError(f"{name}:{line}: '!{suffix}' must be followed by its keys (a mapping)")

    Loader.add_multi_constructor("!", construct)
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f"{name}:{mark.line + 1 + offset}" if mark is not None else name
        raise RecipeError(f"{where}: YAML syntax error: {error.problem}") from None


def _key_lines(text: str, offset: int) -> dict[tuple[str | None, str], int]:
    """(stage or None, key) -> line, for the top level and one level down (stage variables)."""
    lines: dict[tuple[str | None, str], int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if not isinstance(root, yaml.MappingNode):
        return lines
    for key_node, value_node in root.value:
        lines[(None, key_node.value)] = key_node.start_mark.line + 1 + offset
        if isinstance(value_node, yaml.MappingNode):
            for inner, _ in value_node.value:
                lines[(key_node.value, inner.value)] = inner.start_mark.line + 1 + offset
    return lines


def parse_recipe_args(recipe_args: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """``recipe_args`` as SparseML's ``parse_recipe_variables`` reads them: a mapping, a JSON
    object, or ``k=v,k2=v2`` (``:`` works as ``=``; numbers become floats)."""
    if not recipe_args:
        return {}
    if isinstance(recipe_args, Mapping):
        return dict(recipe_args)
    if not isinstance(recipe_args, str):
        raise RecipeError(f"recipe_args {recipe_args!r}: expected a mapping, JSON or k=v,k2=v2")
    try:
        parsed = json.loads(recipe_args)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        return parsed
    out: dict[str, Any] = {}
    for item in recipe_args.replace(":", "=").split(","):
        parts = item.split("=")
        if len(parts) != 2 or any(c in parts[0] for c in "{!=}") or not parts[0].strip():
            raise RecipeError(
                f"recipe_args {recipe_args!r}: '{item}' is not key=value; expected JSON or k=v,k2=v2"
            )
        value: Any = parts[1].strip()
        try:
            value = float(value)
        except ValueError:
            pass
        out[parts[0].strip()] = value
    return out


def _is_modifier_group(key: Any, value: Any) -> bool:
    return isinstance(key, str) and "modifiers" in key and isinstance(value, list)


def _is_stage(value: Any) -> bool:
    return isinstance(value, dict) and any(isinstance(k, str) and "modifiers" in k for k in value)


def _holds_modifiers(value: Any) -> bool:
    """SparseML leaves a list of mappings (modifiers, once tags are rewritten) alone on override."""
    return isinstance(value, list) and all(isinstance(v, dict | Tagged) for v in value)


def _apply_recipe_args(container: dict, overrides: Mapping[str, Any], name: str) -> None:
    staged = any(_is_stage(v) for v in container.values())
    for var, value in overrides.items():
        found = False
        for key_, item in container.items():
            if staged and isinstance(item, dict):
                for inner in item:
                    if inner == var and not _holds_modifiers(item[inner]):
                        item[inner] = value
                        found = True
            elif key_ == var and not (not staged and _holds_modifiers(item)):
                container[key_] = value
                found = True
        if not found:
            known = _variable_names(container)
            raise RecipeError(
                f"{name}: recipe_args: '{var}' is not a variable of the recipe "
                f"(its variables: {', '.join(known) or 'none'}); only existing variables can be set"
            )


def _variable_names(container: dict) -> list[str]:
    names = [k for k, v in container.items() if not _is_stage(v) and not _is_modifier_group(k, v)]
    for stage in container.values():
        if _is_stage(stage):
            names += [k for k, v in stage.items() if not _is_modifier_group(k, v) and k not in names]
    return [n for n in names if n != METADATA_KEY]


# --------------------------------------------------------------------------------------------
# evaluation (SparseML's sparseml/optim/helpers.py semantics)
# --------------------------------------------------------------------------------------------


@dataclass
class _Scope:
    name: str
    stage: str | None
    lines: dict[tuple[str | None, str], int]

    def where(self, key_: str) -> str:
        line = self.lines.get((self.stage, key_))
        stage = f" (stage '{self.stage}')" if self.stage else ""
        return f"{self.name}:{line}" if line else f"{self.name}{stage}"


def _evaluate_variables(
    container: dict, scope: _Scope, global_container: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Resolve the variables of ``container`` in place, to a fixed point. (numeric variables,
    other variables)."""
    global_container = global_container or {}
    valid: dict[str, Any] = {}
    other: dict[str, Any] = {}
    previous = -1
    while previous != len(valid):
        previous = len(valid)
        for name, value in container.items():
            if name in valid:
                continue
            if isinstance(value, int | float):
                valid[name] = value
                continue
            if not _is_eval(value):
                other[name] = value
                continue
            inner = value[5:-1]
            if inner in other:
                result = other[inner]
            elif inner in global_container:
                result = global_container[inner]
            else:
                try:
                    result = restricted_eval(inner, valid)
                except UnknownVariable:
                    continue  # may be defined by a later pass
                except RecipeError as error:
                    raise RecipeError(f"{scope.where(name)}: variable '{name}': {error}") from None
            if isinstance(result, int | float):
                container[name] = result
                valid[name] = result
    for name, value in container.items():
        if _is_eval(value):
            unknown = _first_unknown(value[5:-1], valid)
            why = (
                f"'{unknown}' is not a numeric variable{_stage_text(scope)}"
                if unknown
                else "it gives no number (names a list or a string inside an expression)"
            )
            raise RecipeError(
                f"{scope.where(name)}: variable '{name}' = {value!r} cannot be evaluated: {why}; "
                "or the variables form a cycle"
            )
    return valid, other


def _stage_text(scope: _Scope) -> str:
    return f" of stage '{scope.stage}' or the recipe" if scope.stage else " of the recipe"


def _first_unknown(expression: str, variables: Mapping[str, Any]) -> str | None:
    try:
        restricted_eval(expression, variables)
    except UnknownVariable as error:
        return error.name
    except RecipeError:
        return None
    return None


def _evaluate_value(value: Any, valid: Mapping[str, Any], other: Mapping[str, Any], where: str) -> Any:
    if isinstance(value, str):
        if not _is_eval(value):
            return value
        inner = value[5:-1]
        if inner in other:
            return other[inner]
        try:
            result = restricted_eval(inner, valid)
        except UnknownVariable as error:
            raise RecipeError(f"{where}: {value} names '{error.name}', which is not a variable") from None
        except RecipeError as error:
            raise RecipeError(f"{where}: {error}") from None
        if not isinstance(result, int | float):
            raise RecipeError(f"{where}: {value} gives {result!r}; eval() must give a number")
        return result
    if isinstance(value, list):
        return [_evaluate_value(v, valid, other, where) for v in value]
    if isinstance(value, dict):
        return {k: _evaluate_value(v, valid, other, f"{where}.{k}") for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------


@dataclass
class PlannedModifier:
    """One modifier of the plan: its tag, its validated parameters (a params.py or built-in
    model), its stage, its place in the file (``index``, 1-based, file order) and its line."""

    tag: str
    params: RecipeParams
    stage: str | None = None
    index: int = 0
    line: int | None = None
    # epochs moved by compose() (SparseML's advance_epochs); None: the params' own
    epochs: tuple[float, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def start_epoch(self) -> float:
        """The start epoch SparseML's modifier holds (what it sorts and schedules by)."""
        return self.sparseml_props().get("start_epoch", -1.0)

    @property
    def end_epoch(self) -> float:
        """The end epoch SparseML's modifier holds (``!SetLearningRateModifier``: always -1)."""
        return self.sparseml_props().get("end_epoch", -1.0)

    def sparseml_props(self) -> dict[str, Any]:
        """The keys SparseML's modifier serialises (sorted, None left out) with its values."""
        if isinstance(self.params, BuiltinParams):
            props = self.params.sparseml_props()
        else:
            props = {k: v for k, v in self.params.sparseml_values().items() if v is not None}
        if self.epochs:
            props["start_epoch"], props["end_epoch"] = self.epochs
        props.update(self.extra)
        return dict(sorted(props.items()))

    def identifier(self) -> str:
        """SparseML's ``identifier()``: class name and an md5 of the serialised props."""
        props = sorted(f"{k}:{'null' if v is None else v}" for k, v in self.sparseml_props().items())
        return f"{self.tag}-{hashlib.md5(str(props).encode()).hexdigest()}"  # noqa: S324 - SparseML's

    def to_lines(self) -> list[str]:
        lines = [f"    - !{self.tag}"]
        lines += [f"        {k}: {v}" for k, v in self.sparseml_props().items()]
        return lines + [""]


def _compare_ends(one: float, two: float) -> int:
    if one == two:
        return 0
    if two == -1:
        return -1
    if one == -1:
        return 1
    return -1 if one < two else 1


def _compare(one: PlannedModifier, two: PlannedModifier) -> int:
    """SparseML's ``BaseModifier.comparator``: end epoch (-1 last), start epoch, identifier."""
    result = _compare_ends(one.end_epoch, two.end_epoch)
    if result == 0 and one.start_epoch != two.start_epoch:
        result = 1 if one.start_epoch > two.start_epoch else -1
    if result == 0:
        a, b = one.identifier(), two.identifier()
        result = (a > b) - (a < b)
    return result


def _compare_stages(one: list[PlannedModifier], two: list[PlannedModifier]) -> int:
    """SparseML's ``comparator_lists``: the latest ends, then the earliest starts, then identifiers."""
    result = _compare_ends(
        max(one, key=lambda m: m.end_epoch).end_epoch, max(two, key=lambda m: m.end_epoch).end_epoch
    )
    if result == 0:
        a = min(one, key=lambda m: m.start_epoch).start_epoch
        b = min(two, key=lambda m: m.start_epoch).start_epoch
        result = 0 if a == b else (1 if a > b else -1)
    if result == 0:
        a = max(m.identifier() for m in one)
        b = max(m.identifier() for m in two)
        result = (a > b) - (a < b)
    return result


@dataclass
class RecipePlan:
    """A resolved recipe: its modifiers by stage (``None``: a recipe without stages), sorted as
    SparseML's manager sorts them, its variables after ``recipe_args`` and evaluation, and the
    metadata it carries (``__metadata__``, written back by :meth:`to_yaml`)."""

    source: str
    stages: dict[str | None, list[PlannedModifier]]
    variables: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str | None, Any] = field(default_factory=dict)

    @property
    def staged(self) -> bool:
        return None not in self.stages

    @property
    def modifiers(self) -> list[PlannedModifier]:
        return [m for stage in self.stages.values() for m in stage]

    @property
    def max_epochs(self) -> int:
        """The epochs SparseML's trainer trains: the last start or end epoch, rounded up (-1: none)."""
        epochs = [math.ceil(e) for m in self.modifiers for e in (m.start_epoch, m.end_epoch) if e > -1]
        return max(epochs) if epochs else -1

    @property
    def min_epochs(self) -> int:
        epochs = [math.floor(m.start_epoch) for m in self.modifiers if m.start_epoch > -1]
        return min(epochs) if epochs else -1

    def stage_epochs(self) -> dict[str | None, tuple[float, float]]:
        """(first, last) epoch of each stage as SparseML's ``get_start_end_epochs`` computes them:
        a stage starting at -1 starts where the previous one ends (0 for the first), one ending at
        -1 ends where the next one starts."""
        ranges: dict[str | None, list[float]] = {}
        for stage, modifiers in self.stages.items():
            starts = [math.floor(m.start_epoch) for m in modifiers if m.start_epoch > -1]
            ends = [math.ceil(e) for m in modifiers for e in (m.start_epoch, m.end_epoch) if e > -1]
            ranges[stage] = [min(starts) if starts else -1, max(ends) if ends else -1]
        names = list(ranges)
        for i, stage in enumerate(names):
            if ranges[stage][0] == -1:
                ranges[stage][0] = ranges[names[i - 1]][1] if i > 0 else 0
            if ranges[stage][1] == -1 and i < len(names) - 1:
                ranges[stage][1] = ranges[names[i + 1]][0]
        return {stage: (r[0], r[1]) for stage, r in ranges.items()}

    def to_yaml(self, include_metadata: bool = True) -> str:
        """The recipe as ``ScheduledModifierManager.save`` writes it (``str(manager)``)."""
        lines = [f"version: {RECIPE_VERSION}", ""]
        if not self.staged:
            if include_metadata and self.metadata:
                lines.append(f"{METADATA_KEY}:")
                value = self.metadata.get(None)
                if isinstance(value, dict):
                    lines += _nested_lines(value, 1)
                elif value is not None:
                    lines[-1] += f" {value}"
                lines.append("")
            lines.append("modifiers:")
            for modifier in self.stages[None]:
                lines += modifier.to_lines()
            return "\n".join(lines)
        for stage, modifiers in self.stages.items():
            lines.append(f"{stage}:")
            if include_metadata and self.metadata:
                lines.append(f"  {METADATA_KEY}:")
                value = self.metadata.get(stage)
                if isinstance(value, dict):
                    lines += _nested_lines(value, 2)
                else:
                    lines[-1] += f" {value}"
                lines.append("")
            lines.append(f"  {stage}_modifiers:")
            lines += [f"  {line}" for m in modifiers for line in m.to_lines()]
            lines.append("")
        return "\n".join(lines)

    def save(self, folder: str | Path) -> Path:
        """Write :meth:`to_yaml` to ``folder/recipe.yaml`` (staged through a temporary file)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / RECIPE_NAME
        partial = folder / f".{RECIPE_NAME}.partial"
        partial.write_text(self.to_yaml(), encoding="utf-8")
        partial.replace(target)
        return target


def _nested_lines(values: Mapping[str, Any], depth: int) -> list[str]:
    lines = []
    for name, value in values.items():
        if isinstance(value, dict):
            lines.append("  " * depth + f"{name}:")
            lines += _nested_lines(value, depth + 1)
        else:
            lines.append("  " * depth + f"{name}: {value}")
    return lines


def _build(tag: str, params: dict, where: str, stage: str | None, index: int, line: int) -> PlannedModifier:
    models = _models()
    stage_text = f" in stage '{stage}'" if stage else ""
    if tag not in models:
        if tag in SPARSEML_BUILTINS:
            raise RecipeError(
                f"{where}: modifier {index}{stage_text}: '!{tag}' is a SparseML built-in the native engine "
                f"does not run (it runs {', '.join('!' + t for t in models)}); train this recipe on the "
                "SparseML stack (make venv)"
            )
        close = difflib.get_close_matches(tag, list(models) + list(SPARSEML_BUILTINS), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join('!' + c for c in close)}?" if close else ""
        raise RecipeError(
            f"{where}: modifier {index}{stage_text}: unknown tag '!{tag}'{hint} (the native engine runs "
            f"{', '.join('!' + t for t in models)})"
        )
    try:
        built = validate_recipe(models[tag], params)
    except RecipeParameterError as error:
        raise RecipeError(f"{where}: modifier {index}{stage_text}: {error}") from None
    return PlannedModifier(tag=tag, params=built, stage=stage, index=index, line=line)


def _modifiers_of(container: dict, stage: str | None, name: str, lines: dict) -> list[Tagged]:
    found: list[Tagged] = []
    for key_, value in container.items():
        if _is_modifier_group(key_, value):
            for item in value:
                if not isinstance(item, Tagged):
                    line = lines.get((stage, key_))
                    raise RecipeError(
                        f"{name}{f':{line}' if line else ''}: list '{key_}' holds {item!r}, which is not a "
                        "'- !Tag' modifier"
                    )
                found.append(item)
        elif isinstance(value, Tagged) or (
            isinstance(value, list) and any(isinstance(v, Tagged) for v in value)
        ):
            first = value if isinstance(value, Tagged) else next(v for v in value if isinstance(v, Tagged))
            raise RecipeError(
                f"{name}:{first.line}: '!{first.tag}' is under '{key_}'; modifiers go in lists whose key "
                "holds 'modifiers' (e.g. 'training_modifiers:')"
            )
    return found


def load_recipe(
    source: str | Path, recipe_args: str | Mapping[str, Any] | None = None
) -> RecipePlan:
    """The :class:`RecipePlan` of ``source`` (a ``.yaml`` file, a ``.md`` recipe card or YAML
    text) with ``recipe_args`` overriding its variables, as SparseML's ``from_yaml`` resolves it."""
    text, offset, name = read_recipe_text(source)
    container = _load_yaml(text, offset, name)
    if container is None:
        raise RecipeError(f"{name}: the recipe is empty")
    if not isinstance(container, dict):
        raise RecipeError(f"{name}: a recipe is a YAML mapping with a 'modifiers:' list of '- !Tag' entries")
    lines = _key_lines(text, offset)
    overrides = parse_recipe_args(recipe_args)
    if overrides:
        _apply_recipe_args(container, overrides, name)

    stage_names = [k for k, v in container.items() if _is_stage(v)]
    if stage_names and any(_is_modifier_group(k, v) for k, v in container.items()):
        raise RecipeError(
            f"{name}: the recipe has both top-level modifier lists and stages ({', '.join(stage_names)}); "
            "SparseML would silently drop the stages: put every modifier list in a stage"
        )
    stages: dict[str | None, list[PlannedModifier]] = {}
    metadata: dict[str | None, Any] = {}
    variables: dict[str, Any] = {}
    if not stage_names:
        scope = _Scope(name, None, lines)
        valid, other = _evaluate_variables(container, scope)
        variables = {k: v for k, v in container.items() if not _is_modifier_group(k, v)}
        stages[None] = _plan_stage(container, None, valid, other, name, lines)
        carried = container.get(METADATA_KEY)
        metadata[None] = carried if isinstance(carried, dict) else None
    else:
        main = {k: v for k, v in container.items() if k not in stage_names}
        global_valid, global_other = _evaluate_variables(main, _Scope(name, None, lines))
        variables = dict(main)
        index = 0
        for stage in stage_names:
            stage_container = container[stage]
            valid, other = _evaluate_variables(stage_container, _Scope(name, stage, lines), main)
            valid = {**{k: v for k, v in global_valid.items() if k not in valid}, **valid}
            other = {**{k: v for k, v in global_other.items() if k not in other}, **other}
            planned = _plan_stage(stage_container, stage, valid, other, name, lines, start_index=index)
            index += len(planned)
            stages[stage] = planned
            variables.update(
                {f"{stage}.{k}": v for k, v in stage_container.items() if not _is_modifier_group(k, v)}
            )
            value = stage_container.get(METADATA_KEY)
            metadata[stage] = value
        if any(v is not None for v in metadata.values()) and any(v is None for v in metadata.values()):
            raise RecipeError(
                f"{name}: some stages carry '{METADATA_KEY}' and some do not; SparseML wants all or none"
            )
    if not any(stages.values()):
        raise RecipeError(
            f"{name}: no modifiers found: list them under a key whose name holds 'modifiers' "
            "(or under such keys in stages)"
        )
    empty = [s for s, mods in stages.items() if not mods]
    if empty:
        raise RecipeError(f"{name}: stage '{empty[0]}' lists no modifiers")
    sorted_stages = {s: sorted(m, key=cmp_to_key(_compare)) for s, m in stages.items()}
    if stage_names:
        order = sorted(sorted_stages.items(), key=cmp_to_key(lambda a, b: _compare_stages(a[1], b[1])))
        sorted_stages = dict(order)
    variables.pop(METADATA_KEY, None)
    return RecipePlan(source=name, stages=sorted_stages, variables=variables, metadata=metadata)


def _plan_stage(
    container: dict,
    stage: str | None,
    valid: Mapping[str, Any],
    other: Mapping[str, Any],
    name: str,
    lines: dict,
    start_index: int = 0,
) -> list[PlannedModifier]:
    planned = []
    for number, tagged in enumerate(_modifiers_of(container, stage, name, lines), start=start_index + 1):
        where = f"{name}:{tagged.line}"
        params = {
            k: _evaluate_value(v, valid, other, f"{where}: !{tagged.tag} key '{k}'")
            for k, v in tagged.params.items()
        }
        planned.append(_build(tagged.tag, params, where, stage, number, tagged.line))
    return planned


# --------------------------------------------------------------------------------------------
# composing a recipe onto the one saved with a checkpoint (SparseML's compose_staged)
# --------------------------------------------------------------------------------------------

_EXTRA_EPOCH_KEYS = {"OBertQuantizationModifier": ("freeze_observer_epoch",)}


def compose(base: RecipePlan, additional: RecipePlan) -> RecipePlan:
    """``additional`` appended to ``base`` as SparseML's ``compose_staged`` does (what its trainer
    saves when a model folder that holds a recipe trains again): two plain recipes become stages
    ``stage_0``/``stage_1``; the base's modifiers that end at -1 end at the base's ``max_epochs``;
    the additional modifiers' epochs move by that many epochs (a start of -1 counts as 0)."""
    base_stages = _copy_stages(base)
    more_stages = _copy_stages(additional)
    base_meta, more_meta = dict(base.metadata), dict(additional.metadata)
    if not base.staged and not additional.staged:
        base_stages, more_stages = {"stage_0": base_stages[None]}, {"stage_1": more_stages[None]}
        base_meta, more_meta = {"stage_0": base_meta.get(None)}, {"stage_1": more_meta.get(None)}
    elif base.staged and not additional.staged:
        name = f"stage_{len(base_stages) + 1}"
        if name in base_stages:
            raise RecipeError(
                f"{base.source}: composing would add stage '{name}', which the recipe already has"
            )
        more_stages, more_meta = {name: more_stages[None]}, {name: more_meta.get(None)}
    elif not base.staged:
        name = f"pre_{next(iter(more_stages))}"
        base_stages, base_meta = {name: base_stages[None]}, {name: base_meta.get(None)}
    shared = set(base_stages) & set(more_stages)
    if shared:
        raise RecipeError(
            f"{additional.source}: stage name(s) {sorted(shared)} also in {base.source}; rename them"
        )
    shift = base.max_epochs
    for modifiers in base_stages.values():
        for m in modifiers:
            if m.end_epoch == -1:
                m.epochs = (m.start_epoch, shift)  # SparseML writes the int max_epochs
    for stage, modifiers in more_stages.items():
        for m in modifiers:
            end = m.end_epoch if m.end_epoch == -1 else m.end_epoch + shift
            m.epochs = (max(0.0, m.start_epoch) + shift, end)
            for extra in _EXTRA_EPOCH_KEYS.get(m.tag, ()):
                value = getattr(m.params, extra, None)
                if value is not None:
                    m.extra[extra] = max(0.0, value) + shift
            m.stage = stage
    stages = {**base_stages, **more_stages}
    order = sorted(stages.items(), key=cmp_to_key(lambda a, b: _compare_stages(a[1], b[1])))
    stages = {s: sorted(m, key=cmp_to_key(_compare)) for s, m in order}
    return RecipePlan(
        source=f"{base.source} + {additional.source}",
        stages=stages,
        variables={**base.variables, **additional.variables},
        metadata={**base_meta, **more_meta},
    )


def _copy_stages(plan: RecipePlan) -> dict[str | None, list[PlannedModifier]]:
    return {
        stage: [dataclasses.replace(m, extra=dict(m.extra)) for m in modifiers]
        for stage, modifiers in plan.stages.items()
    }


# --------------------------------------------------------------------------------------------
# the learning rate functions (SparseML's LearningRateFunctionModifier, bit for bit)
# --------------------------------------------------------------------------------------------


def lr_at(params: LearningRateFunctionParams, epoch: float, steps_per_epoch: int) -> float:
    """The learning rate ``params`` sets at ``epoch`` (fractional) with ``steps_per_epoch``."""
    init, final = params.init_lr, params.final_lr
    start = params.start_epoch if params.start_epoch > 0 else 0.0
    end = params.end_epoch
    if params.lr_func == "linear":
        return init + ((epoch - start) / (end - start)) * (final - init)
    if params.lr_func == "cosine":
        x_norm = (epoch - start) / (end - start)
        if final < init:
            y_range, y_shift, x_shift = init - final, final, 0.0
        else:
            y_range, y_shift, x_shift = final - init, init, math.pi
        return math.cos(x_norm * math.pi + x_shift) * y_range / 2 + y_range / 2 + y_shift
    end_step = params.end_epoch * steps_per_epoch
    start_step = params.start_epoch * steps_per_epoch
    cycle_steps = params.cycle_epochs * steps_per_epoch
    current_step = (epoch - params.start_epoch) * steps_per_epoch
    if current_step > int((end_step - start_step) / cycle_steps) * cycle_steps:
        cycle_steps = (end_step - start_step) % cycle_steps
    adjusted_step = current_step % cycle_steps
    return init - (adjusted_step / (cycle_steps - 1)) * (init - final)
