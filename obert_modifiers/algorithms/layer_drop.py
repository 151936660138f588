"""Layer dropping for BERT-family encoders: which layers to keep, how important each layer is, and
the physical removal itself (pure torch; no SparseML here).

Removal is physical: the encoder's ``nn.ModuleList`` is rebuilt with the kept layers only, and the
model config's ``num_hidden_layers`` shrinks with it, so ``save_pretrained`` writes a smaller model
that plain ``from_pretrained`` loads. Two extra config entries record what happened:

* ``obert_layer_map``: kept student layer ``i`` -> index of that layer in the original model
  (composed over repeated drops), used by distillation to pair student and teacher layers;
* ``obert_layer_drops``: the history ``[[layers_before, kept_indices], ...]``, so re-applying a drop
  to a model that already went through it is recognised and changes nothing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from obert_modifiers.errors import ObertError

LAYER_MAP_KEY = "obert_layer_map"
DROP_HISTORY_KEY = "obert_layer_drops"

# preferred attribute paths of the encoder layer list (BERT/RoBERTa/ELECTRA, DistilBERT, generic)
_PREFERRED_SUFFIXES = ("encoder.layer", "transformer.layer", "encoder.layers", "layers", "layer")


class LayerDropError(ObertError, ValueError):
    """The model or the requested layers do not allow the drop (message says which and why)."""


def _config_num_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    value = getattr(config, "num_hidden_layers", None) if config is not None else None
    return int(value) if isinstance(value, int) else None


def find_encoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    r"""The qualified name and the ``nn.ModuleList`` of a transformer's encoder layers.

    Among the model's ``nn.ModuleList``\ s the one whose length is the config's ``num_hidden_layers``
    wins, then the one whose name ends like a known encoder path (``encoder.layer``,
    ``transformer.layer``, ...), then one whose children all have one class, then the longest.
    """
    expected = _config_num_layers(model)
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            candidates.append((name, module))
    if not candidates:
        raise LayerDropError(f"{type(model).__name__} has no list of encoder layers (an nn.ModuleList)")

    def rank(item: tuple[str, nn.ModuleList]) -> tuple:
        name, module = item
        suffix_rank = next(
            (i for i, s in enumerate(_PREFERRED_SUFFIXES) if name == s or name.endswith("." + s)),
            len(_PREFERRED_SUFFIXES),
        )
        mixed = len({type(child) for child in module}) != 1
        return (expected is not None and len(module) != expected, suffix_rank, mixed, -len(module))

    return sorted(candidates, key=rank)[0]


def uniform_keep(num_layers: int, keep: int) -> list[int]:
    """``keep`` evenly spaced layer indices out of ``num_layers``, starting at layer 0 (layer
    ``floor(i * num_layers / keep)`` for ``i < keep``): 12 -> 6 keeps 0, 2, ..., 10; 6 -> 3 keeps 0, 2, 4."""
    if not 1 <= keep <= num_layers:
        raise LayerDropError(f"cannot keep {keep} of {num_layers} layers (need 1 <= keep <= {num_layers})")
    return [(i * num_layers) // keep for i in range(keep)]


def keep_from_drop(num_layers: int, drop: Sequence[int]) -> list[int]:
    """Kept indices given the indices to drop (validated: in range, at least one layer left)."""
    bad = [i for i in drop if not 0 <= i < num_layers]
    if bad:
        raise LayerDropError(f"layer indices {bad} are out of range for a model with {num_layers} layers")
    kept = [i for i in range(num_layers) if i not in set(drop)]
    if not kept:
        raise LayerDropError(f"dropping layers {sorted(set(drop))} would leave no layer of {num_layers}")
    return kept


def least_important(scores: Sequence[float], num_drop: int) -> list[int]:
    """Indices of the ``num_drop`` lowest scores (ties: the later layer first), sorted ascending."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], -i))
    return sorted(order[:num_drop])


@contextmanager
def skip_layer(layer: nn.Module) -> Iterator[None]:
    """Within the block, ``layer`` passes its input hidden states through unchanged (the rest of its
    outputs, e.g. attention probabilities, are kept as computed)."""

    def hook(_module, args, kwargs, output):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(output, tuple):
            return (hidden, *output[1:])
        return hidden

    handle = layer.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def layer_importance(
    model: nn.Module,
    batches: Iterable[tuple[Mapping[str, torch.Tensor], object]],
    loss_fn: Callable[[object, object], torch.Tensor],
    layers: nn.ModuleList | None = None,
    progress: Callable[[int], None] | None = None,
    skipped: Sequence[int] = (),
) -> list[float]:
    """How much each encoder layer matters for the loss: for every batch, the absolute change of the
    loss (against the full model) when that layer is skipped (its input passed through) together with
    the layers in ``skipped``, averaged over batches; layers in ``skipped`` score ``inf``.

    The magnitude is used, not the sign: on a model whose head is not yet trained, skipping a layer
    lowers the loss about as often as it raises it, and what distillation has to recover is how far the
    function moves. A layer that is an identity scores exactly 0 and is dropped first.
    ``batches`` yields ``(model_inputs, target)`` pairs and ``loss_fn(outputs, target)`` returns a scalar
    loss (``target`` may be ``None`` when the inputs carry labels); the model runs in eval mode.
    """
    if layers is None:
        _, layers = find_encoder_layers(model)
    skipped = set(skipped)
    was_training = model.training
    model.eval()
    totals = [0.0] * len(layers)
    count = 0
    try:
        for inputs, target in batches:
            base = float(loss_fn(model(**inputs), target))
            for index in range(len(layers)):
                if index in skipped:
                    continue
                with ExitStack() as stack:
                    for other in (*skipped, index):
                        stack.enter_context(skip_layer(layers[other]))
                    totals[index] += abs(float(loss_fn(model(**inputs), target)) - base)
            count += 1
            if progress is not None:
                progress(1)
    finally:
        model.train(was_training)
    if count == 0:
        raise LayerDropError("layer importance needs at least one batch of data; the data loader was empty")
    return [math.inf if i in skipped else total / count for i, total in enumerate(totals)]


