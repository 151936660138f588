"""Latency tables for structured pruning, measured on ONNX Runtime or DeepSparse, or counted in FLOPs.

:func:`latency_table` returns the :class:`~obert_modifiers.algorithms.latency_search.LatencyTable`
of a BERT-shaped model for one deployment setting (threads, batch, sequence length, precision),
cached on disk under its key, so the search meets speed-up targets on the runtime users ship.

Measured tables time whole models of the key's shape (exported from the same modules and stand-ins
that :mod:`~obert_modifiers.algorithms.shrink` leaves in a shrunk model), every layer shrunk alike:

* ``k`` heads in every attention block, ``k = 0..heads`` (0 = the removed-block stand-in), FFNs dense;
* ``n`` neurons in every FFN on a grid (``ffn_step``) from 0 to the full width, attention dense;
* the dense model;

in interleaved rounds (every model once per round, median of the rounds), because a table measured
at another time or load than the models it predicts is badly off. The table is the additive model
(``base`` plus one attention and one FFN entry per layer, each block ``intercept + slope * kept`` and 0
when removed) fitted by non-negative least squares to all those timings at once
(:func:`~obert_modifiers.algorithms.latency_search.fit_additive`). The first in-model tables took each
entry as one model's time over the all-removed variant's, divided by the depth, kept non-decreasing
with a running maximum; on this project's 2-vCPU machines single timings moved by 10-25 %, the running
maximum gave whole ranges of widths one price, and every structure the search chose sat at the top of
such a range: a search seeks out whatever the table underprices, so its errors all point one way.
Blocks are timed in a model, where they run: timed as graphs of their own, they added up to 1.3-3.5x
the dense model's time (measured here; each small session pays ORT's thread-pool hand-offs again).
``meta`` keeps every timed model, the fit and its residuals, and the dense model's measured time
beside the table's prediction.
Tables cached by an older method are measured again. ``flops_table`` is the no-runtime alternative
(MMACs).

``runtime="deepsparse"`` (the ``deepsparse`` extra) times the same graphs with ``deepsparse.Engine``:
every graph is compiled once (a compile takes seconds), then timed in the same interleaved rounds. Its
INT8 graphs are static (``rewrite_static_int8``: the ``ort-u8`` form ``obert export`` ships), because
DeepSparse 1.8's compiler aborts on ORT's dynamic-INT8 proxy; on a CPU without AVX-512 VNNI DeepSparse
emulates INT8, and the table's ``meta`` records the CPU flags it was measured with.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from obert_modifiers.algorithms.latency_search import (
    LatencyKey,
    LatencySearchError,
    LatencyTable,
    fit_additive,
)
from obert_modifiers.errors import ObertError
from obert_modifiers.export.graph import rewrite_dynamic_int8 as _quantize  # the ORT table's INT8 proxy
from obert_modifiers.export.graph import rewrite_static_int8 as _quantize_static  # DeepSparse's

__all__ = [
    "LatencyTableError",
    "cpu_model",
    "cpu_flags",
    "shape_key",
    "flops_table",
    "measure_latency_table",
    "latency_table",
    "read_table_file",
    "table_cache_path",
]

RUNTIMES = ("onnxruntime", "deepsparse", "flops")
MEASURED = ("onnxruntime", "deepsparse")
OPSET = 17
MAX_MISMATCH = 0.15  # a table whose dense prediction is further off than this is not trusted
METHOD = "in-model-fit"  # how measured tables are made (a cached table by another method is re-measured)


class LatencyTableError(ObertError, RuntimeError):
    """A latency table cannot be built or read (the message says which setting or file, and why)."""


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what the platform reports."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags(names: tuple[str, ...] = ("avx2", "avx512f", "avx512_vnni", "avx_vnni")) -> dict[str, bool]:
    """Which of the named instruction-set flags ``/proc/cpuinfo`` lists (all False where unreadable)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags: set[str] = set()
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        flags = set()
    return {name: name in flags for name in names}


def _shape(config: Any) -> dict[str, int]:
    config = getattr(config, "config", config)  # a model: its config
    try:
        return {
            "hidden_size": int(config.hidden_size),
            "num_attention_heads": int(config.num_attention_heads),
            "intermediate_size": int(config.intermediate_size),
            "num_hidden_layers": int(config.num_hidden_layers),
        }
    except AttributeError as exc:
        raise LatencyTableError(
            f"latency table: {type(config).__name__} is not a BERT-shaped config ({exc})"
        ) from None


