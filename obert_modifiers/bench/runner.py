"""Inference benchmark of a deployment folder on DeepSparse and ONNX Runtime, side by side.

Both engines run a *copy* of the folder's ``model.onnx`` (``deepsparse.benchmark -e onnxruntime``
rewrites the file it is given, in place), on the same synthetic token batch, warm-up first, then
timed calls for a fixed number of seconds. Latency figures are per call (one batch).

Timings depend on what else the machine is doing: DeepSparse pins and spins on its cores and
degrades sharply when another process competes for them. Each result records the 1-minute load
average measured before it ran; treat figures taken under load as indicative only.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from obert_modifiers.deployment import max_sequence_length
from obert_modifiers.errors import ObertError

__all__ = [
    "ENGINES",
    "BenchmarkError",
    "BenchmarkResult",
    "engine_available",
    "describe_path",
    "engine_path",
    "int8_form_of",
    "make_inputs",
    "ort_session",
    "PairedSpeedup",
    "paired_speedups",
    "run_benchmark",
    "run_deepsparse_benchmark_cli",
    "task_of",
]

ENGINES = ("deepsparse", "onnxruntime")
PAIR_BLOCK_SECONDS = 0.25  # paired_speedups: one block of calls, short against the machine's slow spells


class BenchmarkError(ObertError, RuntimeError):
    """Bad benchmark input (the message names the folder or file), e.g.
    ``runs/x has no model.onnx (export one with `obert export`)``."""


@dataclass
class BenchmarkResult:
    engine: str
    batch_size: int
    sequence_length: int
    num_cores: int | None
    median_ms: float
    p90_ms: float
    mean_ms: float
    items_per_second: float
    iterations: int = 0
    status: str = "ok"  # "ok" | "unavailable" | "failed"
    error: str | None = None
    load_average_1m: float | None = None
    model: str = ""
    # which path the engine took: ORT's providers and the file's INT8 form; DeepSparse's ISA and
    # whether its INT8 kernels are native (VNNI) or emulated; the CPU flags (engine_path())
    path: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def engine_available(engine: str) -> str | None:
    """None if ``engine`` can be imported, else the reason it cannot."""
    module = {"deepsparse": "deepsparse", "onnxruntime": "onnxruntime"}.get(engine)
    if module is None:
        return f"unknown engine {engine!r} (expected one of {', '.join(ENGINES)})"
    try:
        __import__(module)
    except Exception as error:  # ImportError, or a broken binary
        return f"{module} is not installed or cannot load ({error.__class__.__name__}: {error})"
    return None


def _model_path(deployment_dir: Path) -> Path:
    if not deployment_dir.exists():
        raise BenchmarkError(f"deployment folder {deployment_dir} does not exist")
    model = deployment_dir / "model.onnx" if deployment_dir.is_dir() else deployment_dir
    if not model.is_file() and (deployment_dir / "deployment" / "model.onnx").is_file():
        model = deployment_dir / "deployment" / "model.onnx"  # a zoo-layout folder (`obert zoo pull`)
    if not model.is_file():
        raise BenchmarkError(f"{deployment_dir} has no model.onnx (export one with `obert export`)")
    return model


def _config(deployment_dir: Path) -> dict[str, Any]:
    """The folder's config.json, or {} when it has none or it cannot be read (only hints come from it)."""
    try:
        config = json.loads((deployment_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _vocab_size(deployment_dir: Path) -> int:
    try:
        return int(_config(deployment_dir).get("vocab_size", 30522))
    except (ValueError, TypeError):
        return 30522


def _check_sequence_length(deployment_dir: Path, sequence_length: int) -> None:
    """Refuse a sequence longer than the model's position embeddings (every engine would fail on it)."""
    positions = max_sequence_length(deployment_dir)
    if positions is not None and sequence_length > positions:
        raise BenchmarkError(
            f"sequence length {sequence_length} (--sequence-length) is longer than the model in "
            f"{deployment_dir} takes: at most {positions} tokens (max_position_embeddings in config.json)"
        )


def _special_ids(folder: Path | None) -> tuple[int, int]:
    """``([CLS], [SEP])`` ids from the folder's ``vocab.txt`` (BERT WordPiece), else BERT's 101, 102."""
    ids = {"[CLS]": 101, "[SEP]": 102}
    vocab = folder / "vocab.txt" if folder is not None else None
    if vocab is not None and vocab.is_file():
        try:
            with open(vocab, encoding="utf-8") as handle:
                for index, line in enumerate(handle):
                    if line.strip() in ids:
                        ids[line.strip()] = index
        except (OSError, UnicodeDecodeError):
            pass
    return ids["[CLS]"], ids["[SEP]"]


def task_of(folder: Path) -> str:
    """The folder's task: ``export.json``'s ``task``, else from ``config.json``'s architecture, else
    text classification."""
    try:
        task = json.loads((folder / "export.json").read_text()).get("task")
    except (OSError, ValueError, AttributeError):
        task = None
    if isinstance(task, str) and task:
        return task
    architectures = _config(folder).get("architectures") or []
    for name in architectures if isinstance(architectures, list) else []:
        if str(name).endswith("ForQuestionAnswering"):
            return "question-answering"
        if str(name).endswith("ForTokenClassification"):
            return "token-classification"
    return "text-classification"


def make_inputs(
    onnx_path: Path,
    batch_size: int,
    sequence_length: int,
    vocab_size: int = 30522,
    seed: int = 0,
    task: str = "text-classification",
    special_ids: tuple[int, int] = (101, 102),
) -> dict[str, Any]:
    """A synthetic batch for every model input: random token ids (avoiding the special tokens
    at the start of BERT vocabularies), an all-ones attention mask, zero token types.

    ``task="question-answering"`` builds what a QA model is served: ``[CLS] question [SEP] context
    [SEP]`` windows (a quarter of the sequence for the question) with ``token_type_ids`` 1 on the
    context, the layout of a doc-stride window filled to ``sequence_length``. Token and text
    classification take one segment (``[CLS] text [SEP]``); token classification's per-token
    outputs cost the same to compute."""
    import numpy as np
    import onnx

    rng = np.random.default_rng(seed)
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as error:  # truncated or not ONNX at all: protobuf's DecodeError and others
        message = " ".join(str(error).split()) or error.__class__.__name__
        raise BenchmarkError(f"{onnx_path} is not a readable ONNX model: {message}") from None
    initializers = {init.name for init in model.graph.initializer}
    shape = (batch_size, sequence_length)
    cls_id, sep_id = special_ids
    ids = rng.integers(min(1000, vocab_size - 1), vocab_size, size=shape, dtype=np.int64)
    types = np.zeros(shape, dtype=np.int64)
    if task == "question-answering" and sequence_length >= 5:
        question_end = max(2, sequence_length // 4)  # [CLS] q... [SEP] at question_end
        ids[:, 0], ids[:, question_end], ids[:, -1] = cls_id, sep_id, sep_id
        types[:, question_end + 1 :] = 1
    elif task in ("text-classification", "token-classification") and sequence_length >= 2:
        ids[:, 0], ids[:, -1] = cls_id, sep_id
    inputs: dict[str, Any] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if "mask" in value.name:
            inputs[value.name] = np.ones(shape, dtype=np.int64)
        elif "type" in value.name:
            inputs[value.name] = types.copy()
        else:
            inputs[value.name] = ids.copy()
    return inputs


def _warm_up(call, seconds: float) -> None:
    deadline = time.perf_counter() + seconds
    call()  # at least one warm-up call: first calls allocate
    while time.perf_counter() < deadline:
        call()


def _time_calls(call, seconds: float, warmup_seconds: float, min_iterations: int = 5) -> list[float]:
    _warm_up(call, warmup_seconds)
    return _timed_calls(call, seconds, min_iterations)


def _folder_inputs(source: Path, batch_size: int, sequence_length: int) -> dict[str, Any]:
    """``make_inputs`` for a deployment's ``model.onnx``, with its folder's vocabulary size, task and
    special token ids."""
    folder = source.parent
    return make_inputs(
        source,
        batch_size,
        sequence_length,
        _vocab_size(folder),
        task=task_of(folder),
        special_ids=_special_ids(folder),
    )


def _timed_calls(call, seconds: float, min_iterations: int) -> list[float]:
    """Milliseconds of each call, for ``seconds`` and at least ``min_iterations`` calls."""
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < min_iterations:
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def _summary(
    engine: str,
    batch_size: int,
    sequence_length: int,
    num_cores: int | None,
    times_ms: list[float],
    load: float | None,
    model: str,
) -> BenchmarkResult:
    ordered = sorted(times_ms)
    p90 = ordered[min(len(ordered) - 1, int(math.ceil(0.9 * len(ordered))) - 1)]
    mean = statistics.fmean(times_ms)
    return BenchmarkResult(
        engine=engine,
        batch_size=batch_size,
        sequence_length=sequence_length,
        num_cores=num_cores,
        median_ms=statistics.median(times_ms),
        p90_ms=p90,
        mean_ms=mean,
        items_per_second=batch_size * 1000.0 / mean,
        iterations=len(times_ms),
        load_average_1m=load,
        model=model,
    )


def _unavailable(engine, batch_size, sequence_length, num_cores, status, error, model) -> BenchmarkResult:
    nan = float("nan")
    return BenchmarkResult(
        engine,
        batch_size,
        sequence_length,
        num_cores,
        nan,
        nan,
        nan,
        nan,
        status=status,
        error=error,
        model=model,
    )


def int8_form_of(onnx_path: str | os.PathLike) -> str | None:
    """The INT8 form of an ONNX file: ``export.json``'s ``int8_format`` beside it, else read from
    its operators (``MatMulInteger`` with INT8 / UINT8 weights, ``DequantizeLinear`` only: qdq);
    None for an FP32 graph."""
    import onnx

    onnx_path = Path(onnx_path)
    manifest = onnx_path.parent / "export.json"
    if manifest.is_file():
        try:
            recorded = json.loads(manifest.read_text()).get("int8_format")
        except (OSError, ValueError):
            recorded = None
        if recorded:
            return str(recorded)
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inits = {init.name: init.data_type for init in graph.initializer}
    ops = [node for node in graph.node]
    integer = [n for n in ops if n.op_type == "MatMulInteger" and len(n.input) > 1]
    if integer:
        signed = any(inits.get(n.input[1]) == onnx.TensorProto.INT8 for n in integer)
        return "ort" if signed else "integer"
    if any(n.op_type in ("DequantizeLinear", "QLinearMatMul") for n in ops):
        return "qdq"
    return None


def engine_path(engine: str, onnx_path: str | os.PathLike, session: Any = None) -> dict[str, Any]:
    """What path ``engine`` takes on this CPU for ``onnx_path``: the CPU flags (avx2, avx512_vnni,
    avx_vnni) and the file's INT8 form for both; ORT's execution providers; DeepSparse's own CPU
    detection (ISA, VNNI) and whether its INT8 kernels run natively or emulated (no VNNI: DeepSparse
    logs "no VNNI instructions were detected" and emulates INT8)."""
    from obert_modifiers.latency import cpu_flags

    flags = cpu_flags(("avx2", "avx512f", "avx512_vnni", "avx_vnni"))
    form = int8_form_of(onnx_path)
    path: dict[str, Any] = {"cpu_flags": flags, "int8_form": form}
    if engine == "onnxruntime":
        import onnxruntime as ort

        path["providers"] = list(session.get_providers()) if session is not None else ["CPUExecutionProvider"]
        path["onnxruntime"] = ort.__version__
        if form is not None:
            from obert_modifiers.export.parity import INT8_KERNELS, int8_kernels_exact

            kernel = INT8_KERNELS.get(form)
            path["int8_kernel"] = kernel
            path["int8_kernel_exact"] = int8_kernels_exact().get(kernel) if kernel else None
    elif engine == "deepsparse":
        try:
            import deepsparse
            from deepsparse.cpu import cpu_architecture

            arch = cpu_architecture()
            isa, vnni = str(arch.isa), bool(arch.vnni)
            path["deepsparse"] = deepsparse.__version__
        except Exception:  # no DeepSparse: the flags decide
            isa = "avx512" if flags["avx512f"] else ("avx2" if flags["avx2"] else "unknown")
            vnni = flags["avx512_vnni"] or flags["avx_vnni"]
        path["isa"], path["vnni"] = isa, vnni
        path["int8"] = None if form is None else ("native" if vnni else "emulated")
    return path


def describe_path(path: dict[str, Any] | None) -> str:
    """One short cell for a result's ``path``: ``CPU, INT8 ort-u8 (u8u8 exact)`` or
    ``avx2, INT8 emulated (no VNNI)``."""
    if not path:
        return ""
    form = path.get("int8_form")
    if "providers" in path:
        providers = ",".join(p.replace("ExecutionProvider", "") for p in path["providers"])
        if form is None:
            return f"{providers}, FP32"
        exact = path.get("int8_kernel_exact")
        kernel = path.get("int8_kernel")
        note = f" ({kernel} {'exact' if exact else 'not exact'})" if kernel else ""
        return f"{providers}, INT8 {form}{note}"
    isa = path.get("isa", "?")
    if form is None:
        return f"{isa}, FP32"
    return f"{isa}, INT8 {path.get('int8')}" + ("" if path.get("vnni") else " (no VNNI)")


def _load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def ort_session(onnx_path: Path, num_cores: int | None):
    """An ONNX Runtime CPU session as every timing here uses it: all graph optimizations, sequential
    execution, ``num_cores`` intra-op threads (None: ORT's default, all cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if num_cores:
        options.intra_op_num_threads = int(num_cores)
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def _run_onnxruntime(onnx_path: Path, inputs, num_cores, seconds, warmup, path: dict) -> list[float]:
    session = ort_session(onnx_path, num_cores)
    path["providers"] = list(session.get_providers())
    return _time_calls(lambda: session.run(None, inputs), seconds, warmup)


def _run_deepsparse(
    onnx_path: Path, inputs, batch_size, sequence_length, num_cores, seconds, warmup
) -> list[float]:
    from deepsparse import Engine

    arrays = list(inputs.values())
    engine = Engine(
        model=str(onnx_path),
        batch_size=batch_size,
        num_cores=num_cores,
        input_shapes=[list(a.shape) for a in arrays],
    )
    return _time_calls(lambda: engine.run(arrays), seconds, warmup)


def run_benchmark(
    deployment_dir: str | os.PathLike,
    engines: Sequence[str] = ENGINES,
    batch_size: int = 1,
    sequence_length: int = 128,
    num_cores: int | None = None,
    seconds: float = 5.0,
    warmup_seconds: float = 1.0,
) -> list[BenchmarkResult]:
    """Benchmark ``deployment_dir/model.onnx`` on each engine (results in the order given).

    An engine that is not installed gives a result with ``status="unavailable"`` and the reason
    in ``error``; an engine that fails to run gives ``status="failed"``. ONNX Runtime runs before
    DeepSparse, whose spinning worker threads would otherwise slow it down.
    """
    deployment_dir = Path(deployment_dir)
    source = _model_path(deployment_dir)
    folder = source.parent
    if batch_size < 1 or sequence_length < 1:
        raise BenchmarkError(
            f"batch size and sequence length must be >= 1, got {batch_size}, {sequence_length}"
        )
    if seconds <= 0:
        raise BenchmarkError(f"seconds must be > 0, got {seconds}")
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise BenchmarkError(f"unknown engine(s) {unknown}: expected {', '.join(ENGINES)}")
    _check_sequence_length(folder, sequence_length)

    results: dict[str, BenchmarkResult] = {}
    with tempfile.TemporaryDirectory(prefix="obert-bench-") as scratch:
        inputs = _folder_inputs(source, batch_size, sequence_length)
        for engine in sorted(engines, key=lambda e: e != "onnxruntime"):
            reason = engine_available(engine)
            if reason:
                results[engine] = _unavailable(
                    engine, batch_size, sequence_length, num_cores, "unavailable", reason, str(source)
                )
                continue
            copy = Path(scratch) / engine / "model.onnx"  # never benchmark the original in place
            copy.parent.mkdir()
            shutil.copyfile(source, copy)
            if (folder / "model.data").is_file():
                shutil.copyfile(folder / "model.data", copy.parent / "model.data")
            load = _load()
            path = engine_path(engine, source)
            try:
                if engine == "onnxruntime":
                    times = _run_onnxruntime(copy, inputs, num_cores, seconds, warmup_seconds, path)
                else:
                    times = _run_deepsparse(
                        copy, inputs, batch_size, sequence_length, num_cores, seconds, warmup_seconds
                    )
            except Exception as error:
                results[engine] = _unavailable(
                    engine,
                    batch_size,
                    sequence_length,
                    num_cores,
                    "failed",
                    f"{error.__class__.__name__}: {error}",
                    str(source),
                )
                results[engine].path = path
                continue
            results[engine] = _summary(
                engine, batch_size, sequence_length, num_cores, times, load, str(source)
            )
            results[engine].path = path
    return [results[e] for e in engines]


@dataclass
class PairedSpeedup:
    """How much faster ``candidate`` runs than ``baseline`` on ONNX Runtime, timed in alternating
    short blocks: per pair, the baseline's median call time over the candidate's."""

    baseline: str
    candidate: str
    batch_size: int
    sequence_length: int
    num_cores: int | None
    ratios: list[float]
    baseline_ms: list[float]
    candidate_ms: list[float]
    load_average_1m: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    @property
    def quartiles(self) -> tuple[float, float]:
        if len(self.ratios) < 2:
            return self.ratios[0], self.ratios[0]
        q1, _, q3 = statistics.quantiles(self.ratios, n=4, method="inclusive")
        return q1, q3

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "median": self.median, "quartiles": list(self.quartiles)}


def _block_median(call, seconds: float, min_calls: int = 3) -> float:
    return statistics.median(_timed_calls(call, seconds, min_calls))


def paired_speedups(
    baseline_dir: str | os.PathLike,
    candidates: dict[str, str | os.PathLike],
    batch_size: int = 1,
    sequence_length: int = 128,
    num_cores: int | None = None,
    pairs: int = 20,
    block_seconds: float = PAIR_BLOCK_SECONDS,
    warmup_seconds: float = 0.5,
    progress: Any = None,
) -> dict[str, PairedSpeedup]:
    """Speed-up of each candidate deployment over ``baseline_dir`` on ONNX Runtime.

    A machine's speed drifts (a shared VM's slow spells last minutes), so timings of two models taken
    minutes apart compare the machine as much as the models. Here each pair times the baseline and
    the candidate in blocks of ``block_seconds``, back to back, in ABBA order (baseline first in even
    pairs), and the ratio of the two block medians is the pair's speed-up; a slow spell longer than a
    pair cancels out. Both run on the same synthetic batch (``make_inputs``, same seed). ``progress``
    (a callable) is told each finished candidate.
    """
    if pairs < 1 or block_seconds <= 0:
        raise BenchmarkError(f"pairs must be >= 1 and block_seconds > 0, got {pairs}, {block_seconds}")
    reason = engine_available("onnxruntime")
    if reason:
        raise BenchmarkError(f"paired speed-ups run on ONNX Runtime: {reason}")
    folders = {"baseline": Path(baseline_dir), **{k: Path(v) for k, v in candidates.items()}}
    runs = {}
    for name, folder in folders.items():
        source = _model_path(folder)
        _check_sequence_length(source.parent, sequence_length)
        runs[name] = (source, _folder_inputs(source, batch_size, sequence_length))

    def runner(name: str):
        source, inputs = runs[name]
        session = ort_session(source, num_cores)
        call = lambda: session.run(None, inputs)  # noqa: E731
        _warm_up(call, warmup_seconds)
        return call

    base_call = runner("baseline")
    out: dict[str, PairedSpeedup] = {}
    for name in candidates:
        call = runner(name)
        load = _load()
        base_ms, cand_ms = [], []
        for index in range(pairs):
            order = (base_call, call) if index % 2 == 0 else (call, base_call)
            first, second = (_block_median(c, block_seconds) for c in order)
            base, cand = (first, second) if index % 2 == 0 else (second, first)
            base_ms.append(base)
            cand_ms.append(cand)
        out[name] = PairedSpeedup(
            baseline=str(runs["baseline"][0]),
            candidate=str(runs[name][0]),
            batch_size=batch_size,
            sequence_length=sequence_length,
            num_cores=num_cores,
            ratios=[b / c for b, c in zip(base_ms, cand_ms, strict=True)],
            baseline_ms=base_ms,
            candidate_ms=cand_ms,
            load_average_1m=load,
        )
        if progress is not None:
            progress(name, out[name])
    return out


def run_deepsparse_benchmark_cli(
    deployment_dir: str | os.PathLike,
    batch_size: int = 1,
    sequence_length: int = 128,
    num_cores: int | None = None,
    seconds: float = 5.0,
    warmup_seconds: float = 1.0,
    engine: str = "deepsparse",
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Run the stock ``deepsparse.benchmark`` command on a copy of the folder's model.onnx and
    return its JSON report (``items_per_sec``, ``benchmark_result`` ...)."""
    source = _model_path(Path(deployment_dir))
    executable = Path(sys.executable).with_name("deepsparse.benchmark")
    command = (
        [str(executable)]
        if executable.exists()
        else [sys.executable, "-m", "deepsparse.benchmark_model.benchmark_model"]
    )
    with tempfile.TemporaryDirectory(prefix="obert-dsbench-") as scratch:
        copy = Path(scratch) / "model.onnx"
        shutil.copyfile(source, copy)
        report = Path(scratch) / "report.json"
        command += [
            str(copy),
            "-b",
            str(batch_size),
            "-seq_len",
            str(sequence_length),
            "-t",
            str(max(1, math.ceil(seconds))),
            "-w",
            str(max(0, math.ceil(warmup_seconds))),
            "-e",
            engine,
            "-x",
            str(report),
            "-q",
        ]
        if num_cores:
            command += ["-ncores", str(num_cores)]
        completed = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "NM_DISABLE_ANALYTICS": "1"},
        )
        if completed.returncode != 0:
            raise BenchmarkError(
                f"deepsparse.benchmark failed on {source} (exit {completed.returncode}): "
                f"{completed.stderr.strip()[-2000:]}"
            )
        if not report.is_file():
            raise BenchmarkError(f"deepsparse.benchmark wrote no report for {source}")
        data = json.loads(report.read_text())
        data["stdout"] = completed.stdout[-4000:]
        return data