def greedy_drop_order(
    model: nn.Module,
    batches: Sequence[tuple[Mapping[str, torch.Tensor], object]],
    loss_fn: Callable[[object, object], torch.Tensor],
    num_drop: int,
    layers: nn.ModuleList | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[int, float]]:
    """Choose ``num_drop`` layers one at a time: each round scores the remaining layers with
    :func:`layer_importance` given the layers already chosen (so interactions count: two layers that
    are each harmless alone may not be harmless together) and takes the lowest (ties: the later
    layer). Returns ``[(layer index, score when chosen), ...]`` in the order chosen; ``batches`` is
    read once per round. Costs ``num_drop`` rounds of ``len(layers) - round`` forward passes per batch.
    """
    if layers is None:
        _, layers = find_encoder_layers(model)
    if not 0 <= num_drop < len(layers):
        raise LayerDropError(f"cannot drop {num_drop} of {len(layers)} layers")
    chosen: list[tuple[int, float]] = []
    for _ in range(num_drop):
        skipped = [index for index, _ in chosen]
        scores = layer_importance(model, batches, loss_fn, layers, progress, skipped)
        index = least_important(scores, 1)[0]
        chosen.append((index, scores[index]))
    return chosen


def drop_history(model: nn.Module) -> list[tuple[int, list[int]]]:
    config = getattr(model, "config", None)
    history = getattr(config, DROP_HISTORY_KEY, None) or []
    return [(int(n), [int(i) for i in kept]) for n, kept in history]


def drop_layers(model: nn.Module, keep: Sequence[int]) -> list[int]:
    """Physically keep only the encoder layers ``keep`` (indices into the current layer list).

    Rebuilds the layer list, sets ``config.num_hidden_layers``, updates ``config.obert_layer_map`` and
    ``config.obert_layer_drops``, and installs a state-dict hook so a checkpoint in the numbering from
    before the drop (e.g. the one SparseML's trainer reloads after applying structure) still loads into
    the right layers. Returns the new layer map (kept layer -> original index)."""
    name, layers = find_encoder_layers(model)
    num_layers = len(layers)
    keep = [int(i) for i in keep]
    if sorted(set(keep)) != keep:
        raise LayerDropError(f"kept layer indices must be unique and ascending, got {keep}")
    if not keep or keep[0] < 0 or keep[-1] >= num_layers:
        raise LayerDropError(f"kept layer indices {keep} are out of range for {num_layers} layers")

    new_layers = nn.ModuleList([layers[i] for i in keep])
    # the numbering a reload may arrive in: carried over if this list was already built by a drop
    source_count = getattr(layers, "_obert_source_count", num_layers)
    source_map = getattr(layers, "_obert_source_map", list(range(num_layers)))
    new_layers._obert_source_count = source_count
    new_layers._obert_source_map = [source_map[i] for i in keep]
    new_layers.register_load_state_dict_pre_hook(_remap_source_numbering)

    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attribute, new_layers)

    config = getattr(model, "config", None)
    layer_map = list(range(num_layers))
    if config is not None:
        previous = getattr(config, LAYER_MAP_KEY, None)
        if isinstance(previous, (list, tuple)) and len(previous) == num_layers:
            layer_map = [int(i) for i in previous]
        layer_map = [layer_map[i] for i in keep]
        config.num_hidden_layers = len(keep)
        setattr(config, LAYER_MAP_KEY, layer_map)
        setattr(config, DROP_HISTORY_KEY, [*map(list, drop_history(model)), [num_layers, keep]])
        return layer_map
    return [layer_map[i] for i in keep]


def _remap_source_numbering(module, state_dict, prefix, *_args) -> None:
    """Load-state-dict pre-hook of a dropped layer list: a state dict numbered like the model before
    the drop (more layers than now) is renumbered to the kept layers; dropped layers' keys are removed.
    A state dict already in the new numbering is left alone."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.(.+)")
    matched = {key: pattern.fullmatch(key) for key in list(state_dict.keys()) if key.startswith(prefix)}
    matched = {key: m for key, m in matched.items() if m is not None}
    if not matched:
        return
    indices = {int(m.group(1)) for m in matched.values()}
    source_count = getattr(module, "_obert_source_count", len(module))
    if max(indices) < len(module) or max(indices) != source_count - 1:
        return  # already in the dropped numbering (or an unknown one: let the loader report it)
    student_of = {source: student for student, source in enumerate(module._obert_source_map)}
    moved = {}
    for key, m in matched.items():
        value = state_dict.pop(key)
        source = int(m.group(1))
        if source in student_of:
            moved[f"{prefix}{student_of[source]}.{m.group(2)}"] = value
    state_dict.update(moved)