def shape_key(
    config: Any,
    *,
    runtime: str = "onnxruntime",
    threads: int = 2,
    batch_size: int = 1,
    sequence_length: int = 128,
    precision: str = "fp32",
) -> LatencyKey:
    """The table key of a (BERT-shaped) config or model in a deployment setting; the runtime version and
    the CPU model are filled in for measured runtimes."""
    if runtime not in RUNTIMES:
        raise LatencyTableError(f"latency table: runtime must be one of {RUNTIMES}, got {runtime!r}")
    version, cpu = "", ""
    if runtime in MEASURED:
        version, cpu = runtime_version(runtime), cpu_model()
    try:
        return LatencyKey(
            runtime=runtime,
            threads=threads,
            batch_size=batch_size,
            sequence_length=sequence_length,
            precision=precision,
            runtime_version=version,
            cpu=cpu,
            **_shape(config),
        )
    except LatencySearchError as exc:
        raise LatencyTableError(str(exc)) from None


def runtime_version(runtime: str) -> str:
    """The installed version of a measured runtime; a clear error when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(runtime)
    except PackageNotFoundError:
        install = (
            "pip install 'obert-modifiers[deepsparse]'"
            if runtime == "deepsparse"
            else f"pip install {runtime}"
        )
        raise LatencyTableError(
            f"latency table: latency_runtime {runtime!r} is not installed here ({install}); "
            "use onnxruntime or flops, or install it"
        ) from None


def require_runtime(runtime: str) -> None:
    """Fail now, naming it, when ``runtime`` is a measured runtime that is not installed (the adapters
    call this before training, not at the first pruning step); ``flops`` needs nothing."""
    if runtime in MEASURED:
        runtime_version(runtime)


def _ffn_grid(width: int, step: int | None) -> list[int]:
    step = step or max(1, width // 12)
    if step < 1:
        raise LatencyTableError(f"latency table: ffn_step must be >= 1, got {step}")
    grid = list(range(0, width, step)) + [width]
    return sorted(set(grid))


def flops_table(key: LatencyKey, ffn_step: int | None = None) -> LatencyTable:
    """Multiply-accumulates (millions) per forward pass, the no-runtime stand-in for time.

    Attention with ``k`` heads: Q/K/V and the output projection (``4 T h k d``) plus the two
    attention matmuls (``2 T s k d``), ``T = batch * seq`` tokens; an FFN with ``n`` neurons: ``2 T h n``;
    base: the pooler. Elementwise work is ignored, so FLOPs overstate speed-ups at small widths."""
    tokens = key.batch_size * key.sequence_length
    h, d, s = key.hidden_size, key.head_size, key.sequence_length
    heads = range(key.num_attention_heads + 1)
    attention = {k: (4 * tokens * h * k * d + 2 * tokens * s * k * d) / 1e6 for k in heads}
    ffn = {n: 2 * tokens * h * n / 1e6 for n in _ffn_grid(key.intermediate_size, ffn_step)}
    base = key.batch_size * h * h / 1e6
    meta = {"source": "flops"}
    return LatencyTable(key=key, base=base, attention=attention, ffn=ffn, unit="MMAC", meta=meta)


def table_cache_path(
    key: LatencyKey, cache_dir: str | os.PathLike | None = None, ffn_step: int | None = None
) -> Path:
    """Where the table of ``key`` (and FFN grid step) is cached: ``cache_dir``, by default
    ``<obert cache>/latency``."""
    if cache_dir is None:
        from obert_modifiers.models import cache_root

        cache_dir = cache_root() / "latency"
    step = f"-ffn{ffn_step}" if ffn_step else ""
    return Path(cache_dir) / f"latency-{key.runtime}-{key.precision}-{key.digest()}{step}.json"


# --- graphs -------------------------------------------------------------------------------------------


def _uniform_structure(key: LatencyKey, name: str) -> tuple[list[int], list[int]]:
    """Heads and FFN neurons kept per layer in the table's graph ``name`` (see :func:`_graphs`)."""
    depth, heads, width = key.num_hidden_layers, key.num_attention_heads, key.intermediate_size
    kept = {"dense": (heads, width), "base": (0, 0)}.get(name)
    if kept is None:
        kind, count = name.rsplit("_", 1)
        kept = (int(count), width) if kind == "attention" else (heads, int(count))
    return [kept[0]] * depth, [kept[1]] * depth


def _bert_config(key: LatencyKey):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=1024,  # gathers cost the same for any vocabulary; a small one keeps files small
        hidden_size=key.hidden_size,
        num_hidden_layers=key.num_hidden_layers,
        num_attention_heads=key.num_attention_heads,
        intermediate_size=key.intermediate_size,
        max_position_embeddings=max(512, key.sequence_length),
    )


