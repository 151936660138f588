"""Reloading a model folder saved by the native adapter, on the modern stack.

Layer drop needs nothing: the saved config has the smaller ``num_hidden_layers`` (and, for
ModernBERT, the trimmed ``layer_types``), so plain ``from_pretrained`` reads it. QAT adds
fake-quantization modules whose scales and zero points are in the weights file: :func:`load_model`
reads ``recipe.yaml`` from the folder, re-creates those modules as the recipe built them (attention
matmuls through :mod:`~obert_modifiers.native.attention`), loads the weights again and checks that
every key of the file found its place (SparseML re-applies the recipe as structure the same way).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from obert_modifiers.algorithms import quantization as qat
from obert_modifiers.native.attention import quantize_attention
from obert_modifiers.native.lifecycle import RecipeRunError
from obert_modifiers.native.recipe import RECIPE_NAME, load_recipe

__all__ = ["apply_recipe_structure", "load_model", "read_weights"]


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved folder (``model.safetensors``, shards, or ``pytorch_model.bin``)."""
    files = sorted(folder.glob("model*.safetensors"))
    if files:
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for file in files:
            state.update(load_file(str(file)))
        return state
    files = sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise RecipeRunError(f"{folder}: no model.safetensors or pytorch_model.bin")
    state = {}
    for file in files:
        state.update(torch.load(file, map_location="cpu", weights_only=True))
    return state


def apply_recipe_structure(model: nn.Module, recipe: str | os.PathLike) -> bool:
    """Re-create on ``model`` (built from a saved config) the modules the recipe added in training:
    QAT's fake-quantization modules (attention matmuls through the attention registry). Layer drop
    needs nothing (the config is smaller). Returns whether anything was added."""
    plan = load_recipe(recipe)
    ziplm = [m for m in plan.modifiers if m.tag == "ZipLMPruningModifier" and m.params.structure]
    changed = False
    if ziplm:
        from obert_modifiers.algorithms import shrink

        try:
            changed = shrink.apply_structure(model, ziplm[-1].params.structure)
        except shrink.ShrinkError as error:
            raise RecipeRunError(f"{recipe}: !ZipLMPruningModifier recipe key 'structure': {error}") from None
    quantization = [m for m in plan.modifiers if m.tag == "OBertQuantizationModifier"]
    if not quantization:
        return changed
    params = quantization[-1].params
    qat.quantize_model(
        model, weight_strategy=params.weight_strategy, quantize_matmuls=False,
        quantize_embeddings=params.quantize_embeddings, exclude=params.exclude,
    )  # fmt: skip
    if params.quantize_matmuls:
        quantize_attention(model, params.exclude)
    return True


def load_model(folder: str | os.PathLike, model_class: type | None = None, **kwargs) -> nn.Module:
    """The model saved in ``folder`` with the structure its ``recipe.yaml`` built: ZipLM's shrunk
    shapes (``obert_structure`` in the config) and QAT modules; ``model_class`` defaults to
    ``AutoModelForSequenceClassification``; ``kwargs`` go to ``from_pretrained`` (``config=``)."""
    folder = Path(folder)
    if model_class is None:
        from transformers import AutoModelForSequenceClassification as model_class
    recipe = folder / RECIPE_NAME
    config = kwargs.pop("config", None)
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder)
    if not recipe.is_file() and getattr(config, "obert_structure", None) is None:
        return model_class.from_pretrained(folder, config=config, **kwargs)
    # built from the config, given the recipe's structure, then every weight of the file loaded
    model = model_class.from_config(config) if hasattr(model_class, "from_config") else model_class(config)
    if getattr(config, "obert_structure", None) is not None:
        from obert_modifiers.algorithms import shrink

        shrink.apply_structure(model)
    if recipe.is_file():
        apply_recipe_structure(model, recipe)
    state = read_weights(folder)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not _tied(model, k)]
    if missing or result.unexpected_keys:
        raise RecipeRunError(
            f"{folder}: the weights do not fit the structure of {RECIPE_NAME} (missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]})"
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


def _tied(model: nn.Module, key: str) -> bool:
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or ()
    return key in tied
