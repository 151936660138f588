"""Latency tables and the search that meets a latency budget with the least pruning error (ZipLM/SPDY).

A BERT encoder's time is, to a good approximation (measured in-model on ONNX Runtime), additive:

    T = base + sum_layers attention(heads kept in layer) + ffn(neurons kept in layer)

``base`` is what pruning cannot touch (embeddings, pooler, head, the residual LayerNorms). Every
layer has the same shape, so one :class:`LatencyTable` (``attention[k]``, ``ffn[n]``) serves all of
them. The table is keyed by where it was measured (runtime, threads, batch, sequence length,
precision, model shape): a table from another setting predicts nothing.

:func:`dp_allocate` picks one option (a kept count) for every prunable module (each layer's
attention and FFN block) minimising the summed database error subject to the summed time staying
within the budget: a knapsack solved exactly by dynamic programming over Pareto fronts of
(time, error), with the front thinned to ``max_states`` time buckets only when it grows past that.
Times are never rounded, so the answer never exceeds the budget and hits it exactly when the best
configuration does.

:func:`fit_additive` turns timed whole models into a table: the additive model above with every block
affine in what it keeps (``intercept + slope * kept``, 0 when the block is removed), fitted by
non-negative least squares to all the timed models at once. Per-entry differences of single timings
are noisy, and a search exploits noise: it picks exactly the widths the table underprices.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields

import torch

from obert_modifiers.errors import ObertError

__all__ = [
    "TABLE_FORMAT",
    "LatencySearchError",
    "LatencyKey",
    "LatencyTable",
    "Allocation",
    "dp_allocate",
    "StructureChoice",
    "search_structure",
    "search_uniform",
    "BlockFit",
    "AdditiveFit",
    "fit_additive",
]

TABLE_FORMAT = "obert-latency-table/1"
PRECISIONS = ("fp32", "int8")


class LatencySearchError(ObertError, ValueError):
    """A latency table or a search request is invalid or cannot be met (the message says which and why)."""


@dataclass(frozen=True)
class LatencyKey:
    """Where a table was measured; tables with different keys are not interchangeable.

    ``runtime`` is ``onnxruntime``, ``deepsparse`` or ``flops`` (no runtime: multiply-accumulates);
    ``runtime_version`` and ``cpu`` are part of the key so a cached table is re-measured on another
    machine or runtime release."""

    runtime: str
    threads: int
    batch_size: int
    sequence_length: int
    precision: str
    hidden_size: int
    num_attention_heads: int
    intermediate_size: int
    num_hidden_layers: int
    runtime_version: str = ""
    cpu: str = ""

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise LatencySearchError(
                f"latency key: precision must be one of {PRECISIONS}, got {self.precision!r}"
            )
        positive = ("threads", "batch_size", "sequence_length", "hidden_size", "num_attention_heads")
        for name in (*positive, "num_hidden_layers", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LatencySearchError(f"latency key: {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise LatencySearchError(
                f"latency key: hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> LatencyKey:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(f.name for f in fields(cls) if f.name not in data and f.default is MISSING)
        if unknown or missing:
            raise LatencySearchError(
                f"latency key: unknown fields {unknown}, missing fields {missing} (expected {sorted(names)})"
            )
        return cls(**dict(data))

    def digest(self) -> str:
        """A short stable hash of the key (for cache file names)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _int_keyed(name: str, values: Mapping) -> dict[int, float]:
    try:
        out = {int(k): float(v) for k, v in values.items()}
    except (TypeError, ValueError) as exc:
        raise LatencySearchError(f"latency table: {name} must map kept counts to numbers ({exc})") from None
    bad = {k: v for k, v in out.items() if k < 0 or not math.isfinite(v) or v < 0}
    if bad:
        raise LatencySearchError(f"latency table: {name} has negative or non-finite entries {bad}")
    return dict(sorted(out.items()))