def _graphs(key: LatencyKey, grid: list[int]) -> list[tuple[str, Any, dict]]:
    """``(name, model, {input name: example tensor})`` for every graph of the table: whole models of the
    key's depth, every layer shrunk alike (``attention_k``: ``k`` heads in every layer, FFNs dense;
    ``ffn_n``: ``n`` neurons in every layer, attention dense; 0 = the removed-block stand-ins) and the
    dense model. A block is timed where it runs (in a model, between the others), not as a graph of
    its own: measured, lone blocks added up to 1.3-3.5x the dense model's time (each small session
    pays ORT's thread-pool hand-offs again), so predicted speed-ups did not come true."""
    import torch
    from transformers import BertModel

    from obert_modifiers.algorithms import shrink

    config = _bert_config(key)
    heads, width = key.num_attention_heads, key.intermediate_size
    b, s = key.batch_size, key.sequence_length
    layers = range(key.num_hidden_layers)
    ids = torch.randint(0, config.vocab_size, (b, s), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones(b, s, dtype=torch.long)}

    def model(heads_kept: int | None = None, ffn_kept: int | None = None):
        torch.manual_seed(0)
        built = BertModel(copy.deepcopy(config)).eval()  # a shrink records itself in the config
        shrink.shrink_model(
            built,
            {layer: list(range(heads_kept)) for layer in layers} if heads_kept is not None else None,
            {layer: list(range(ffn_kept)) for layer in layers} if ffn_kept is not None else None,
        )
        return built

    graphs: list[tuple[str, Any, dict]] = [("dense", model(), inputs), ("base", model(0, 0), inputs)]
    graphs += [(f"attention_{k}", model(heads_kept=k), inputs) for k in range(heads)]
    graphs += [(f"ffn_{n}", model(ffn_kept=n), inputs) for n in grid if n < width]
    return graphs


def _export(module, inputs: dict, path: Path) -> None:
    import torch

    class ByName(torch.nn.Module):
        """The model called with its inputs by name: the tracer passes them positionally, and
        transformers 5's ``BertModel`` (whose decorators fill ``use_cache`` by name) then fails with
        "got multiple values for argument 'use_cache'"."""

        def __init__(self) -> None:
            super().__init__()
            self.model = module

        def forward(self, *tensors):
            return self.model(**dict(zip(inputs, tensors, strict=True))).to_tuple()

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation, tracer notes
        torch.onnx.export(
            ByName(),
            tuple(inputs.values()),
            str(path),
            input_names=list(inputs),
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )


def _graph_inputs(path: Path) -> list[str]:
    """The graph's input names in order (a stand-in ignores the mask and the exporter drops it)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {init.name for init in graph.initializer}
    return [value.name for value in graph.input if value.name not in constants]


def _runner(runtime: str, path: Path, feed: dict, threads: int, batch_size: int) -> Callable[[], Any]:
    """A call that runs the graph at ``path`` once on ``runtime`` with ``feed``'s inputs."""
    names = _graph_inputs(path)
    arrays = [feed[name] for name in names]
    if runtime == "deepsparse":
        from deepsparse import Engine

        engine = Engine(
            model=str(path),
            batch_size=batch_size,
            num_cores=threads,
            input_shapes=[list(a.shape) for a in arrays],
        )
        return lambda: engine.run(arrays)
    from obert_modifiers.bench.runner import ort_session  # the session `obert benchmark` times with

    session = ort_session(path, threads)
    named = dict(zip(names, arrays, strict=True))
    return lambda: session.run(None, named)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="graph", disable=not enabled, leave=False)


