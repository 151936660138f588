"""Physically shrink a BERT-family encoder: attention heads, FFN neurons, whole blocks (pure torch +
transformers; no SparseML).

* Heads go through transformers' own ``prune_heads``, so ``config.pruned_heads`` records them and
  plain ``from_pretrained`` rebuilds the head counts of every layer.
* FFN neurons are rows of ``intermediate.dense`` and columns of ``output.dense``. transformers has a
  single ``intermediate_size``, so per-layer widths are recorded in the config under
  ``obert_structure`` and re-applied by :func:`apply_structure` before weights are loaded
  (:func:`load_shrunk_model`). Plain ``from_pretrained`` of such a model raises on the size mismatch.
* A block with nothing left is replaced by a stand-in that computes exactly what the zero-width block
  computes in a post-LayerNorm layer, ``LayerNorm(x + dropout(b_out))``, without the zero-width
  matrices: an attention block with every head removed kills ``torch.onnx.export`` (TorchScript)
  with SIGFPE. The stand-ins keep the zero-width linears as submodules, so their state dict is that
  of the zero-width block and a checkpoint loads either way.

Indices passed to :func:`shrink_model` are positions among a layer's *current* heads or neurons (what
a pruning database built on the current model speaks); head bookkeeping in original indices is left
to transformers.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from obert_modifiers.algorithms.layer_drop import LayerDropError, find_encoder_layers
from obert_modifiers.errors import ObertError

__all__ = [
    "STRUCTURE_KEY",
    "ShrinkError",
    "RemovedAttention",
    "RemovedIntermediate",
    "RemovedOutput",
    "ParamSlice",
    "encoder_layers",
    "layer_heads",
    "layer_ffn",
    "read_structure",
    "shrink_model",
    "apply_structure",
    "save_shrunk_model",
    "load_shrunk_model",
    "read_state_dict",
]

STRUCTURE_KEY = "obert_structure"
STRUCTURE_FORMAT = 1


class ShrinkError(ObertError, ValueError):
    """The model, the structure or a checkpoint does not allow the shrink/reload (message says which)."""


class RemovedAttention(nn.Module):
    """An attention block with every head removed: ``LayerNorm(x + dropout(b_out))``.

    Exactly the zero-head block's output (its context is empty, so the output projection yields its
    bias), without zero-width matmuls in the graph. ``self`` and ``output`` are the zero-width
    modules, kept so parameter names and the state dict match the block it replaces."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.self = attention.self
        self.output = attention.output
        self.pruned_heads = set(getattr(attention, "pruned_heads", set()))

    def prune_heads(self, heads) -> None:
        """Nothing is left to prune (transformers calls this when it re-applies ``pruned_heads``)."""

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        head_mask: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        past_key_value=None,
        output_attentions: bool | None = False,
        **kwargs,
    ) -> tuple[Tensor, ...]:
        out = self.output
        bias = out.dense.bias
        contribution = out.dropout(bias.expand_as(hidden_states)) if self.training else bias
        attention_output = out.LayerNorm(hidden_states + contribution)
        batch, seq = hidden_states.shape[:2]
        if "cache" in kwargs:  # transformers 5's layers pass cache= and unpack (output, weights)
            return attention_output, hidden_states.new_zeros(batch, 0, seq, seq)
        if output_attentions:
            return attention_output, hidden_states.new_zeros(batch, 0, seq, seq)
        return (attention_output,)


class RemovedIntermediate(nn.Module):
    """The first FFN linear with no neuron left: passes its input on (:class:`RemovedOutput` ignores it)."""

    def __init__(self, intermediate: nn.Module) -> None:
        super().__init__()
        self.dense = intermediate.dense

    def forward(self, hidden_states: Tensor) -> Tensor:
        return hidden_states


class RemovedOutput(nn.Module):
    """The FFN output with no neuron left: ``LayerNorm(x + dropout(b_out))``, as the zero-width block."""

    def __init__(self, output: nn.Module) -> None:
        super().__init__()
        self.dense = output.dense
        self.LayerNorm = output.LayerNorm
        self.dropout = output.dropout

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        bias = self.dense.bias
        contribution = self.dropout(bias.expand_as(input_tensor)) if self.training else bias
        return self.LayerNorm(input_tensor + contribution)


