"""``obert recipe check``: parse a recipe with SparseML's own loader and explain what it holds, or
say exactly what is wrong (file, line, modifier, key, what was expected).

The recipe is loaded with ``ScheduledModifierManager.from_yaml``, the same call the trainer makes.
Before that, a few SparseML 1.8 traps that otherwise give confusing errors are checked on the text:
the ``.yml`` extension (rejected), a tag followed by a ``.`` on its line (flow style such as
``- !Tag {a: 1.0}``: SparseML's tag rewrite skips it, and loading fails with "could not determine a
constructor"), namespaced tags, unknown tags, YAML syntax errors (with the line in the file), an
empty recipe, a top-level list and a key given twice (:func:`check_recipe_yaml`, which the compat
fix ``recipe_structure`` also runs on every recipe SparseML loads, in training too).
When the load fails, each modifier is loaded alone through SparseML's loader to find the culprit.
Multi-stage (staged) recipes are supported: every message about a modifier names its stage, and
``recipe_args`` may set global variables or variables of a stage (SparseML sets every variable of
that name, as ``--recipe_args`` does in training).

Where SparseML is not installed (the modern environment, ``make venv-modern``), or with
``OBERT_RECIPE_ENGINE=native``, the same text checks run and the recipe is then resolved by the
native engine (:mod:`obert_modifiers.native.recipe`), which gives the same modifiers, parameters
and epochs without importing SparseML; SparseML built-ins it does not run are refused by name.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from obert_modifiers.errors import ObertError

RECIPE_SUFFIXES = (".yaml", ".md")
TAG_PATTERN = re.compile(r"(?:^|[\s\-\[{,:])!(?P<tag>[A-Za-z_][A-Za-z0-9_.]*)")
OBJECT_PREFIX = "OBJECT."


class RecipeCheckError(ObertError, ValueError):
    """A recipe that SparseML cannot load; the message names the place and the fix."""


@dataclass
class ModifierSummary:
    index: int
    stage: str | None
    tag: str
    start_epoch: Any
    end_epoch: Any
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class RecipeSummary:
    path: Path
    modifiers: list[ModifierSummary]
    max_epochs: float | None
    variables: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    engine: str = "sparseml"  # or "native" (obert_modifiers.native.recipe, where SparseML is absent)


def _fail(path: Path, message: str, line: int | None = None) -> RecipeCheckError:
    where = f"{path}:{line}" if line is not None else str(path)
    return RecipeCheckError(f"{where}: {message}")


def _read_recipe_text(path: Path) -> tuple[str, int]:
    """The YAML text of the recipe and the line offset of that text in the file (front matter)."""
    if not path.exists():
        raise RecipeCheckError(f"{path}: recipe file not found")
    if path.is_dir():
        raise RecipeCheckError(f"{path}: is a folder; give the recipe file (.yaml or .md)")
    suffix = path.suffix.lower()
    if suffix not in RECIPE_SUFFIXES:
        hint = f"; rename it to {path.with_suffix('.yaml').name}" if suffix == ".yml" else ""
        raise RecipeCheckError(
            f"{path}: SparseML 1.8 reads recipes only from '.yaml' or '.md' files "
            f"(it rejects '{path.suffix}'){hint}"
        )
    text = path.read_text(encoding="utf-8")
    if suffix == ".md":
        match = re.compile(r"^\s*(?:---|\+\+\+)(.*?)(?:---|\+\+\+)", re.S | re.M).search(text)
        if not match:
            raise RecipeCheckError(f"{path}: no YAML front matter (between '---' lines) in this recipe card")
        return match.group(1), text[: match.start(1)].count("\n")
    return text, 0


def _check_tag_lines(path: Path, text: str, offset: int) -> None:
    for number, line in enumerate(text.splitlines(), start=1 + offset):
        for match in TAG_PATTERN.finditer(line):
            tag = match.group("tag")
            if "." in tag:
                bare = tag.rsplit(".", 1)[-1]
                raise _fail(
                    path,
                    f"tag '!{tag}': SparseML recipes use bare tags (write '!{bare}'); "
                    "namespaced tags are not rewritten and do not load",
                    number,
                )
            rest = line[match.end() :]
            if "." in rest:
                raise _fail(
                    path,
                    f"'!{tag}' is followed by '{rest.strip()}' on the same line. SparseML's tag rewrite "
                    "skips a tag that has a '.' later on its line (flow style '- !Tag {a: 1.0}', or a "
                    "comment), and the load then fails with 'could not determine a constructor'. "
                    f"Put '- !{tag}' alone on its line with its keys below it (block style)",
                    number,
                )


RECIPE_SHAPE = "a recipe is a YAML mapping with a 'modifiers:' list of '- !Tag' entries (or stages of them)"


def check_recipe_yaml(text: str, source: str | Path = "recipe", offset: int = 0) -> None:
    """Refuse what SparseML's loader gets wrong: an empty recipe or one whose top level is not a
    mapping (SparseML fails with ``TypeError: 'NoneType' object is not iterable`` or
    ``AttributeError: 'list' object has no attribute 'items'``), and a key given twice in one
    mapping (YAML keeps the last one silently), named with both lines. ``offset`` is the line of
    ``text`` in ``source`` (front matter of a ``.md`` card). Text that is not valid YAML passes
    (the loader reports the syntax error). Used by ``obert recipe check`` and, through the compat
    fix ``recipe_structure``, by every SparseML recipe load (the stock training scripts too)."""
    import yaml

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return
    if root is None:
        raise RecipeCheckError(f"{source}: the recipe is empty; {RECIPE_SHAPE}")
    if isinstance(root, yaml.SequenceNode):
        raise _fail(
            Path(str(source)),
            f"the recipe's top level is a list; {RECIPE_SHAPE}: put the '- !Tag' entries under "
            "'modifiers:'",
            root.start_mark.line + 1 + offset,
        )
    if not isinstance(root, yaml.MappingNode):
        raise RecipeCheckError(f"{source}: the recipe is the single value {root.value!r}; {RECIPE_SHAPE}")
    stack: list[tuple[yaml.Node, str]] = [(root, "the recipe's top level")]
    while stack:
        node, where = stack.pop()
        if isinstance(node, yaml.SequenceNode):
            stack.extend((item, where) for item in reversed(node.value))
            continue
        if not isinstance(node, yaml.MappingNode):
            continue
        if node.tag.startswith("!"):
            where = f"modifier {node.tag}"
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1 + offset
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if name is not None and name in seen:
                raise _fail(
                    Path(str(source)),
                    f"{where} gives '{name}' twice (lines {seen[name]} and {line}); YAML would keep "
                    "only the last one without a word: remove one",
                    line,
                )
            if name is not None:
                seen[name] = line
            inner = f"'{name}:'" if where == "the recipe's top level" else f"{where}, key '{name}'"
            stack.append((value_node, inner))


def _tag_line(text: str, offset: int, tag: str, occurrence: int = 0) -> int | None:
    seen = 0
    for number, line in enumerate(text.splitlines(), start=1 + offset):
        for match in TAG_PATTERN.finditer(line):
            if match.group("tag") == tag:
                if seen == occurrence:
                    return number
                seen += 1
    return None


def _modifier_entries(container: Any) -> list[tuple[str | None, str, dict]]:
    """(stage, tag, params) for every modifier in a recipe loaded without classes."""

    def from_group(stage: str | None, group: dict) -> list[tuple[str | None, str, dict]]:
        entries = []
        for key, value in group.items():
            if "modifiers" not in key or not isinstance(value, list):
                continue
            for item in value:
                # block style '- !Tag' + keys reads as {OBJECT.Tag: None, key: value, ...}
                names = [
                    k
                    for k in (item if isinstance(item, dict) else {})
                    if isinstance(k, str) and k.startswith(OBJECT_PREFIX)
                ]
                if isinstance(item, dict) and len(names) == 1:
                    value = item[names[0]]
                    params = dict(value) if isinstance(value, dict) else {}
                    params.update({k: v for k, v in item.items() if k != names[0]})
                    entries.append((stage, names[0][len(OBJECT_PREFIX) :], params))
                    continue
                raise RecipeCheckError(
                    f"list '{key}'{f' in stage {stage}' if stage else ''} holds {item!r}, "
                    "which is not a '!Tag' modifier"
                )
        return entries

    if not isinstance(container, dict):
        raise RecipeCheckError("the recipe is not a YAML mapping with a 'modifiers' list")
    if any("modifiers" in key for key in container):
        return from_group(None, container)
    entries = []
    for stage, value in container.items():
        if isinstance(value, dict) and any("modifiers" in key for key in value):
            entries.extend(from_group(stage, value))
    return entries


def _registered_tags() -> dict[str, type]:
    import sparseml.pytorch.sparsification  # noqa: F401  (registers SparseML's tags, then ours)
    import yaml
    from sparseml.optim.modifier import BaseModifier

    prefix = "!pytorch."
    tags = {key[len(prefix) :] for key in yaml.SafeLoader.yaml_constructors if str(key).startswith(prefix)}
    classes: dict[str, type] = {}
    stack = [BaseModifier]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            stack.append(sub)
            if sub.__name__ in tags:
                classes.setdefault(sub.__name__, sub)
    return {tag: classes.get(tag) for tag in tags}


def _explain_modifier_error(tag: str, cls: type | None, error: Exception) -> str:
    from obert_modifiers.modifiers._base import RecipeParameterError, unknown_key_message
    from obert_modifiers.params import PARAMS

    if isinstance(error, RecipeParameterError):
        return str(error)  # our tags (obert_modifiers.params): already names the modifier and the key
    text = str(error)
    if text.startswith(f"!{tag}:"):
        return text
    if tag in PARAMS:
        return f"!{tag}: {type(error).__name__}: {text}"
    # SparseML's own modifiers take their keys as __init__ arguments: a bad key is a TypeError
    unexpected = re.search(r"unexpected keyword argument '([^']+)'", text)
    if unexpected and cls is not None:
        return unknown_key_message(cls, unexpected.group(1))
    if unexpected:
        return f"!{tag}: unknown recipe key '{unexpected.group(1)}'"
    missing = re.search(r"missing \d+ required (?:positional |keyword-only )?arguments?: (.*)", text)
    if missing:
        keys = re.findall(r"'([^']+)'", missing.group(1))
        return f"!{tag}: missing required recipe key(s): {', '.join(keys)}"
    return f"!{tag}: {type(error).__name__}: {text}"


def _find_culprit(
    path: Path, text: str, offset: int, raw: Any, resolved: Any, registered: dict
) -> str | None:
    """Load each modifier alone (variables resolved) to find the one that fails. Modifiers are
    tried and numbered in file order: the resolved recipe is re-serialised by SparseML with its
    modifier groups sorted by name, so its order is not the file's; entries are matched by
    (stage, tag, occurrence within the stage)."""
    from sparseml.optim.helpers import rewrite_recipe_yaml_string_with_classes
    from sparseml.pytorch.sparsification.modifier import Modifier

    def keyed(entries: list[tuple[str | None, str, dict]]) -> list[tuple[tuple, dict]]:
        seen: dict[tuple, int] = {}
        out = []
        for stage, tag, params in entries:
            count = seen.get((stage, tag), 0)
            seen[(stage, tag)] = count + 1
            out.append(((stage, tag, count), params))
        return out

    resolved_params = dict(keyed(_modifier_entries(resolved)))
    occurrences: dict[str, int] = {}
    for index, ((stage, tag, _count), raw_params) in enumerate(keyed(_modifier_entries(raw))):
        occurrence = occurrences.get(tag, 0)
        occurrences[tag] = occurrence + 1
        params = resolved_params.get((stage, tag, _count), raw_params)
        single = rewrite_recipe_yaml_string_with_classes({"modifiers": [{f"{OBJECT_PREFIX}{tag}": params}]})
        try:
            loaded = Modifier.load_list(single)
            del loaded
        except Exception as error:  # noqa: BLE001 - any failure of this modifier is the answer
            line = _tag_line(text, offset, tag, occurrence)
            where = f"{path}:{line}" if line else str(path)
            stage_text = f" in stage '{stage}'" if stage else ""
            message = _explain_modifier_error(tag, registered.get(tag), error)
            return f"{where}: modifier {index + 1}{stage_text}: {message}"
    return None


def check_recipe(path: str | Path, recipe_args: str | dict | None = None) -> RecipeSummary:
    """Load ``path`` with SparseML's ``ScheduledModifierManager.from_yaml`` (with ``recipe_args``
    overriding recipe variables: a dict, JSON, or ``k=v,k2=v2``) and describe every modifier.
    Raises :class:`RecipeCheckError` with a message that names the place and the problem."""
    import yaml

    path = Path(path)
    text, offset = _read_recipe_text(path)
    check_recipe_yaml(text, path, offset)
    _check_tag_lines(path, text, offset)
    if not sparseml_available():
        return _check_recipe_native(path, recipe_args)

    from sparseml.optim.helpers import (
        evaluate_recipe_yaml_str_equations,
        load_recipe_yaml_str,
        load_recipe_yaml_str_no_classes,
        parse_recipe_variables,
    )
    from sparseml.pytorch.optim import ScheduledModifierManager

    try:
        raw = load_recipe_yaml_str_no_classes(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        line = mark.line + 1 + offset if mark is not None else None
        column = f", column {mark.column + 1}" if mark is not None else ""
        context = f" ({error.context})" if error.context else ""
        raise _fail(path, f"YAML syntax error{column}: {error.problem}{context}", line) from None
    entries = _modifier_entries(raw)
    if not entries:
        raise _fail(path, "no modifiers found: list them under a top-level key whose name holds 'modifiers'")

    registered = _registered_tags()
    for index, (_stage, tag, _params) in enumerate(entries):
        if tag not in registered:
            close = difflib.get_close_matches(tag, list(registered), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join('!' + c for c in close)}?" if close else ""
            raise _fail(
                path,
                f"modifier {index + 1}: unknown tag '!{tag}'{hint} (known: SparseML's modifiers and "
                "!OBertPruningModifier, !LayerDropModifier, !OBertQuantizationModifier, "
                "!OBertDistillationModifier)",
                _tag_line(text, offset, tag),
            )

    try:
        variables = parse_recipe_variables(recipe_args)
    except (ValueError, TypeError) as error:
        raise RecipeCheckError(
            f"--recipe-args {recipe_args!r}: expected JSON or k=v,k2=v2 ({error})"
        ) from None
    recipe_variables = [k for k, v in raw.items() if "modifiers" not in k and not isinstance(v, dict)]
    for value in raw.values():  # variables of stages (staged recipes)
        if isinstance(value, dict) and any("modifiers" in key for key in value):
            recipe_variables += [
                k for k in value if "modifiers" not in k and k != "__metadata__" and k not in recipe_variables
            ]
    unknown = [k for k in variables if k not in recipe_variables]
    if unknown:
        raise RecipeCheckError(
            f"--recipe-args: {', '.join(map(repr, unknown))} is not a variable of {path} "
            f"(its variables: {', '.join(recipe_variables) or 'none'}); only existing variables can be set"
        )
    try:
        resolved_text = load_recipe_yaml_str(str(path), **variables)
        resolved = load_recipe_yaml_str_no_classes(evaluate_recipe_yaml_str_equations(resolved_text))
    except Exception as error:  # noqa: BLE001 - variables and eval() errors, reported as they are
        raise _fail(path, f"recipe variables: {type(error).__name__}: {error}") from None

    try:
        manager = ScheduledModifierManager.from_yaml(str(path), recipe_variables=variables)
    except Exception as error:  # noqa: BLE001
        culprit = _find_culprit(path, text, offset, raw, resolved, registered)
        if culprit:
            raise RecipeCheckError(culprit) from None
        raise _fail(path, f"{type(error).__name__}: {error}") from None

    summaries: list[ModifierSummary] = []
    staged = manager.modifiers if isinstance(manager.modifiers, dict) else {None: manager.modifiers}
    for stage, modifiers in staged.items():
        for modifier in modifiers:
            params = modifier.props(only_serializable=True)
            summaries.append(
                ModifierSummary(
                    index=len(summaries) + 1,
                    stage=stage,
                    tag=type(modifier).__name__,
                    start_epoch=params.pop("start_epoch", None),
                    end_epoch=params.pop("end_epoch", None),
                    params=params,
                )
            )
    max_epochs = getattr(manager, "max_epochs", None)
    recipe_vars = {k: v for k, v in raw.items() if "modifiers" not in k and not isinstance(v, dict)}
    recipe_vars.update(variables)
    del manager
    return RecipeSummary(
        path=path,
        modifiers=summaries,
        max_epochs=max_epochs,
        variables=recipe_vars,
        warnings=_schedule_warnings(summaries, max_epochs),
    )


ENGINE_VARIABLE = "OBERT_RECIPE_ENGINE"


def sparseml_available() -> bool:
    """Whether ``obert recipe check`` loads recipes with SparseML: it is installed (and not blocked),
    unless ``OBERT_RECIPE_ENGINE=native`` asks for the native engine."""
    if os.environ.get(ENGINE_VARIABLE, "").strip().lower() == "native":
        return False
    if "sparseml" in sys.modules:
        return sys.modules["sparseml"] is not None
    try:
        return importlib.util.find_spec("sparseml") is not None
    except (ImportError, ValueError):
        return False


def _check_recipe_native(path: Path, recipe_args: str | dict | None) -> RecipeSummary:
    """:func:`check_recipe` without SparseML: the native engine resolves the recipe."""
    from obert_modifiers.native.recipe import RecipeError, load_recipe

    try:
        plan = load_recipe(path, recipe_args)
    except RecipeError as error:
        raise RecipeCheckError(str(error)) from None
    summaries = []
    for modifier in plan.modifiers:
        params = modifier.sparseml_props()
        summaries.append(
            ModifierSummary(
                index=len(summaries) + 1,
                stage=modifier.stage,
                tag=modifier.tag,
                start_epoch=params.pop("start_epoch", None),
                end_epoch=params.pop("end_epoch", None),
                params=params,
            )
        )
    variables = {k: v for k, v in plan.variables.items() if "." not in k and not isinstance(v, dict)}
    return RecipeSummary(
        path=path,
        modifiers=summaries,
        max_epochs=plan.max_epochs,
        variables=variables,
        warnings=_schedule_warnings(summaries, plan.max_epochs),
        engine="native",
    )


def _schedule_warnings(modifiers: list[ModifierSummary], max_epochs: Any) -> list[str]:
    """SparseML's trainer trains ``max_epochs`` = the LAST modifier epoch rounded UP: a schedule that
    ends at 4.5 trains 5 epochs, the last half outside every window (at the final LR, with no
    pruning/QAT/distillation schedule left to apply). Legal, but rarely what was meant."""
    epochs = [
        float(e)
        for m in modifiers
        for e in (m.start_epoch, m.end_epoch)
        if isinstance(e, int | float) and e > -1
    ]
    if not epochs or not isinstance(max_epochs, int | float):
        return []
    last = max(epochs)
    if last >= max_epochs:
        return []
    owner = next(
        (f"modifier {m.index} (!{m.tag})" for m in modifiers if last in (m.start_epoch, m.end_epoch)), ""
    )
    return [
        f"the schedule ends at epoch {last:g} ({owner}) but SparseML's trainer rounds the training up "
        f"to {max_epochs:g} epochs: the last {max_epochs - last:g} epoch(s) train outside every "
        "modifier window. Make the last epoch whole (or lengthen a stage) unless that is intended."
    ]
