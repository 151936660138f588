"""Shared helpers for our SparseML adapters: the bridge from a parameter model of
:mod:`obert_modifiers.params` to SparseML's ``ModifierProp`` properties (:func:`recipe_properties`)
and to a modifier's attributes (:func:`store_recipe`). :class:`RecipeParameterError` (the error a bad
recipe key raises) lives in :mod:`obert_modifiers.params` and is re-exported here.

This module imports SparseML only inside :func:`recipe_properties`."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from obert_modifiers.params import RecipeParams

from obert_modifiers.params import RecipeParameterError

__all__ = [
    "RecipeParameterError",
    "accepted_keys",
    "recipe_properties",
    "store_recipe",
    "unknown_key_message",
]


def unknown_key_message(modifier_cls: type, key: str) -> str:
    """A message for a recipe key the modifier does not take, with the closest valid keys (for
    SparseML's own modifiers, whose keys are their ``__init__`` arguments)."""
    from obert_modifiers.params import unknown_key_text

    return unknown_key_text(modifier_cls.__name__, key, accepted_keys(modifier_cls))


def accepted_keys(modifier_cls: type) -> list:
    parameters = inspect.signature(modifier_cls.__init__).parameters
    return [
        name
        for name, p in parameters.items()
        if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]


# --------------------------------------------------------------------------------------------
# parameter model -> SparseML adapter
# --------------------------------------------------------------------------------------------


def store_recipe(modifier: Any, params: RecipeParams) -> None:
    """Keep each validated key as ``modifier._<key>``, except the keys SparseML's base classes own
    (``start_epoch``, ``end_epoch``, ``update_frequency``: passed to their ``__init__``)."""
    for name, value in params.recipe_values().items():
        if not _sparseml_owned(type(modifier), name):
            setattr(modifier, f"_{name}", value)


def recipe_properties(params_model: type[RecipeParams], settable: Iterable[str] = ()) -> Callable:
    """Class decorator: a ``ModifierProp`` getter for every key of ``params_model`` that SparseML's
    base classes do not already serve (so ``props()``, ``str(modifier)`` and the ``recipe.yaml``
    saved with a model list every key), a setter for the keys in ``settable`` (setters validate the
    new value with the model's rules, against the other keys' current values), and an ``__init__``
    signature listing the keys (``inspect.signature`` shows what a recipe may hold)."""
    from sparseml.optim import ModifierProp

    settable = set(settable)

    def decorate(cls: type) -> type:
        names = [name for name in params_model.model_fields if not _sparseml_owned(cls, name)]
        unknown = settable - set(names)
        if unknown:
            raise TypeError(f"{cls.__name__}: no recipe key(s) {sorted(unknown)} to set")
        for name in names:
            prop = ModifierProp()(_getter(name, params_model.model_fields[name].description))
            if name in settable:
                prop = prop.setter(_setter(params_model, name))
            setattr(cls, name, prop)
        cls.__init__.__signature__ = _signature(params_model)
        return cls

    return decorate


def _sparseml_owned(cls: type, name: str) -> bool:
    from sparseml.optim import ModifierProp

    return any(isinstance(vars(base).get(name), ModifierProp) for base in cls.__mro__[1:])


def _getter(name: str, doc: str | None) -> Callable:
    def getter(self: Any) -> Any:
        return getattr(self, f"_{name}")

    getter.__name__, getter.__doc__ = name, doc
    return getter


def _setter(params_model: type[RecipeParams], name: str) -> Callable:
    from obert_modifiers.params import validate_recipe

    def setter(self: Any, value: Any) -> None:
        current = {
            key: getattr(self, key) if _sparseml_owned(type(self), key) else getattr(self, f"_{key}")
            for key in params_model.model_fields
        }
        params = validate_recipe(params_model, {**current, name: value})
        setattr(self, f"_{name}", getattr(params, name))

    setter.__name__ = name
    return setter


def _signature(params_model: type[RecipeParams]) -> inspect.Signature:
    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for name, field in params_model.model_fields.items():
        default = inspect.Parameter.empty if field.is_required() else field.default
        kind = inspect.Parameter.KEYWORD_ONLY
        parameters.append(inspect.Parameter(name, kind, default=default, annotation=field.annotation))
    return inspect.Signature(parameters)


def show_modifier_logs() -> None:
    """Our modifiers' INFO lines (what each pruning step chose, which layers were dropped) appear in the
    stock training commands' output as SparseML's own do: SparseML gives its ``sparseml`` logger a
    console handler at INFO, while a logger without one shows only warnings. Idempotent; a handler the
    user installed is left alone (``obert demo``/``obert export`` reroute console handlers to their
    log files, ``obert_modifiers.runs.logs``)."""
    logger = logging.getLogger("obert_modifiers.modifiers")
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(name)-12s %(levelname)-8s %(message)s", "%Y-%m-%d %H:%M:%S")
    )
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


show_modifier_logs()