@dataclass(frozen=True)
class ParamSlice:
    """``new`` holds ``old.index_select(dim, index)`` (``index`` None: all of it), for moving optimizer
    state onto the shrunk parameters."""

    old: nn.Parameter
    new: nn.Parameter
    index: Tensor | None
    dim: int


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder layers of a BERT-family model (``attention.self``/``attention.output``,
    ``intermediate``, ``output`` in every layer)."""
    try:
        _, layers = find_encoder_layers(model)
    except LayerDropError as exc:
        raise ShrinkError(str(exc)) from None
    for index, layer in enumerate(layers):
        if not all(hasattr(layer, name) for name in ("attention", "intermediate", "output")):
            raise ShrinkError(
                f"encoder layer {index} ({type(layer).__name__}) is not BERT-like: it needs attention, "
                f"intermediate and output submodules"
            )
    config = getattr(model, "config", None)
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ShrinkError(
            "structured shrinking supports encoders only (config.is_decoder / add_cross_attention are set)"
        )
    return layers


def layer_heads(layer: nn.Module) -> int:
    """Attention heads the layer has now (0 for a removed block)."""
    if isinstance(layer.attention, RemovedAttention):
        return 0
    return int(layer.attention.self.num_attention_heads)


def layer_ffn(layer: nn.Module) -> int:
    """FFN neurons the layer has now (0 for a removed block)."""
    return int(layer.intermediate.dense.out_features)


def read_structure(model: nn.Module) -> dict:
    """``{"format": 1, "heads": [per layer], "ffn": [per layer]}`` of the model as it is."""
    layers = encoder_layers(model)
    return {
        "format": STRUCTURE_FORMAT,
        "heads": [layer_heads(layer) for layer in layers],
        "ffn": [layer_ffn(layer) for layer in layers],
    }


def _current_heads(attention: nn.Module) -> list[int]:
    """Original indices of the heads the block still has, ascending."""
    pruned = set(getattr(attention, "pruned_heads", set()))
    total = int(attention.self.num_attention_heads) + len(pruned)
    return [h for h in range(total) if h not in pruned]


def _validate_keep(keep: Sequence[int], size: int, what: str) -> list[int]:
    kept = sorted(int(k) for k in keep)
    if len(set(kept)) != len(kept) or any(not 0 <= k < size for k in kept):
        raise ShrinkError(f"{what}: kept indices {list(keep)} must be distinct and in 0..{size - 1}")
    return kept


def _set_weight(linear: nn.Linear, weight: Tensor, what: str) -> None:
    if tuple(weight.shape) != tuple(linear.weight.shape):
        raise ShrinkError(
            f"{what}: the new weight is {tuple(weight.shape)}, "
            f"the shrunk layer needs {tuple(linear.weight.shape)}"
        )
    with torch.no_grad():
        linear.weight.copy_(weight.to(linear.weight.dtype))


def _slice_linear(linear: nn.Linear, index: Tensor, dim: int) -> nn.Linear:
    """A new linear keeping ``index`` along ``dim`` of the weight (0: outputs, 1: inputs), dtype kept."""
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device))
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach()[index] if dim == 0 else linear.bias.detach())
    return new


def _prune_heads(model: nn.Module, attention: nn.Module, index: int, kept: list[int]) -> list[ParamSlice]:
    """Remove the heads not in ``kept`` (current positions) through transformers' ``prune_heads``."""
    current = int(attention.self.num_attention_heads)
    originals = _current_heads(attention)
    remove = [originals[i] for i in range(current) if i not in set(kept)]
    head_size = attention.self.attention_head_size
    rows = torch.tensor([k * head_size + j for k in kept for j in range(head_size)], dtype=torch.long)
    old = {name: getattr(attention.self, name) for name in ("query", "key", "value")}
    old_out = attention.output.dense
    if not hasattr(attention, "prune_heads"):  # transformers 5 dropped head pruning: do it here
        _slice_heads(model, attention, index, kept, remove, rows)
    elif hasattr(model, "prune_heads") and hasattr(model, "config"):
        model.prune_heads({index: remove})  # records config.pruned_heads
    else:
        attention.prune_heads(remove)
    slices = []
    for name, linear in old.items():
        new = getattr(attention.self, name)
        slices.append(ParamSlice(linear.weight, new.weight, rows, 0))
        if new.bias is not None:
            slices.append(ParamSlice(linear.bias, new.bias, rows, 0))
    slices.append(ParamSlice(old_out.weight, attention.output.dense.weight, rows, 1))
    if old_out.bias is not None:
        slices.append(ParamSlice(old_out.bias, attention.output.dense.bias, None, 0))
    return slices


