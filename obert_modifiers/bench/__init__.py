"""Inference benchmark of a deployment folder on DeepSparse and ONNX Runtime, side by side.

The code is in :mod:`.runner` (timing loops, synthetic inputs, the stock ``deepsparse.benchmark``
wrapper) and :mod:`.cli` (``obert benchmark``); this module only re-exports the public names.
"""

from __future__ import annotations

from obert_modifiers.bench.runner import (
    ENGINES,
    BenchmarkError,
    BenchmarkResult,
    PairedSpeedup,
    engine_available,
    make_inputs,
    paired_speedups,
    run_benchmark,
    run_deepsparse_benchmark_cli,
)

__all__ = [
    "ENGINES",
    "BenchmarkError",
    "BenchmarkResult",
    "engine_available",
    "PairedSpeedup",
    "make_inputs",
    "paired_speedups",
    "run_benchmark",
    "run_deepsparse_benchmark_cli",
]
