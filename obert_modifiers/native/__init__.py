"""The SparseML-free side of obert-modifiers (docs/native.md).

Today: :mod:`obert_modifiers.native.recipe`, a native engine for SparseML's v1 recipe language
(variables, restricted ``eval()``, stages, ``recipe_args``, ``.md`` recipe cards) that builds every
modifier into a typed plan and writes the recipe into a saved model folder as SparseML does. The
Trainer adapter that runs such a plan comes next.

Nothing in this package imports SparseML or torch (``tests/test_architecture.py``, rule
``native-no-sparseml``).
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

__all__ = [
    "BUILTINS",
    "PlannedModifier",
    "RecipeError",
    "RecipePlan",
    "load_recipe",
    "lr_at",
    "parse_recipe_args",
    "restricted_eval",
]
