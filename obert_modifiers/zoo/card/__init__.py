"""Model cards: ``model.md`` = YAML front matter (a pydantic schema; SparseZoo's field names where
they exist) + a markdown body a person wants to read, with PNG plots beside it.

``write_card(folder)`` builds the card from a training output folder, a deployment folder
(``export.json``), or a zoo-layout folder (``deployment/`` + ``training/``); keyword ``facts``
override or add what the files do not say (``stub=``, ``dataset=``, ``metrics=``, ``dense_metrics=``,
``latency=`` (BenchmarkResult objects or dicts), ``license=``, ...). No torch: weights are read with
``obert_modifiers.zoo.weights``.

``schema.py`` (the front matter: models, parse, validate, render), ``facts.py`` (what the files
say), ``render.py`` (body, plots, ``write_card``); this module only re-exports.
"""

from obert_modifiers.zoo.card.facts import card_facts, summarize_recipe
from obert_modifiers.zoo.card.render import render_body, write_card, write_plots
from obert_modifiers.zoo.card.schema import (
    CARD_NAME,
    LATENCY_PLOT,
    SPARSITY_PLOT,
    CardError,
    Latency,
    Metric,
    ModelCard,
    ModelSize,
    RecipeModifier,
    RecipeSummary,
    Sparsity,
    parse_card,
    read_card,
    render_card,
    split_front_matter,
    validate_card,
)

__all__ = [
    "CARD_NAME",
    "LATENCY_PLOT",
    "SPARSITY_PLOT",
    "CardError",
    "Latency",
    "Metric",
    "ModelCard",
    "ModelSize",
    "RecipeModifier",
    "RecipeSummary",
    "Sparsity",
    "card_facts",
    "parse_card",
    "read_card",
    "render_body",
    "render_card",
    "split_front_matter",
    "summarize_recipe",
    "validate_card",
    "write_card",
    "write_plots",
]
