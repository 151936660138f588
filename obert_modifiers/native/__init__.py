"""The SparseML-free side of obert-modifiers (docs/native.md).

- :mod:`obert_modifiers.native.recipe`: a native engine for SparseML's v1 recipe language
  (variables, restricted ``eval()``, stages, ``recipe_args``, ``.md`` recipe cards) that builds every
  modifier into a typed plan and writes the recipe into a saved model folder as SparseML does.
  Imports neither SparseML nor torch (``obert recipe check`` uses it in a light install).
- :mod:`obert_modifiers.native.trainer`: the Trainer adapter that runs such a plan on transformers 5
  (:class:`RecipeTrainer`, :class:`RecipeTrainerMixin`), with :mod:`~obert_modifiers.native.lifecycle`
  (the runner) and :mod:`~obert_modifiers.native.modifiers` (one lifecycle class per recipe tag, pure
  torch) and :mod:`~obert_modifiers.native.attention`
  (attention-matmul QAT through transformers' attention registry). Imported on first use, so
  ``import obert_modifiers.native`` stays light.

Nothing here imports SparseML (``tests/test_architecture.py``, rules ``native-no-sparseml`` and
``native-recipe-light``).
"""

from obert_modifiers.native.recipe import (
    BUILTINS,
    PlannedModifier,
    RecipeError,
    RecipePlan,
    load_recipe,
    lr_at,
    parse_recipe_args,
    restricted_eval,
)

_LAZY = {
    "RecipeTrainer": "obert_modifiers.native.trainer",
    "RecipeTrainerMixin": "obert_modifiers.native.trainer",
    "RecipeCallback": "obert_modifiers.native.trainer",
    "load_teacher": "obert_modifiers.native.trainer",
    "load_model": "obert_modifiers.native.reload",
    "RecipeRunner": "obert_modifiers.native.lifecycle",
    "RecipeRunError": "obert_modifiers.native.lifecycle",
    "default_prune_params": "obert_modifiers.native.families",
}

__all__ = [
    "BUILTINS",
    "PlannedModifier",
    "RecipeError",
    "RecipePlan",
    "load_recipe",
    "lr_at",
    "parse_recipe_args",
    "restricted_eval",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'obert_modifiers.native' has no attribute {name!r}")