def _slice_heads(model: nn.Module, attention: nn.Module, index: int, kept: list[int], remove: list[int],
                 rows: Tensor) -> None:
    """What transformers 4's ``prune_heads`` did: keep the rows of Q/K/V and the input columns of the
    output projection of the kept heads, lower the head counts, and record the removed (original)
    heads in ``attention.pruned_heads`` and ``config.pruned_heads``."""
    self_attention = attention.self
    for name in ("query", "key", "value"):
        setattr(self_attention, name, _slice_linear(getattr(self_attention, name), rows, 0))
    attention.output.dense = _slice_linear(attention.output.dense, rows, 1)
    self_attention.num_attention_heads = len(kept)
    self_attention.all_head_size = len(kept) * self_attention.attention_head_size
    attention.pruned_heads = set(getattr(attention, "pruned_heads", set())) | set(remove)
    config = getattr(model, "config", None)
    if config is not None:
        recorded = {int(k): list(v) for k, v in (getattr(config, "pruned_heads", None) or {}).items()}
        recorded[index] = sorted(set(recorded.get(index, [])) | set(remove))
        config.pruned_heads = recorded


def _record(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, STRUCTURE_KEY, read_structure(model))


def shrink_model(
    model: nn.Module,
    heads: Mapping[int, Sequence[int]] | None = None,
    ffn: Mapping[int, Sequence[int]] | None = None,
    *,
    attention_weights: Mapping[int, Tensor] | None = None,
    ffn_weights: Mapping[int, Tensor] | None = None,
) -> list[ParamSlice]:
    """Keep, in layer ``l``, the heads ``heads[l]`` and the FFN neurons ``ffn[l]`` (positions among
    the layer's current ones); layers not named are left alone. ``attention_weights[l]`` /
    ``ffn_weights[l]`` replace the shrunk output projection's weight (the OBS-updated one, kept
    columns only). A block left empty becomes its stand-in. The structure is recorded in
    ``config.obert_structure`` (heads also in ``config.pruned_heads``). Returns how each replaced
    parameter maps onto its successor."""
    with torch.no_grad(), warnings.catch_warnings():
        # zero-width linears: torch warns that initialising an empty tensor is a no-op
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        return _shrink(model, heads, ffn, attention_weights, ffn_weights)


