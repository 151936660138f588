"""INT8 fake quantization of the attention matmuls on transformers 5, without swapping modules.

transformers 5 computes attention in a function chosen by ``config._attn_implementation`` from its
attention-function registry (``AttentionInterface``). :func:`quantize_attention` attaches two
:class:`~obert_modifiers.algorithms.quantization.QuantizedMatMul` modules (``attention_scores_matmul``
for ``Q @ K^T``, ``context_layer_matmul`` for ``probs @ V``, the names SparseML's BERT QAT uses) to
every module that calls that registry, registers the function ``obert_qat`` (eager attention whose
two matmuls go through those modules when present) with the eager mask, and switches the model to
it. The attention modules, their parameters and their names are unchanged, so pruning masks,
recipes naming parameters and ``output_attentions`` keep working. With fake quantization off the
function is eager attention exactly.

Families whose attention does not call the registry (DeBERTa-v2 computes its disentangled
attention itself) get no matmul quantization; their linears and embeddings are still quantized.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from obert_modifiers.algorithms.quantization import QuantizedMatMul, _matches

__all__ = ["ATTENTION_NAME", "attention_modules", "obert_attention", "quantize_attention", "register"]

_LOGGER = logging.getLogger(__name__)
ATTENTION_NAME = "obert_qat"
LEFT, RIGHT = "attention_scores_matmul", "context_layer_matmul"


def obert_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention (transformers' ``eager_attention_forward``) with the module's quantized
    matmuls where it has them."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    left = getattr(module, LEFT, None)
    right = getattr(module, RIGHT, None)
    key_t = key.transpose(2, 3)
    scores = (left(query, key_t) if left is not None else torch.matmul(query, key_t)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    output = right(probs, value) if right is not None else torch.matmul(probs, value)
    return output.transpose(1, 2).contiguous(), probs


@functools.cache
def register() -> str:
    """Register ``obert_qat`` with transformers' attention and mask registries (once)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION_NAME, obert_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)
    return ATTENTION_NAME


@functools.cache
def _calls_registry(cls: type) -> bool:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules of ``model`` that compute attention through transformers' registry."""
    return [(name, m) for name, m in model.named_modules() if _calls_registry(type(m))]


def quantize_attention(model: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
    """Attach quantized matmuls to every attention module (not excluded) and switch ``model`` to
    ``obert_qat`` attention; returns the matmul names (empty: a family that does not use the
    registry, see the module docstring)."""
    names = []
    for name, module in attention_modules(model):
        if _matches(name, module, exclude):
            continue
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        if not hasattr(module, LEFT):
            setattr(module, LEFT, QuantizedMatMul().to(device))
            setattr(module, RIGHT, QuantizedMatMul().to(device))
        names += [f"{name}.{LEFT}", f"{name}.{RIGHT}"]
    if not names:
        _LOGGER.warning(
            "%s computes attention without transformers' attention registry: its attention matmuls stay "
            "in float (linears and embeddings are quantized)",
            type(model).__name__,
        )
        return names
    use_attention(model)
    return names


def use_attention(model: nn.Module) -> None:
    """Switch ``model`` (and its submodels' configs) to ``obert_qat`` attention (eager attention:
    it also returns the attention maps, which attention distillation reads)."""
    if getattr(getattr(model, "config", None), "_attn_implementation", None) == ATTENTION_NAME:
        return
    if not attention_modules(model):
        raise ValueError(
            f"{type(model).__name__} computes attention without transformers' attention registry: "
            "attention distillation and attention-matmul QAT do not reach it"
        )
    register()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTENTION_NAME)
    else:  # a bare module: set the configs the attention modules read
        for module in model.modules():
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "_attn_implementation"):
                config._attn_implementation = ATTENTION_NAME
