"""Shared helpers for our SparseML adapters: parameter validation with messages that name the
modifier and the recipe key, and YAML-1.1 number coercion (``1e-7`` loads as a string)."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Sequence
from typing import Any

from obert_modifiers.errors import ObertError


class RecipeParameterError(ObertError, ValueError):
    """A recipe gave a modifier a bad value. The message names modifier, key, value and what is expected."""

    def __init__(self, modifier: str, key: str, value: Any, expected: str):
        self.modifier, self.key, self.value, self.expected = modifier, key, value, expected
        super().__init__(f"!{modifier}: recipe key '{key}' = {value!r} is invalid: expected {expected}")


def coerce_float(
    modifier: str,
    key: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    min_exclusive: bool = False,
    allow_none: bool = False,
) -> float | None:
    """A float from a recipe value, accepting numeric strings such as ``'1e-7'`` (PyYAML reads
    exponent notation without a dot as a string)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool):
        raise RecipeParameterError(modifier, key, value, "a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RecipeParameterError(modifier, key, value, "a number") from None
    if minimum is not None and (number < minimum or (min_exclusive and number == minimum)):
        bound = ">" if min_exclusive else ">="
        raise RecipeParameterError(modifier, key, value, f"a number {bound} {minimum}")
    if maximum is not None and number > maximum:
        raise RecipeParameterError(modifier, key, value, f"a number <= {maximum}")
    return number


def coerce_int(modifier: str, key: str, value: Any, *, minimum: int | None = None) -> int:
    """An integer from a recipe value (``'1024'`` and ``1024.0`` are accepted, ``1.5`` is not)."""
    number = coerce_float(modifier, key, value)
    if number != int(number):
        raise RecipeParameterError(modifier, key, value, "a whole number")
    if minimum is not None and number < minimum:
        raise RecipeParameterError(modifier, key, value, f"a whole number >= {minimum}")
    return int(number)


def coerce_choice(modifier: str, key: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise RecipeParameterError(modifier, key, value, f"one of {', '.join(map(repr, choices))}")
    return value


def coerce_bool(modifier: str, key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise RecipeParameterError(modifier, key, value, "true or false")


def coerce_str_list(modifier: str, key: str, value: Any, *, allow_empty: bool = False) -> list:
    """A list of strings; a single string becomes a one-item list (``__ALL__`` style tokens too)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise RecipeParameterError(modifier, key, value, "a list of names or 're:' patterns")
    if not value and not allow_empty:
        raise RecipeParameterError(modifier, key, value, "at least one name or 're:' pattern")
    return list(value)


def unknown_key_message(modifier_cls: type, key: str) -> str:
    """A message for a recipe key the modifier does not take, with the closest valid keys."""
    valid = accepted_keys(modifier_cls)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "."
    return (
        f"!{modifier_cls.__name__}: unknown recipe key '{key}'{hint} Valid keys: {', '.join(sorted(valid))}"
    )


def accepted_keys(modifier_cls: type) -> list:
    parameters = inspect.signature(modifier_cls.__init__).parameters
    return [
        name
        for name, p in parameters.items()
        if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]


def check_epochs(modifier: str, start_epoch: Any, end_epoch: Any, *, end_required: bool) -> tuple:
    """Validate a schedule window: start >= 0 (or -1 for 'from the beginning'), end > start."""
    start = coerce_float(modifier, "start_epoch", start_epoch)
    end = coerce_float(modifier, "end_epoch", end_epoch)
    if start < 0 and start != -1:
        raise RecipeParameterError(modifier, "start_epoch", start_epoch, "a number >= 0, or -1")
    if end_required and end <= max(start, 0):
        raise RecipeParameterError(modifier, "end_epoch", end_epoch, f"a number > start_epoch ({start})")
    if not end_required and end != -1 and end < start:
        raise RecipeParameterError(
            modifier, "end_epoch", end_epoch, f"-1 or a number >= start_epoch ({start})"
        )
    return start, end
