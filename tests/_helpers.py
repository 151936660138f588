"""Helpers shared by test modules (``from _helpers import ...``: pytest puts ``tests/`` on sys.path).

Fresh-interpreter runs (a Python snippet or a console script, with the offline environment of
``conftest.OFFLINE_ENV``), the checks on their result, small CSV slices, and the command lines of
SparseML's STOCK console scripts (training and ONNX export): training through the package's one
builder (``obert_modifiers.runs.stock``), so tests, ``obert demo`` and the benchmarks run it alike.
"""

from __future__ import annotations

import csv
import itertools
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from conftest import OFFLINE_ENV

from obert_modifiers.runs.stock import STOCK_SCRIPT, stock_script, train_args

BIN = Path(sys.executable).parent
TRAIN_SCRIPT = STOCK_SCRIPT  # sparseml.transformers.train.text_classification
EXPORT_SCRIPT = "sparseml.transformers.export_onnx"


def offline_env(**extra: str) -> dict[str, str]:
    """This process's environment with the offline settings (and ``extra``) on top."""
    return {**os.environ, **OFFLINE_ENV, **extra}


def run(
    args: Sequence[object],
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: int = 300,
) -> subprocess.CompletedProcess:
    """Run ``args`` (converted to strings) in a fresh process; output is captured as text."""
    return subprocess.run(
        [str(a) for a in args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def run_python(code: str, *args: object, **kwargs) -> subprocess.CompletedProcess:
    """Run a Python snippet in a fresh interpreter (the start-up hook runs as in any process)."""
    return run([sys.executable, "-c", code, *args], **kwargs)


def check(result: subprocess.CompletedProcess, what: str, tail: int = 4000) -> None:
    """Assert that a run succeeded; on failure show the end of its stderr."""
    assert result.returncode == 0, f"{what} failed (rc {result.returncode}):\n{result.stderr[-tail:]}"


def subset_csv(src: Path, dst: Path, rows: int) -> Path:
    """The header and the first ``rows`` rows of the CSV ``src``, written to ``dst``."""
    with open(src, newline="") as handle:
        reader = csv.reader(handle)
        kept = [next(reader)] + list(itertools.islice(reader, rows))
    with open(dst, "w", newline="") as handle:
        csv.writer(handle).writerows(kept)
    return dst


def stock_train_args(
    model_dir: Path,
    data_dir: Path,
    output_dir: Path,
    recipe: Path,
    *flags: object,
    max_seq_length: int = 64,
    batch_size: int = 16,
) -> list[str]:
    """The arguments of the stock ``sparseml.transformers.train.text_classification`` script on
    ``data_dir/{train,validation}.csv`` (``obert_modifiers.runs.stock.train_args``, nothing else
    set: checkpoints are saved the trainer's default way); ``flags`` are further arguments."""
    return train_args(
        model_dir, data_dir, output_dir, recipe, seq=max_seq_length, batch=batch_size, extra=flags
    )


def stock_train_command(*args: object, **kwargs: int) -> list[str]:
    """The whole stock training command line: the console script, then :func:`stock_train_args`."""
    return [*stock_script(), *stock_train_args(*args, **kwargs)]


def stock_export_args(model_path: Path, sequence_length: int = 64) -> list[str]:
    """The arguments of the stock ``sparseml.transformers.export_onnx`` script (it writes
    ``deployment/`` next to the model folder)."""
    return [
        "--task", "text-classification",
        "--model_path", str(model_path),
        "--sequence_length", str(sequence_length),
    ]  # fmt: skip


def stock_export_command(model_path: Path, sequence_length: int = 64) -> list[str]:
    """The whole stock export command line: the console script, then :func:`stock_export_args`."""
    return [str(BIN / EXPORT_SCRIPT), *stock_export_args(model_path, sequence_length)]