def _shrink(model, heads, ffn, attention_weights, ffn_weights) -> list[ParamSlice]:
    layers = encoder_layers(model)
    heads = {int(k): v for k, v in (heads or {}).items()}  # JSON round trips turn keys into strings
    ffn = {int(k): v for k, v in (ffn or {}).items()}
    attention_weights = {int(k): v for k, v in (attention_weights or {}).items()}
    ffn_weights = {int(k): v for k, v in (ffn_weights or {}).items()}
    for name, mapping in (("attention_weights", attention_weights), ("ffn_weights", ffn_weights)):
        unknown = sorted(set(mapping) - set(heads if name == "attention_weights" else ffn))
        if unknown:
            raise ShrinkError(f"{name}: layers {unknown} have weights but no kept {name.split('_')[0]} list")
    for name, mapping in (("heads", heads), ("ffn", ffn)):
        bad = [layer for layer in mapping if not 0 <= int(layer) < len(layers)]
        if bad:
            raise ShrinkError(f"{name}: layers {bad} do not exist (the encoder has {len(layers)})")
    slices: list[ParamSlice] = []

    for index, keep in sorted(heads.items()):
        layer = layers[index]
        current = layer_heads(layer)
        kept = _validate_keep(keep, current, f"heads of layer {index}")
        if len(kept) < current:
            slices += _prune_heads(model, layer.attention, index, kept)
        if index in attention_weights:
            what = f"attention output of layer {index}"
            _set_weight(layer.attention.output.dense, attention_weights[index], what)
        if not kept and not isinstance(layer.attention, RemovedAttention):
            layer.attention = RemovedAttention(layer.attention)

    for index, keep in sorted(ffn.items()):
        layer = layers[index]
        current = layer_ffn(layer)
        kept = _validate_keep(keep, current, f"FFN neurons of layer {index}")
        if len(kept) < current:
            keep_index = torch.tensor(kept, dtype=torch.long)
            inter, out = layer.intermediate.dense, layer.output.dense
            layer.intermediate.dense = _slice_linear(inter, keep_index, 0)
            layer.output.dense = _slice_linear(out, keep_index, 1)
            slices.append(ParamSlice(inter.weight, layer.intermediate.dense.weight, keep_index, 0))
            if inter.bias is not None:
                slices.append(ParamSlice(inter.bias, layer.intermediate.dense.bias, keep_index, 0))
            slices.append(ParamSlice(out.weight, layer.output.dense.weight, keep_index, 1))
            if out.bias is not None:
                slices.append(ParamSlice(out.bias, layer.output.dense.bias, None, 0))
        if index in ffn_weights:
            _set_weight(layer.output.dense, ffn_weights[index], f"FFN output of layer {index}")
        if not kept and not isinstance(layer.output, RemovedOutput):
            layer.intermediate = RemovedIntermediate(layer.intermediate)
            layer.output = RemovedOutput(layer.output)

    _record(model)
    return slices


def _structure_of(config_or_structure) -> dict:
    structure = config_or_structure
    if not isinstance(structure, Mapping):
        structure = getattr(structure, STRUCTURE_KEY, None)
    if not isinstance(structure, Mapping) or structure.get("format") != STRUCTURE_FORMAT:
        raise ShrinkError(
            f"{STRUCTURE_KEY} must be a mapping with format {STRUCTURE_FORMAT}, got {structure!r}"
        )
    if not all(isinstance(structure.get(k), list) for k in ("heads", "ffn")):
        raise ShrinkError(f"{STRUCTURE_KEY} needs 'heads' and 'ffn' lists, got {dict(structure)!r}")
    return dict(structure)


@torch.no_grad()
def apply_structure(model: nn.Module, structure: Mapping | None = None) -> bool:
    """Give a freshly built model (``config.pruned_heads`` already applied by transformers) the recorded
    shapes: FFN widths, stand-ins for empty blocks. The values are placeholders until a state dict
    is loaded. A no-op on a model that already has the shapes; returns whether anything changed."""
    config = getattr(model, "config", None)
    structure = _structure_of(structure if structure is not None else config)
    layers = encoder_layers(model)
    if len(structure["heads"]) != len(layers) or len(structure["ffn"]) != len(layers):
        raise ShrinkError(
            f"{STRUCTURE_KEY} describes {len(structure['heads'])} layers, the model has {len(layers)}"
        )
    changed = False
    heads_keep: dict[int, list[int]] = {}
    ffn_keep: dict[int, list[int]] = {}
    for index, layer in enumerate(layers):
        want_heads, have_heads = int(structure["heads"][index]), layer_heads(layer)
        if want_heads < have_heads and not hasattr(layer.attention, "prune_heads"):
            # transformers 5 builds every head (no pruned_heads support): cut to the recorded count;
            # the values are placeholders until the state dict loads, as for the FFN widths
            heads_keep[index] = list(range(want_heads))
            have_heads = want_heads
        if want_heads != have_heads:
            raise ShrinkError(
                f"layer {index} has {have_heads} heads but {STRUCTURE_KEY} records {want_heads}: "
                f"config.pruned_heads ({getattr(config, 'pruned_heads', None)}) disagrees with it"
            )
        if want_heads == 0 and not isinstance(layer.attention, RemovedAttention):
            heads_keep[index] = []
        want_ffn, have_ffn = int(structure["ffn"][index]), layer_ffn(layer)
        if want_ffn > have_ffn:
            raise ShrinkError(
                f"layer {index} has {have_ffn} FFN neurons, {STRUCTURE_KEY} records more ({want_ffn})"
            )
        if want_ffn < have_ffn or (want_ffn == 0 and not isinstance(layer.output, RemovedOutput)):
            ffn_keep[index] = list(range(want_ffn))
    if heads_keep or ffn_keep:
        shrink_model(model, heads_keep, ffn_keep)
        changed = True
    return changed