def measure_latency_table(
    key: LatencyKey,
    *,
    ffn_step: int | None = None,
    rounds: int = 5,
    runs: int = 20,
    warmup: int = 3,
    progress: bool = True,
    clock: Callable[[], float] = time.perf_counter,
) -> LatencyTable:
    """Export and time the table's graphs on the key's runtime (see the module docstring); no caching.

    Each round runs every graph ``warmup`` times, then ``runs`` timed times (median); the table holds
    the median over ``rounds`` interleaved rounds, in milliseconds. ONNX Runtime sessions are made
    per round (one model in memory at a time); DeepSparse engines are compiled once and kept."""
    if key.runtime not in MEASURED:
        raise LatencyTableError(
            f"measure_latency_table: runtime {key.runtime!r} is not measured "
            f"(measured: {', '.join(MEASURED)})"
        )
    if rounds < 1 or runs < 1 or warmup < 0:
        raise LatencyTableError(
            f"latency table: rounds ({rounds}) and runs ({runs}) must be >= 1, warmup ({warmup}) >= 0"
        )
    grid = _ffn_grid(key.intermediate_size, ffn_step)
    started = time.monotonic()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        graphs = _graphs(key, grid)
    with tempfile.TemporaryDirectory(prefix="obert-latency-") as tmp:
        paths, feeds = {}, {}
        with _progress(len(graphs), "latency table: export", progress) as bar:
            for name, module, inputs in graphs:
                path = Path(tmp) / f"{name}.onnx"
                _export(module, inputs, path)
                if key.precision == "int8":
                    (_quantize_static if key.runtime == "deepsparse" else _quantize)(path)
                paths[name] = path
                feeds[name] = {k: v.numpy() for k, v in inputs.items()}
                bar.update(1)
        del graphs
        exported = time.monotonic() - started
        compiled: dict[str, Callable[[], Any]] = {}
        if key.runtime == "deepsparse":
            with _progress(len(paths), "latency table: compile", progress) as bar:
                for name, path in paths.items():
                    compiled[name] = _runner(key.runtime, path, feeds[name], key.threads, key.batch_size)
                    bar.update(1)
        per_round: dict[str, list[float]] = {name: [] for name in paths}
        with _progress(len(paths) * rounds, "latency table: timing", progress) as bar:
            for _ in range(rounds):
                for name, path in paths.items():
                    run = compiled.get(name) or _runner(
                        key.runtime, path, feeds[name], key.threads, key.batch_size
                    )
                    for _ in range(warmup):
                        run()
                    times = []
                    for _ in range(runs):
                        t0 = clock()
                        run()
                        times.append((clock() - t0) * 1e3)
                    per_round[name].append(statistics.median(times))
                    del run
                    bar.update(1)
        compiled.clear()
    ms = {name: statistics.median(values) for name, values in per_round.items()}
    fit = fit_additive([(*_uniform_structure(key, name), ms[name]) for name in ms])
    attention = {k: fit.attention(k) for k in range(key.num_attention_heads + 1)}
    ffn = {n: fit.ffn(n) for n in grid}
    base = fit.base  # embeddings, the stand-ins' LayerNorms, pooler: what no pruning removes
    table = LatencyTable(
        key=key,
        base=base,
        attention=attention,
        ffn=ffn,
        unit="ms",
        meta={
            "source": "measured",
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "rounds": rounds,
            "runs": runs,
            "warmup": warmup,
            "dense_measured": ms["dense"],
            "models_ms": {name: round(value, 4) for name, value in ms.items()},  # what the fit saw
            "fit": {
                "attention": {"intercept": fit.attention.intercept, "slope": fit.attention.slope},
                "ffn": {"intercept": fit.ffn.intercept, "slope": fit.ffn.slope},
                "rms_ms": round(fit.rms, 4),
                "max_abs_residual_ms": round(max(abs(r) for r in fit.residuals), 4),
            },
            "method": METHOD,
            "cpu_flags": cpu_flags(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "export_s": round(exported, 2),
            "total_s": round(time.monotonic() - started, 2),
        },
    )
    table.meta["dense_predicted"] = table.dense()
    load = table.meta["load_average"]
    cores = os.cpu_count() or 1
    table.meta["cpu_count"] = cores
    ratio = (
        table.meta["dense_predicted"] / table.meta["dense_measured"] if table.meta["dense_measured"] else 0.0
    )
    table.meta["consistency"] = round(ratio, 4)  # predicted / measured dense time: 1 when blocks add up
    table.meta["trusted"] = bool(
        not (load and max(load[0], load[1]) >= cores) and abs(ratio - 1) <= MAX_MISMATCH
    )
    if load and max(load[0], load[1]) >= cores:
        # measured: with 2 threads on 2 busy cores, block times jumped 5-10x where ORT splits work
        warnings.warn(
            f"latency table measured under load (load average {load[0]:.1f} on {cores} CPUs): its times "
            f"may be far from a quiet machine's; re-measure with refresh=True when the machine is idle",
            RuntimeWarning,
            stacklevel=2,
        )
    if abs(ratio - 1) > MAX_MISMATCH:
        predicted, measured = table.meta["dense_predicted"], table.meta["dense_measured"]
        message = (
            f"latency table does not add up: it predicts the dense model at {predicted:.3g} ms, "
            f"measured {measured:.3g} ms ({ratio:.2f}x); speed-ups chosen with it will not come true: "
            "re-measure with refresh=True on a quiet machine"
        )
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return table


def latency_table(
    config: Any,
    *,
    runtime: str = "onnxruntime",
    threads: int = 2,
    batch_size: int = 1,
    sequence_length: int = 128,
    precision: str = "fp32",
    ffn_step: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    refresh: bool = False,
    progress: bool = True,
    table_file: str | os.PathLike | None = None,
    **measure: Any,
) -> LatencyTable:
    """The latency table of ``config``'s shape in this setting: read from the cache when a table with
    the same key is there (unless ``refresh``), else measured (``"onnxruntime"``, ``"deepsparse"``) or counted
    (``"flops"``) and cached with an atomic write; ``"deepsparse"`` needs the ``deepsparse`` extra.
    ``table_file`` (a table measured elsewhere, e.g. by ``obert latency-table`` on the deployment
    machine) is read and checked instead (:func:`read_table_file`); nothing is measured or cached.
    ``measure`` goes to :func:`measure_latency_table`."""
    from obert_modifiers.deployment import atomic_write_text

    if table_file is not None:
        setting = dict(
            runtime=runtime, threads=threads, batch_size=batch_size, sequence_length=sequence_length,
            precision=precision,
        )  # fmt: skip
        return read_table_file(table_file, config, **setting)
    key = shape_key(
        config,
        runtime=runtime,
        threads=threads,
        batch_size=batch_size,
        sequence_length=sequence_length,
        precision=precision,
    )
    if runtime == "flops":
        return flops_table(key, ffn_step)
    path = table_cache_path(key, cache_dir, ffn_step)
    grid = _ffn_grid(key.intermediate_size, ffn_step)
    if path.is_file() and not refresh:
        try:
            cached = LatencyTable.from_json(path.read_text(encoding="utf-8"), source=str(path))
        except LatencySearchError as exc:
            raise LatencyTableError(f"{exc}; delete the file or pass refresh=True to re-measure") from None
        if cached.key == key and sorted(cached.ffn) == grid and cached.meta.get("method") == METHOD:
            return cached
    table = measure_latency_table(key, ffn_step=ffn_step, progress=progress, **measure)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, table.to_json())
    return table


