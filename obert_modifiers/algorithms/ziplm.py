"""One ZipLM pruning step, shared by both adapters (pure torch; no SparseML): the input Hessians of
every attention and FFN output projection on calibration batches, a structured-OBS database per block,
and the physical shrink to a latency search's choice, with the optimizer's state moved onto the
shrunk parameters. The math is in :mod:`~obert_modifiers.algorithms.structured_obs`,
:mod:`~obert_modifiers.algorithms.latency_search` and :mod:`~obert_modifiers.algorithms.shrink`;
the adapters (``modifiers/ziplm.py``, ``native/modifiers/ziplm.py``) decide when a step runs and on which
batches."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from obert_modifiers.algorithms import shrink
from obert_modifiers.algorithms import structured_obs as sobs
from obert_modifiers.errors import ObertError

__all__ = [
    "ZipLMError",
    "apply_choice",
    "calibrate",
    "databases",
    "family_dir_name",
    "move_optimizer_state",
    "prediction",
]

_NAME = "ZipLMPruningModifier"


class ZipLMError(ObertError, RuntimeError):
    """A ZipLM step cannot run on this model or data (the message says why)."""


def family_dir_name(target: float) -> str:
    """``ziplm-2x``, ``ziplm-2.5x``: the folder of the family member pruned to ``target``."""
    return f"ziplm-{target:g}x"


@torch.no_grad()
def calibrate(
    module: nn.Module, layers, batches: Iterable[dict], num_samples: int, step: int
) -> dict[str, sobs.InputHessian]:
    """Input Hessians of every live attention / FFN output projection over ``batches`` (dicts of model
    inputs, no labels) until ``num_samples`` sequences were seen; all-reduced under torch.distributed."""
    from tqdm.auto import tqdm

    linears = {}
    for index, layer in enumerate(layers):
        if shrink.layer_heads(layer):
            linears[f"{index}.attention"] = layer.attention.output.dense
        if shrink.layer_ffn(layer):
            linears[f"{index}.ffn"] = layer.output.dense
    current: dict[str, Any] = {}
    total = num_samples
    with (
        sobs.input_hessians(linears, mask=lambda: current.get("mask")) as hessians,
        tqdm(total=total, desc=f"ZipLM step {step + 1}: calibration", unit="seq", leave=False) as bar,
    ):
        for batch in batches:
            current["mask"] = batch.get("attention_mask")
            module(**batch)
            bar.update(min(len(current["mask"]) if current["mask"] is not None else 1, total - bar.n))
    empty = [name for name, h in hessians.items() if h.count == 0]
    if empty:
        raise ZipLMError(f"!{_NAME}: calibration saw no tokens at {empty[:3]} (empty training data?)")
    for hessian in hessians.values():
        hessian.all_reduce()
    return hessians


def databases(layers, hessians, table, structures, damp: float, ffn_chunk: int) -> tuple[list, list]:
    """A structured-OBS database per attention block and per FFN block, at the kept counts the
    allowed ``structures`` and the latency ``table`` can use."""
    from tqdm.auto import tqdm

    allowed = set(structures)
    attention, ffn = [], []
    with tqdm(total=2 * len(layers), desc="ZipLM: OBS databases", unit="block", leave=False) as bar:
        for index, layer in enumerate(layers):
            heads = shrink.layer_heads(layer)
            kept = set(range(1, heads + 1)) if "heads" in allowed else {heads}
            if "attention_blocks" in allowed:
                kept.add(0)
            kept.add(heads)
            linear = layer.attention.output.dense if heads else None
            hessian = hessians.get(f"{index}.attention")
            attention.append(_block(linear, hessian, heads, kept, table.key.head_size, damp, 1))
            bar.update()
            width = shrink.layer_ffn(layer)
            grid = {n for n in table.ffn if 0 < n < width} if "ffn_neurons" in allowed else set()
            kept = grid | {width} | ({0} if "ffn_blocks" in allowed else set())
            linear, hessian = (layer.output.dense if width else None), hessians.get(f"{index}.ffn")
            ffn.append(_block(linear, hessian, width, kept, 1, damp, ffn_chunk))
            bar.update()
    return attention, ffn


def apply_choice(
    module: nn.Module, attention: list, ffn: list, choice, weight_update: bool = True
) -> list[shrink.ParamSlice]:
    """Shrink ``module`` to the search's ``choice`` (heads and FFN neurons kept per layer) with the
    OBS-updated output projections (``weight_update=False``: the kept weights as they were, an
    ablation); returns how each replaced parameter maps onto its successor."""
    heads_keep, ffn_keep, attention_weights, ffn_weights = {}, {}, {}, {}
    for index, (att, kept) in enumerate(zip(attention, choice.heads, strict=True)):
        if kept < att.current:
            level = att.current - kept
            heads_keep[index] = att.db.kept_groups(level)
            if kept and weight_update:
                attention_weights[index] = att.db.weight(level)
    for index, (ff, kept) in enumerate(zip(ffn, choice.ffn, strict=True)):
        if kept < ff.current:
            level = ff.current - kept
            ffn_keep[index] = ff.db.kept_groups(level)
            if kept and weight_update:
                ffn_weights[index] = ff.db.weight(level)
    return shrink.shrink_model(
        module, heads_keep, ffn_keep, attention_weights=attention_weights, ffn_weights=ffn_weights
    )


class _Block:
    """One block's database: ``errors`` by kept count (relative to the block's output energy)."""

    def __init__(self, db: sobs.OBSDatabase | None, current: int, errors: dict[int, float]) -> None:
        self.db, self.current, self.errors = db, current, errors


def _block(linear, hessian, current: int, kept: set[int], group: int, damp: float, chunk: int) -> _Block:
    if current == 0 or linear is None:
        return _Block(None, 0, {0: 0.0})
    kept = {k for k in kept if 0 <= k <= current}
    levels = sorted(current - k for k in kept)
    db = sobs.structured_obs(
        linear.weight.detach().float(), hessian.hessian.float(), group, levels, rel_damp=damp, chunk=chunk
    )
    return _Block(db, current, db.by_kept(relative=True))


def prediction(choice, table, target: float) -> dict:
    """What the config (and export.json / the model card) record about a step's latency prediction."""
    return {
        "target_speedup": float(target),
        "predicted_speedup": round(float(choice.speedup), 4),
        "predicted_latency": round(float(choice.predicted), 6),
        "dense_latency": round(float(choice.dense), 6),
        "unit": table.unit,
        "latency_key": table.key.to_dict(),
    }


@contextlib.contextmanager
def _single_thread():
    """The OBS loops run single-threaded: on a shared machine 2 threads were many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def move_optimizer_state(optimizer, slices: list[shrink.ParamSlice]) -> None:
    """Put the shrunk parameters in the optimizer in place of the old ones, with their state (e.g. Adam's
    moments) sliced the same way; state that is not shaped like the parameter (``step``) is kept."""
    if optimizer is None or not slices or not hasattr(optimizer, "param_groups"):
        return
    by_old = {id(s.old): s for s in slices}
    # a parameter replaced twice in one shrink (heads, then its new weight set) maps to the last one
    state = optimizer.state
    for group in optimizer.param_groups:
        params = []
        for param in group["params"]:
            piece = by_old.get(id(param))
            if piece is None:
                params.append(param)
                continue
            params.append(piece.new)
            old_state = state.pop(param, None)
            if old_state:
                state[piece.new] = {name: _slice_state(value, piece) for name, value in old_state.items()}
        group["params"] = params


def _slice_state(value: Any, piece: shrink.ParamSlice) -> Any:
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(piece.old.shape):
        return value
    if piece.index is None:
        return value.clone()
    return value.index_select(piece.dim, piece.index.to(value.device)).contiguous()