def save_shrunk_model(model: nn.Module, out_dir: str | os.PathLike, *, overwrite: bool = False,
                      tokenizer=None) -> Path:
    """``save_pretrained`` with ``config.obert_structure`` up to date, staged and renamed into place
    (and the tokenizer, if given). Reload with :func:`load_shrunk_model`."""
    from obert_modifiers.deployment import staged_dir

    _record(model)
    out_dir = Path(out_dir)
    with staged_dir(out_dir, overwrite=overwrite) as stage:
        model.save_pretrained(stage)
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
    return out_dir


def read_state_dict(folder: str | os.PathLike) -> dict[str, Tensor]:
    """The weights of a ``save_pretrained`` folder: safetensors or ``pytorch_model.bin``, sharded or not."""
    folder = Path(folder)
    candidates = [
        ("model.safetensors", "safetensors"),
        ("model.safetensors.index.json", "safetensors-index"),
        ("pytorch_model.bin", "bin"),
        ("pytorch_model.bin.index.json", "bin-index"),
    ]
    for name, kind in candidates:
        path = folder / name
        if not path.is_file():
            continue
        if kind.endswith("index"):
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            files = [folder / shard for shard in shards]
        else:
            files = [path]
        state: dict[str, Tensor] = {}
        for file in files:
            if file.suffix == ".safetensors":
                from safetensors.torch import load_file

                state.update(load_file(str(file)))
            else:
                state.update(torch.load(file, map_location="cpu", weights_only=True))
        return state
    raise ShrinkError(f"{folder}: no weights (model.safetensors or pytorch_model.bin, sharded or not)")


def load_shrunk_model(folder: str | os.PathLike, model_class=None) -> nn.Module:
    """Reload a shrunk (or unshrunk) model exactly: build it from its config (``pruned_heads`` applied),
    apply ``config.obert_structure``, then load every weight with exact key and shape checks. Any
    missing, unexpected or mis-shaped weight is an error; never a silent random initialisation.

    ``model_class`` defaults to the config's first ``architectures`` entry in transformers."""
    import transformers

    folder = Path(folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    if model_class is None:
        names = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, names[0], None) if names else None
        if model_class is None:
            raise ShrinkError(f"{folder}/config.json: architectures {names} names no transformers class; "
                              f"pass model_class")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        model = model_class(config)  # transformers re-applies config.pruned_heads here
    if getattr(config, STRUCTURE_KEY, None) is not None:
        apply_structure(model)
    state = read_state_dict(folder)
    expected = model.state_dict()
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    # tied copies (MLM decoder = word embeddings) are not saved; transformers matches them by regex
    missing = [k for k in expected if k not in state and not any(re.search(p, k) for p in tied)]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        problems = (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        for label, items in problems:
            if items:
                parts.append(f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}")
        raise ShrinkError(
            f"{folder}: the weights do not fit the structure in config.json ({'; '.join(parts)}); "
            f"the folder must come from save_shrunk_model / save_pretrained of the same model"
        )
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    model.eval()
    return model