@dataclass
class LatencyTable:
    """Per-layer time of an attention block by heads kept and of an FFN block by neurons kept, plus the
    untouchable ``base``; ``unit`` is ``ms`` (measured) or ``MMAC`` (FLOPs table). ``attention`` has
    every count 0..heads; ``ffn`` a grid including 0 and the full width, interpolated linearly in
    between. ``meta`` holds how it was measured (rounds, the whole dense model's time...)."""

    key: LatencyKey
    base: float
    attention: dict[int, float]
    ffn: dict[int, float]
    unit: str = "ms"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.attention = _int_keyed("attention", self.attention)
        self.ffn = _int_keyed("ffn", self.ffn)
        heads, width = self.key.num_attention_heads, self.key.intermediate_size
        if sorted(self.attention) != list(range(heads + 1)):
            raise LatencySearchError(
                f"latency table: attention must have every kept-head count 0..{heads}, "
                f"has {sorted(self.attention)}"
            )
        if 0 not in self.ffn or width not in self.ffn or max(self.ffn) != width:
            raise LatencySearchError(
                f"latency table: ffn grid must run from 0 to intermediate_size {width}, "
                f"has {sorted(self.ffn)}"
            )
        if not math.isfinite(self.base) or self.base < 0:
            raise LatencySearchError(f"latency table: base must be a non-negative number, got {self.base}")

    def attention_time(self, heads: int) -> float:
        """Time of one attention block keeping ``heads`` heads (0 = the block removed)."""
        if heads not in self.attention:
            raise LatencySearchError(
                f"latency table: no attention entry for {heads} heads (0..{self.key.num_attention_heads})"
            )
        return self.attention[heads]

    def ffn_time(self, neurons: int) -> float:
        """Time of one FFN block keeping ``neurons`` neurons: the grid value, or linear between neighbours."""
        if neurons in self.ffn:
            return self.ffn[neurons]
        if not 0 <= neurons <= self.key.intermediate_size:
            raise LatencySearchError(
                f"latency table: {neurons} FFN neurons is outside 0..{self.key.intermediate_size}"
            )
        grid = list(self.ffn)
        upper = next(g for g in grid if g > neurons)
        lower = max(g for g in grid if g < neurons)
        frac = (neurons - lower) / (upper - lower)
        return self.ffn[lower] + frac * (self.ffn[upper] - self.ffn[lower])

    def predict(self, heads: Sequence[int], ffn: Sequence[int]) -> float:
        """Predicted time of a model with ``heads[l]`` heads and ``ffn[l]`` neurons in layer ``l``."""
        if len(heads) != len(ffn):
            raise LatencySearchError(f"predict: {len(heads)} head counts but {len(ffn)} FFN widths")
        total = self.base
        for k, n in zip(heads, ffn, strict=True):
            total += self.attention_time(k) + self.ffn_time(n)
        return total

    def dense(self, num_layers: int | None = None) -> float:
        """Predicted time of the unpruned model (``num_layers`` defaults to the key's)."""
        layers = num_layers if num_layers is not None else self.key.num_hidden_layers
        return self.predict([self.key.num_attention_heads] * layers, [self.key.intermediate_size] * layers)

    def speedup(self, heads: Sequence[int], ffn: Sequence[int]) -> float:
        """Predicted speed-up over the dense model of the same depth."""
        return self.dense(len(heads)) / self.predict(heads, ffn)

    def budget(self, speedup: float, num_layers: int | None = None) -> float:
        """The time the prunable blocks may take together for ``speedup`` over the dense model:
        ``dense / speedup - base``."""
        if not speedup > 0:
            raise LatencySearchError(f"speed-up target must be positive, got {speedup}")
        return self.dense(num_layers) / speedup - self.base

    def to_json(self) -> str:
        data = {
            "format": TABLE_FORMAT,
            "key": self.key.to_dict(),
            "unit": self.unit,
            "base": self.base,
            "attention": {str(k): v for k, v in self.attention.items()},
            "ffn": {str(k): v for k, v in self.ffn.items()},
            "meta": self.meta,
        }
        return json.dumps(data, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "latency table") -> LatencyTable:
        """Parse :meth:`to_json` output; ``source`` (a file name) goes into error messages."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LatencySearchError(f"{source}: not JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise LatencySearchError(f"{source}: format is {found!r}, expected {TABLE_FORMAT!r}")
        missing = [k for k in ("key", "base", "attention", "ffn") if k not in data]
        if missing:
            raise LatencySearchError(f"{source}: missing fields {missing}")
        try:
            return cls(
                key=LatencyKey.from_dict(data["key"]),
                base=float(data["base"]),
                attention=data["attention"],
                ffn=data["ffn"],
                unit=str(data.get("unit", "ms")),
                meta=dict(data.get("meta") or {}),
            )
        except LatencySearchError as exc:
            raise LatencySearchError(f"{source}: {exc}") from None


@dataclass(frozen=True)
class BlockFit:
    """One block's time as a function of what it keeps: 0 when removed, else ``intercept + slope * kept``
    (the LayerNorm, residual and per-operator overhead, then the matrices that shrink)."""

    intercept: float
    slope: float

    def __call__(self, kept: int) -> float:
        return 0.0 if kept == 0 else self.intercept + self.slope * kept


@dataclass(frozen=True)
class AdditiveFit:
    """:func:`fit_additive`'s answer: ``base`` and the two block fits, with each model's measured time
    minus its fitted time (``residuals``, in the models' order)."""

    base: float
    attention: BlockFit
    ffn: BlockFit
    residuals: tuple[float, ...]

    def predict(self, heads: Sequence[int], ffn: Sequence[int]) -> float:
        return self.base + sum(self.attention(k) for k in heads) + sum(self.ffn(n) for n in ffn)

    @property
    def rms(self) -> float:
        return math.sqrt(sum(r * r for r in self.residuals) / len(self.residuals))


def _features(heads: Sequence[int], ffn: Sequence[int]) -> list[float]:
    """The additive model's regressors: base, attention blocks kept, heads, FFN blocks kept, neurons."""
    return [1.0, sum(k > 0 for k in heads), sum(heads), sum(n > 0 for n in ffn), sum(ffn)]


def fit_additive(models: Sequence[tuple[Sequence[int], Sequence[int], float]]) -> AdditiveFit:
    """Fit ``time = base + sum_l attention(heads_l) + ffn(neurons_l)`` (each block a :class:`BlockFit`) to
    timed models ``(heads kept per layer, neurons kept per layer, time)``: least squares of the relative
    errors (timing noise grows with the time; a speed-up is a ratio), every coefficient >= 0 so no entry
    falls as a block widens, solved exactly: the non-negative optimum is the unconstrained optimum on
    its own support, and with 5 coefficients every support is tried."""
    if len(models) < 5:
        raise LatencySearchError(f"fit_additive: needs at least 5 timed models, got {len(models)}")
    for heads, ffn, seconds in models:
        if len(heads) != len(ffn) or not math.isfinite(seconds) or seconds <= 0:
            raise LatencySearchError(
                f"fit_additive: a model needs as many head counts as FFN widths and a finite "
                f"positive time, got {len(heads)} / {len(ffn)} / {seconds}"
            )
    x = torch.tensor([_features(h, f) for h, f, _ in models], dtype=torch.float64)
    y = torch.tensor([t for _, _, t in models], dtype=torch.float64)
    scale = x.abs().amax(dim=0).clamp_min(1.0)  # columns span 1 to thousands of neurons
    xs = x / scale / y.unsqueeze(1)  # relative errors: each row divided by its time
    target = torch.ones_like(y)
    best: tuple[float, torch.Tensor] | None = None
    for support in range(1, 1 << x.shape[1]):
        columns = [j for j in range(x.shape[1]) if support >> j & 1]
        solution = torch.linalg.lstsq(xs[:, columns], target.unsqueeze(1)).solution.squeeze(1)
        if (solution < 0).any():
            continue
        coef = torch.zeros(x.shape[1], dtype=torch.float64)
        coef[columns] = solution
        error = float(((xs @ coef - target) ** 2).sum())
        if best is None or error < best[0] - 1e-12 * max(1.0, error):
            best = (error, coef)
    if best is None:  # every support fits a negative coefficient: all-zero is the non-negative optimum
        best = (float(len(models)), torch.zeros(x.shape[1], dtype=torch.float64))
    coef = (best[1] / scale).tolist()
    fitted = x @ torch.tensor(coef, dtype=torch.float64)
    return AdditiveFit(
        base=coef[0],
        attention=BlockFit(coef[1], coef[2]),
        ffn=BlockFit(coef[3], coef[4]),
        residuals=tuple((y - fitted).tolist()),
    )


def _select(tensors: tuple[torch.Tensor, ...], index: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t[index] for t in tensors)


@dataclass(frozen=True)
class Allocation:
    """The option chosen for every module, with the summed error and time."""

    choices: list[int]
    error: float
    time: float


def dp_allocate(
    errors: Sequence[Mapping[int, float]],
    times: Sequence[Mapping[int, float]],
    budget: float,
    *,
    max_states: int = 10_000,
) -> Allocation:
    """Choose one option per module minimising ``sum errors[l][o_l]`` with ``sum times[l][o_l] <= budget``.

    ``errors[l]`` and ``times[l]`` map the options of module ``l`` (kept counts) to its error and
    time; every option with an error needs a time. Exact (dynamic programming over the Pareto front
    of partial sums, times not rounded) while the front has at most ``max_states`` points; beyond,
    each of ``max_states`` equal time buckets keeps its lowest-error point, which still never
    exceeds the budget. An unreachable budget raises an error naming the smallest reachable time."""
    if len(errors) != len(times):
        raise LatencySearchError(f"dp_allocate: {len(errors)} error tables but {len(times)} time tables")
    if not errors:
        raise LatencySearchError("dp_allocate: no modules to allocate")
    if max_states < 1:
        raise LatencySearchError(f"dp_allocate: max_states must be >= 1, got {max_states}")
    modules = []
    for index, (err, tim) in enumerate(zip(errors, times, strict=True)):
        if not err:
            raise LatencySearchError(f"dp_allocate: module {index} has no options")
        missing = sorted(set(err) - set(tim))
        if missing:
            raise LatencySearchError(f"dp_allocate: module {index} has no time for options {missing}")
        keys = sorted(err)
        modules.append(
            (
                keys,
                torch.tensor([float(tim[k]) for k in keys], dtype=torch.float64),
                torch.tensor([float(err[k]) for k in keys], dtype=torch.float64),
            )
        )
    fastest = 0.0
    for _, t, _ in modules:
        fastest += float(t.min())
    if fastest > budget:
        raise LatencySearchError(
            f"latency budget {budget:.6g} cannot be met: the smallest reachable latency is {fastest:.6g} "
            f"(every module at its fastest option); raise the budget or allow more pruning"
        )
    # the least time the modules after l can still take: prunes states that cannot finish in budget
    rest = [0.0] * (len(modules) + 1)
    for i in range(len(modules) - 1, -1, -1):
        rest[i] = rest[i + 1] + float(modules[i][1].min())

    state_time = torch.zeros(1, dtype=torch.float64)
    state_error = torch.zeros(1, dtype=torch.float64)
    back: list[tuple[torch.Tensor, torch.Tensor]] = []
    for index, (_keys, t, e) in enumerate(modules):
        cand_time = (state_time[:, None] + t[None, :]).reshape(-1)
        cand_error = (state_error[:, None] + e[None, :]).reshape(-1)
        parent = torch.arange(state_time.numel()).repeat_interleave(t.numel())
        option = torch.arange(t.numel()).repeat(state_time.numel())
        ok = cand_time <= budget
        if index + 1 < len(modules):  # a lenient look-ahead (sums in another order round differently)
            ok &= cand_time + rest[index + 1] <= budget + 1e-9 * abs(budget) + 1e-12
        cand = _select((cand_time, cand_error, parent, option), ok)
        # Pareto front: by time ascending (ties: lower error first), keep strictly better errors
        order = torch.argsort(cand[1], stable=True)
        cand = _select(cand, order[torch.argsort(cand[0][order], stable=True)])
        best_before = torch.cummin(cand[1], 0).values
        keep = torch.ones_like(cand[1], dtype=torch.bool)
        keep[1:] = cand[1][1:] < best_before[:-1]
        cand_time, cand_error, parent, option = _select(cand, keep)
        if cand_time.numel() > max_states:
            width = budget / max_states if budget > 0 else 1.0
            bucket = torch.floor(cand_time / width).to(torch.long)
            last = torch.ones_like(bucket, dtype=torch.bool)
            last[:-1] = bucket[:-1] != bucket[1:]  # the front's error falls with time: the last is the best
            cand_time, cand_error, parent, option = _select((cand_time, cand_error, parent, option), last)
        back.append((parent, option))
        state_time, state_error = cand_time, cand_error
    if state_time.numel() == 0:  # only float rounding at the very edge can get here
        raise LatencySearchError(
            f"latency budget {budget:.6g} cannot be met: the smallest reachable latency is {fastest:.6g}"
        )
    best = int(torch.argmin(state_error))  # the front's last point; unique
    choices = [0] * len(modules)
    state = best
    for index in range(len(modules) - 1, -1, -1):
        parent, option = back[index]
        choices[index] = modules[index][0][int(option[state])]
        state = int(parent[state])
    total_time = 0.0
    total_error = 0.0
    for (keys, t, e), choice in zip(modules, choices, strict=True):
        position = keys.index(choice)
        total_time += float(t[position])
        total_error += float(e[position])
    return Allocation(choices, total_error, total_time)


@dataclass(frozen=True)
class StructureChoice:
    """Kept heads and FFN neurons per layer, with the table's prediction."""

    heads: list[int]
    ffn: list[int]
    error: float
    predicted: float
    dense: float

    @property
    def speedup(self) -> float:
        return self.dense / self.predicted


def search_structure(
    table: LatencyTable,
    attention_errors: Sequence[Mapping[int, float]],
    ffn_errors: Sequence[Mapping[int, float]],
    speedup: float,
    *,
    max_states: int = 10_000,
) -> StructureChoice:
    """Per-layer kept heads and FFN neurons that reach ``speedup`` over the dense model (by ``table``)
    with the least summed error. ``attention_errors[l]`` / ``ffn_errors[l]`` map kept counts of layer
    ``l`` to its error (e.g. ``OBSDatabase.by_kept(relative=True)``); the counts offered are the
    options. The dense model is the table's shape at this depth."""
    if len(attention_errors) != len(ffn_errors):
        raise LatencySearchError(
            f"search_structure: {len(attention_errors)} attention databases "
            f"but {len(ffn_errors)} FFN databases"
        )
    layers = len(attention_errors)
    budget = table.budget(speedup, layers)
    errors = [*attention_errors, *ffn_errors]
    times = [{k: table.attention_time(k) for k in err} for err in attention_errors]
    times += [{n: table.ffn_time(n) for n in err} for err in ffn_errors]
    try:
        allocation = dp_allocate(errors, times, budget, max_states=max_states)
    except LatencySearchError as exc:
        fastest = table.base + sum(min(t.values()) for t in times)
        raise LatencySearchError(
            f"speed-up {speedup:g} is out of reach: the smallest reachable latency is {fastest:.6g} "
            f"{table.unit} against a dense {table.dense(layers):.6g} {table.unit}, at most "
            f"{table.dense(layers) / fastest:.3g}x with the structures allowed"
        ) from exc
    heads, ffn = allocation.choices[:layers], allocation.choices[layers:]
    return StructureChoice(
        heads=heads,
        ffn=ffn,
        error=allocation.error,
        predicted=table.predict(heads, ffn),
        dense=table.dense(layers),
    )


def search_uniform(
    table: LatencyTable,
    attention_errors: Sequence[Mapping[int, float]],
    ffn_errors: Sequence[Mapping[int, float]],
    speedup: float,
) -> StructureChoice:
    """The uniform-width alternative to :func:`search_structure` (an ablation): every layer keeps the
    same number of heads ``h`` and FFN neurons ``n``, choosing among the counts every layer offers
    the pair that reaches ``speedup`` by ``table`` with the least summed error (ties: the faster)."""
    if len(attention_errors) != len(ffn_errors):
        raise LatencySearchError(
            f"search_uniform: {len(attention_errors)} attention databases but {len(ffn_errors)} FFN databases"
        )
    layers = len(attention_errors)
    if not layers:
        raise LatencySearchError("search_uniform: no layers")
    budget = table.budget(speedup, layers)
    heads_options = set.intersection(*(set(e) for e in attention_errors))
    ffn_options = set.intersection(*(set(e) for e in ffn_errors))
    best: tuple[float, float, int, int] | None = None
    for h in heads_options:
        for n in ffn_options:
            time = table.predict([h] * layers, [n] * layers)
            if time > budget:
                continue
            error = sum(float(e[h]) for e in attention_errors) + sum(float(e[n]) for e in ffn_errors)
            if best is None or (error, time) < best[:2]:
                best = (error, time, h, n)
    if best is None:
        fastest = min(
            (table.predict([h] * layers, [n] * layers) for h in heads_options for n in ffn_options),
            default=math.inf,
        )
        raise LatencySearchError(
            f"speed-up {speedup:g} is out of reach with the same width in every layer: the smallest "
            f"uniform latency is {fastest:.6g} {table.unit} against a dense "
            f"{table.dense(layers):.6g} {table.unit}"
        )
    error, time, h, n = best
    return StructureChoice(
        heads=[h] * layers, ffn=[n] * layers, error=error, predicted=time, dense=table.dense(layers)
    )
