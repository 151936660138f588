"""Shared output for benchmark scripts: JSON + a markdown table in docs/results.md.

Each benchmark owns one section of docs/results.md between ``<!-- BEGIN name -->`` and
``<!-- END name -->`` markers and rewrites only that section, so figures in the docs always come
from a script run, never from hand edits.

A smoke run (``--quick``: a small slice and a few steps, whose accuracies say nothing) is not a
result: with ``smoke=True`` its JSON, plot and markdown go to ``runs/results-quick/`` (not tracked),
and docs/ is left alone.
"""

from __future__ import annotations

import json
import platform
import re
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "docs" / "results"
RESULTS_MD = ROOT / "docs" / "results.md"
SCRATCH_DIR = ROOT / "runs" / "results-quick"


def results_dir(smoke: bool = False) -> Path:
    """Where a run's JSON and plots go: docs/results/, or the scratch folder for a smoke run."""
    folder = SCRATCH_DIR if smoke else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def machine_info() -> dict:
    import os

    info = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def write_json(name: str, payload: dict[str, Any], smoke: bool = False) -> Path:
    path = results_dir(smoke) / f"{name}.json"
    payload = {"machine": machine_info(), **payload}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def update_results_section(name: str, markdown: str, smoke: bool = False) -> Path:
    """Replace (or append) the ``name`` section of docs/results.md with ``markdown``; a smoke run
    writes ``<scratch>/<name>.md`` instead (its figure links point beside it)."""
    if smoke:
        path = results_dir(smoke=True) / f"{name}.md"
        path.write_text(markdown.replace("](results/", "](").strip() + "\n")
        return path
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Results\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS_MD.write_text(text)
    return RESULTS_MD


def paired_comparison(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict[str, Any]:
    """McNemar's exact test of two classifiers scored on the same examples.

    Only the examples the two disagree on carry information: ``b_only`` (B right, A wrong) and
    ``a_only``. Under "equally accurate" each disagreement is a fair coin, so the two-sided p-value
    is a binomial test on them; pairing makes this far more sensitive than comparing two
    independent accuracy intervals.
    """
    from scipy.stats import binomtest

    if len(correct_a) != len(correct_b):
        raise ValueError(f"paired comparison needs the same examples ({len(correct_a)} vs {len(correct_b)})")
    a_only = sum(bool(a) and not b for a, b in zip(correct_a, correct_b, strict=True))
    b_only = sum(bool(b) and not a for a, b in zip(correct_a, correct_b, strict=True))
    discordant = a_only + b_only
    p_value = binomtest(b_only, discordant, 0.5).pvalue if discordant else 1.0
    return {"a_only": a_only, "b_only": b_only, "p_value": float(p_value), "n": len(correct_a)}


def step_printer(label: str, every: float = 30.0) -> Callable[[int, int, int], None]:
    """A ``run_logged`` progress callback that prints ``<label>: step done/total`` for the training
    counter (bar 0) at most every ``every`` seconds, and at its last step."""
    shown = {"last": 0.0}

    def progress(done: int, total: int, bar: int) -> None:
        now = time.perf_counter()
        if bar == 0 and (now - shown["last"] > every or done == total):
            shown["last"] = now
            print(f"{label}: step {done}/{total}", flush=True)

    return progress
