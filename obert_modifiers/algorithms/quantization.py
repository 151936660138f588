"""Quantization-aware training (QAT) to INT8 for BERT-family models, in plain torch.

What gets fake-quantized (simulated INT8 in the forward pass, straight-through gradients):

* ``nn.Linear`` layers -> :class:`QuantizedLinear`: the input activation (asymmetric UINT8, moving
  average min/max observer) and the weight (symmetric INT8, per tensor or per output channel).
  Output activations are left in float: the next quantized op quantizes its own input, which is
  the pattern SparseML's ONNX conversion turns into ``MatMulInteger`` (the op DeepSparse runs with
  its INT8 kernels). The bias is fake-quantized too, to the INT32 grid ``input scale x weight
  scale`` that the integer graph adds it on (:func:`int32_bias`): without that, the exported
  ``MatMulInteger`` graph rounds every bias by up to half a grid step that training never saw,
  and those small shifts flip downstream activation roundings layer after layer (measured on the
  demo's MiniLM: logits moved by up to 0.56 without it, 0.017 with it).
* The two attention matmuls (``Q @ K^T`` and ``probs @ V``) -> :class:`QuantizedMatMul` inside
  :class:`QuantizableBertSelfAttention`; left input asymmetric, right input symmetric, as SparseML's
  own BERT QAT does.
* Optionally ``nn.Embedding`` weights -> :class:`QuantizedEmbedding` (asymmetric UINT8 table).

Sparsity survives QAT: weights are quantized symmetrically (zero point 0), so a pruned weight of
exactly 0 fake-quantizes to exactly 0 and exports as the zero point; :func:`weight_masks` and
:func:`apply_masks` keep pruned weights at 0 through the optimizer steps.

Parameters are shared with the float modules they replace (no copies), so an optimizer created
before QAT started keeps training the same tensors, and parameter names (``...query.weight``)
do not change: pruning masks and recipes that name parameters keep working.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.ao.quantization import (
    FakeQuantize,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    QConfig,
)
from torch.nn import functional as F

WEIGHT_STRATEGIES = ("tensor", "channel")


def activation_fake_quant(symmetric: bool = False) -> FakeQuantize:
    """UINT8 activation fake-quantizer: asymmetric by default; symmetric means zero point 128."""
    return FakeQuantize(
        observer=MovingAverageMinMaxObserver,
        quant_min=0,
        quant_max=255,
        dtype=torch.quint8,
        qscheme=torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine,
        reduce_range=False,
    )


def weight_fake_quant(strategy: str = "tensor", num_channels: int | None = None) -> FakeQuantize:
    """Symmetric INT8 weight fake-quantizer (zero point 0, so 0.0 stays exactly 0.0)."""
    if strategy not in WEIGHT_STRATEGIES:
        raise ValueError(f"weight strategy must be one of {WEIGHT_STRATEGIES}, got {strategy!r}")
    if strategy == "channel":
        fake_quant = FakeQuantize(
            observer=MovingAveragePerChannelMinMaxObserver,
            quant_min=-128,
            quant_max=127,
            dtype=torch.qint8,
            qscheme=torch.per_channel_symmetric,
            ch_axis=0,
        )
        if num_channels:
            # full-size qparams from the start, so a saved checkpoint reloads without shape errors
            fake_quant.scale = torch.ones(num_channels, dtype=torch.float)
            fake_quant.zero_point = torch.zeros(num_channels, dtype=torch.int)
        return fake_quant
    return FakeQuantize(
        observer=MovingAverageMinMaxObserver,
        quant_min=-128,
        quant_max=127,
        dtype=torch.qint8,
        qscheme=torch.per_tensor_symmetric,
    )


def embedding_fake_quant() -> FakeQuantize:
    """Asymmetric UINT8 fake-quantizer for embedding tables (what SparseML exports for BERT)."""
    return FakeQuantize(
        observer=MovingAverageMinMaxObserver,
        quant_min=0,
        quant_max=255,
        dtype=torch.quint8,
        qscheme=torch.per_tensor_affine,
    )


def _qconfig(strategy: str) -> QConfig:
    # Exporters (SparseML's ``export_onnx(convert_qat=True)``) detect a QAT model by a truthy
    # ``qconfig`` attribute; we never hand it to torch's prepare/convert.
    weight_observer = (
        MovingAveragePerChannelMinMaxObserver if strategy == "channel" else MovingAverageMinMaxObserver
    )
    return QConfig(
        activation=FakeQuantize.with_args(observer=MovingAverageMinMaxObserver),
        weight=FakeQuantize.with_args(observer=weight_observer),
    )


INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def int32_bias(bias: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """``bias`` rounded to the INT32 grid of an integer matmul, ``input_scale * weight_scale``
    (a scalar, or one step per output channel for per-channel weights), with a straight-through
    gradient. This is exactly the bias an INT8 runtime adds to the INT32 accumulator."""
    step = (input_scale.float() * weight_scale.float()).to(bias.dtype)
    on_grid = torch.clamp(torch.round(bias / step), INT32_MIN, INT32_MAX) * step
    return bias + (on_grid - bias).detach()


class QuantizedLinear(nn.Linear):
    """``nn.Linear`` with fake-quantized input, weight and (INT32) bias; shares the float layer's
    parameters."""

    def __init__(self, linear: nn.Linear, strategy: str = "tensor"):
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        device = linear.weight.device
        self.input_quant = activation_fake_quant().to(device)
        self.weight_fake_quant = weight_fake_quant(strategy, linear.out_features).to(device)
        self.weight_strategy = strategy
        self.qconfig = _qconfig(strategy)

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_fake_quant(self.weight)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        inputs = self.input_quant(inputs)  # updates the input scale first when observing
        weight = self.quantized_weight()
        bias = self.bias
        if bias is not None and not torch.onnx.is_in_onnx_export():
            # in an ONNX export the bias stays one plain initializer, the pattern SparseML turns
            # into MatMulInteger + INT32 Add (its conversion rounds it to this same grid); QDQ
            # exports call bake_int32_biases first
            bias = int32_bias(bias, self.input_quant.scale, self.weight_fake_quant.scale)
        return F.linear(inputs, weight, bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, int8 weights per {self.weight_strategy}"


class QuantizedEmbedding(nn.Embedding):
    """``nn.Embedding`` whose table is fake-quantized to UINT8; shares the float table."""

    def __init__(self, embedding: nn.Embedding):
        nn.Module.__init__(self)
        for name in (
            "num_embeddings",
            "embedding_dim",
            "padding_idx",
            "max_norm",
            "norm_type",
            "scale_grad_by_freq",
            "sparse",
        ):
            setattr(self, name, getattr(embedding, name))
        self.weight = embedding.weight
        self.weight_fake_quant = embedding_fake_quant().to(embedding.weight.device)
        self.qconfig = _qconfig("tensor")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(
            ids,
            self.weight_fake_quant(self.weight),
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )


class QuantizedMatMul(nn.Module):
    """``torch.matmul(a, b)`` with both inputs fake-quantized (a asymmetric, b symmetric)."""

    def __init__(self) -> None:
        super().__init__()
        self.left_quant = activation_fake_quant(symmetric=False)
        self.right_quant = activation_fake_quant(symmetric=True)
        self.qconfig = _qconfig("tensor")

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.left_quant(left), self.right_quant(right))


class QuantizableBertSelfAttention(nn.Module):
    """BERT encoder self-attention whose two matmuls are :class:`QuantizedMatMul` modules.

    Takes over the ``query``/``key``/``value`` projections and dropout of the attention module
    it replaces (same submodule names, so state-dict keys are unchanged). Supports what BERT
    encoders use: absolute positions, no cross-attention, no KV cache.
    """

    def __init__(self, attention: nn.Module):
        super().__init__()
        position_type = getattr(attention, "position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(
                f"attention matmul quantization supports absolute position embeddings only, "
                f"got position_embedding_type={position_type!r}"
            )
        if getattr(attention, "is_decoder", False):
            raise ValueError("attention matmul quantization supports encoder (non-decoder) attention only")
        self.num_attention_heads = attention.num_attention_heads
        self.attention_head_size = attention.attention_head_size
        self.all_head_size = attention.all_head_size
        self.query = attention.query
        self.key = attention.key
        self.value = attention.value
        self.dropout = attention.dropout
        self.attention_scores_matmul = QuantizedMatMul().to(attention.query.weight.device)
        self.context_layer_matmul = QuantizedMatMul().to(attention.query.weight.device)

    def _heads(self, tensor: torch.Tensor) -> torch.Tensor:
        batch, length = tensor.shape[0], tensor.shape[1]
        return tensor.view(batch, length, self.num_attention_heads, self.attention_head_size).permute(
            0, 2, 1, 3
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        past_key_value: tuple[torch.Tensor, ...] | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        if encoder_hidden_states is not None or past_key_value is not None:
            raise ValueError("QuantizableBertSelfAttention does not support cross-attention or a KV cache")
        query = self._heads(self.query(hidden_states))
        key = self._heads(self.key(hidden_states))
        value = self._heads(self.value(hidden_states))
        scores = self.attention_scores_matmul(query, key.transpose(-1, -2))
        scores = scores / math.sqrt(self.attention_head_size)
        if attention_mask is not None:
            scores = scores + attention_mask  # additive mask: 0 keep, large negative drop
        probs = self.dropout(F.softmax(scores, dim=-1))
        if head_mask is not None:
            probs = probs * head_mask
        context = self.context_layer_matmul(probs, value)
        context = context.permute(0, 2, 1, 3).contiguous()
        context = context.view(context.shape[0], context.shape[1], self.all_head_size)
        return (context, probs) if output_attentions else (context,)


@dataclass
class QuantizationPlan:
    """What :func:`quantize_model` changed (module names), for logs and tests."""

    linears: list[str] = field(default_factory=list)
    matmuls: list[str] = field(default_factory=list)
    embeddings: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)

    @property
    def num_quantized(self) -> int:
        return len(self.linears) + len(self.matmuls) + len(self.embeddings)


def _matches(name: str, module: nn.Module, patterns: Sequence[str]) -> bool:
    """True if ``module`` (called ``name``) is excluded by a class name, a module name (the module
    or any parent), or a ``re:`` pattern on the name."""
    type_names = {cls.__name__ for cls in type(module).__mro__}
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.search(pattern[3:], name):
                return True
        elif pattern in type_names:
            return True
        elif name == pattern or name.startswith(pattern + "."):
            return True
    return False


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _is_bert_self_attention(module: nn.Module) -> bool:
    # matched by duck typing: HF BertSelfAttention (eager or SDPA) and look-alikes (RoBERTa, ...)
    return (
        all(
            hasattr(module, attr)
            for attr in (
                "query",
                "key",
                "value",
                "num_attention_heads",
                "attention_head_size",
                "all_head_size",
            )
        )
        and isinstance(module.query, nn.Linear)
        and not isinstance(module, QuantizableBertSelfAttention)
    )


def quantize_model(
    model: nn.Module,
    *,
    weight_strategy: str = "tensor",
    quantize_matmuls: bool = True,
    quantize_embeddings: bool = False,
    exclude: Sequence[str] = ("classifier",),
) -> QuantizationPlan:
    """Swap float modules of ``model`` for fake-quantized ones, in place (idempotent).

    ``exclude`` holds module class names (``LayerNorm``, ``Embedding``), module names (a name
    excludes its whole subtree: ``classifier``, ``bert.pooler``) or ``re:`` patterns.
    """
    plan = QuantizationPlan()
    if quantize_matmuls:
        for name, module in list(model.named_modules()):
            if _is_bert_self_attention(module) and not _matches(name, module, exclude):
                _set_submodule(model, name, QuantizableBertSelfAttention(module))
                plan.matmuls += [f"{name}.attention_scores_matmul", f"{name}.context_layer_matmul"]
    for name, module in list(model.named_modules()):
        if isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
            continue
        if isinstance(module, nn.Linear):
            if _matches(name, module, exclude):
                plan.excluded.append(name)
                continue
            _set_submodule(model, name, QuantizedLinear(module, weight_strategy))
            plan.linears.append(name)
        elif isinstance(module, nn.Embedding) and quantize_embeddings:
            if _matches(name, module, exclude):
                plan.excluded.append(name)
                continue
            _set_submodule(model, name, QuantizedEmbedding(module))
            plan.embeddings.append(name)
    return plan


def bake_int32_biases(model: nn.Module) -> int:
    """Store every :class:`QuantizedLinear` bias on its INT32 grid (what the forward pass uses),
    so an exported graph that keeps the bias in float (QDQ) computes what PyTorch computes.
    Returns the number of biases rounded."""
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, QuantizedLinear) and module.bias is not None:
                module.bias.copy_(
                    int32_bias(module.bias, module.input_quant.scale, module.weight_fake_quant.scale)
                )
                count += 1
    return count


def fake_quantizers(model: nn.Module) -> Iterable[FakeQuantize]:
    return (module for module in model.modules() if isinstance(module, FakeQuantize))


def is_quantized(model: nn.Module) -> bool:
    return any(True for _ in fake_quantizers(model))


def freeze_observers(model: nn.Module) -> int:
    """Stop updating quantization ranges (scales/zero points keep their current values)."""
    count = 0
    for fake_quant in fake_quantizers(model):
        fake_quant.disable_observer()
        count += 1
    return count


def observers_frozen(model: nn.Module) -> bool:
    quantizers = list(fake_quantizers(model))
    return bool(quantizers) and all(int(fq.observer_enabled[0]) == 0 for fq in quantizers)


def quantized_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameter name -> weight for every fake-quantized Linear/Embedding."""
    return {
        f"{name}.weight": module.weight
        for name, module in model.named_modules()
        if isinstance(module, (QuantizedLinear, QuantizedEmbedding))
    }


def weight_masks(weights: dict[str, torch.Tensor], min_sparsity: float = 0.0) -> dict[str, torch.Tensor]:
    """Boolean keep-masks (``weight != 0``) for weights with at least ``min_sparsity`` zeros."""
    masks = {}
    for name, weight in weights.items():
        keep = weight.detach() != 0
        if weight.numel() and 1.0 - keep.float().mean().item() > min_sparsity:
            masks[name] = keep
    return masks


@torch.no_grad()
def apply_masks(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    """Set pruned entries back to exactly 0 (after an optimizer step)."""
    for name, keep in masks.items():
        weights[name].mul_(keep)


def mask_gradients(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    """Zero the gradients of pruned entries (before an optimizer step), so optimizer state stays 0."""
    for name, keep in masks.items():
        grad = weights[name].grad
        if grad is not None:
            grad.mul_(keep)


def sparsity(tensor: torch.Tensor) -> float:
    return float((tensor == 0).float().mean().item()) if tensor.numel() else 0.0