# the recipe key that sets each field of a table's key (the shape comes from the model)
SETTING_KEYS = {
    "runtime": "latency_runtime",
    "threads": "latency_threads",
    "batch_size": "latency_batch_size",
    "sequence_length": "latency_sequence_length",
    "precision": "latency_precision",
}
DEFAULT_SETTING = {
    "runtime": "onnxruntime", "threads": 2, "batch_size": 1, "sequence_length": 128, "precision": "fp32",
}  # fmt: skip


def read_table_file(
    path: str | os.PathLike, config: Any, *, depth: bool = True, **setting: Any
) -> LatencyTable:
    """A table measured elsewhere (``obert latency-table --output``), checked before it is used: the
    file must be a valid table, of ``config``'s shape, measured in the ``setting`` asked for (the
    :data:`SETTING_KEYS` fields; :data:`DEFAULT_SETTING` for those not given). The CPU and runtime
    version it names are the measuring machine's, which is the point (train here, time there).
    ``depth=False`` leaves the layer count out (the check before training: a layer drop may come
    before the first pruning step)."""
    unknown = sorted(set(setting) - set(SETTING_KEYS))
    if unknown:
        raise TypeError(f"read_table_file: unknown setting {unknown} (known: {sorted(SETTING_KEYS)})")
    wanted = {**DEFAULT_SETTING, **setting}
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LatencyTableError(f"latency_table_file {str(path)!r}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LatencyTableError(f"latency_table_file {str(path)!r}: cannot be read ({exc})") from None
    try:
        table = LatencyTable.from_json(text, source=f"latency_table_file {str(path)!r}")
    except LatencySearchError as exc:
        raise LatencyTableError(str(exc)) from None
    problems = [
        f"{name} {getattr(table.key, name)!r} where the recipe's {SETTING_KEYS[name]} is {value!r}"
        for name, value in wanted.items()
        if getattr(table.key, name) != value
    ]
    problems += [
        f"{name} {getattr(table.key, name)} where the model has {value}"
        for name, value in _shape(config).items()
        if getattr(table.key, name) != value and (depth or name != "num_hidden_layers")
    ]
    if problems:
        raise LatencyTableError(
            f"latency_table_file {str(path)!r} does not fit: it was measured with "
            + "; ".join(problems)
            + " (measure one for this setting and shape with `obert latency-table`, or change the keys)"
        )
    return table

