"""Compound sparsification of MiniLM-L6 on Rotten Tomatoes: accuracy, size and latency.

Four models from the shared training pipeline (``benchmarks/_pipeline.py``; the rows of
``benchmarks/_rows.py``, the same staged recipes and stage cache as ``benchmarks/reproduce.py``),
each trained by the STOCK ``sparseml.transformers.train.text_classification`` script, exported with
``obert_modifiers.export`` (parity-checked) and timed with ``obert_modifiers.bench`` on DeepSparse
and ONNX Runtime:

1. ``dense-fp32``            MiniLM-L6 fine-tuned (recipes/minilm_teacher.yaml)
2. ``pruned80-fp32``         the float weights of (3), exported FP32 (``_pipeline.fp32_twin``)
3. ``pruned80-int8``         (1) + oBERT block4 pruning to 80 % with distillation, then QAT with masks
                             kept (minilm_6l_prune_qat.yaml)
4. ``3layer-pruned80-int8``  (1) dropped to 3 layers, pruned 80 % block4, QAT (minilm_3l_drop_prune_qat.yaml)

(2) is the FP32 export of the very model that (3) exports in INT8 (same pruned weights, without
fake quantization), for the INT8-vs-FP32 comparison on DeepSparse. Accuracy is scored on the test
split with ONNX Runtime on the exported model.onnx; latency at batch 1 / 32 and sequence 128 / 64
on ``--cores`` cores (2 by default), warm-up first.

    python benchmarks/compound.py --quick     # smoke run: small slice, short stages
    python benchmarks/compound.py             # the measurement (reproduce.py's stages; 3 h to train them)

Writes ``docs/results/compound.json``, ``docs/results/compound.png`` and the ``compound``
section of ``docs/results.md``; ``--quick`` writes them to ``runs/results-quick/`` instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import _pipeline as pipeline  # noqa: E402
from benchmarks._results import markdown_table, results_dir, update_results_section, write_json  # noqa: E402
from benchmarks._rows import (  # noqa: E402
    ROWS,
    SETTINGS,
    command_text,
    epochs_text,
    slice_text,
    stages_for,
    training_flags,
    workspace,
)
from obert_modifiers.runs.evaluate import onnx_accuracy  # noqa: E402
from obert_modifiers.runs.stock import apply_offline_env  # noqa: E402

# compound name -> reproduce row (the stage that trains it)
MODELS = {
    "dense-fp32": "dense",
    "pruned80-fp32": "6L-80-block4-INT8",  # its FP32 twin
    "pruned80-int8": "6L-80-block4-INT8",
    "3layer-pruned80-int8": "3L-80-block4-INT8",
}
GRID = {"quick": [(1, 128), (32, 64)], "full": [(1, 128), (1, 64), (32, 128), (32, 64)]}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subset = [r for r in rows if r["batch_size"] == 1 and r["sequence_length"] == 128 and r["status"] == "ok"]
    models = list(dict.fromkeys(r["model"] for r in subset))
    series = sorted({(r["engine"], r["num_cores"]) for r in subset}, key=lambda s: (-s[1], s[0]))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(1, len(series))
    for i, (engine, cores) in enumerate(series):
        values = [
            next(
                (
                    r["median_ms"]
                    for r in subset
                    if (r["model"], r["engine"], r["num_cores"]) == (m, engine, cores)
                ),
                0,
            )
            for m in models
        ]
        offsets = [x + (i - (len(series) - 1) / 2) * width for x in range(len(models))]
        ax.bar(offsets, values, width, label=f"{engine}, {cores} core(s)")
    ax.set_xticks(range(len(models)), models, rotation=15)
    ax.set_yscale("log")
    ax.set_ylabel("median latency, ms (batch 1, seq 128, log scale)")
    ax.set_title("MiniLM-L6 on Rotten Tomatoes: compound sparsification (shared 2-core machine)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small training slice and short timings")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "pipeline", help="stage cache folder")
    parser.add_argument("--cores", type=int, nargs="+", default=[2], help="core counts to time (default: 2)")
    parser.add_argument("--jobs", type=int, default=2, help="training runs side by side (1 thread each)")
    parser.add_argument("--max-train", type=int, help="training snippets (default: the mode's; 0: all 9,755)")
    parser.add_argument("--skip-layer-drop", action="store_true")
    parser.add_argument(
        "--from-json", type=Path, help="re-render the docs section from a saved compound.json (no runs)"
    )
    args = parser.parse_args(argv)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        report(saved["mode"], saved["settings"], saved["cores"], saved["models"], saved["timings"],
               saved["train_seconds"], machine=saved.get("machine"))  # fmt: skip
        return 0

    apply_offline_env()
    from rich.console import Console

    console = Console()
    mode = "quick" if args.quick else "full"
    cfg = dict(SETTINGS[mode])
    if args.max_train is not None:
        cfg["max_train"] = args.max_train or None
    names = [n for n in MODELS if not (args.skip_layer_drop and n.startswith("3layer"))]
    rows = [r for r in ROWS if r.name in {MODELS[n] for n in names}]
    twins = {"pruned80-fp32"}  # models exported from a QAT stage's float weights
    work, data = workspace(args.work, mode, cfg)

    started = time.perf_counter()
    trained = pipeline.run_stages(
        stages_for(rows, cfg), work / "stages", data, training_flags(cfg), args.jobs
    )
    train_seconds = time.perf_counter() - started

    summary, deployments = [], {}
    for name in names:
        row = MODELS[name]
        source = trained[row]
        if name in twins:
            row = f"{row}-fp32-twin"
            source = pipeline.fp32_twin(source, work / "twins" / row)
        result = pipeline.export(source, work / "deployments" / row, reuse=True)
        deployments[name] = result.path
        accuracy = onnx_accuracy(result.path, data / "test.csv", cfg["max_test"])
        summary.append({
            "model": name, "pipeline_row": row, "accuracy": accuracy, "quantized": result.quantized,
            "sparsity": result.sparsity, "num_layers": result.num_layers,
            "onnx_mb": result.onnx_bytes / 1e6, "parity_max_abs_diff": result.max_abs_diff,
        })  # fmt: skip
        console.print(
            f"{name}: test accuracy {accuracy:.3f}, {result.onnx_bytes / 1e6:.1f} MB, "
            f"sparsity {result.sparsity:.1%}, parity {result.max_abs_diff:.2g}"
        )
    timing_rows = pipeline.time_deployments(
        deployments, GRID[mode], args.cores, cfg["seconds"], cfg["warmup"], rounds=cfg["rounds"]
    )
    report(mode, cfg, args.cores, summary, timing_rows, train_seconds)
    return 0


def report(
    mode: str,
    cfg: dict,
    cores: list[int],
    summary: list[dict],
    timing_rows: list[dict],
    train_seconds,
    machine: dict | None = None,
) -> None:
    """Write compound.{json,png} and the docs section (also from a saved JSON: ``--from-json``, which
    keeps the machine facts recorded when the timings were taken)."""
    from rich.console import Console

    console = Console()
    rows = [r for r in ROWS if r.name in {MODELS[m["model"]] for m in summary}]

    def median(model: str, engine: str, batch: int, length: int, cores: int) -> float | None:
        return pipeline.median_ms(timing_rows, model, engine, batch, length, cores)

    def ratio_of(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    target: dict[str, Any] = {"target": 5.0}
    int8_vs_fp32: dict[str, Any] = {}
    for core_count in cores:
        target[f"pruned80_int8_deepsparse_vs_dense_fp32_ort_b1_s128_{core_count}cores"] = ratio_of(
            median("dense-fp32", "onnxruntime", 1, 128, core_count),
            median("pruned80-int8", "deepsparse", 1, 128, core_count),
        )
        target[f"per_round_{core_count}cores"] = pipeline.paired_round_ratios(
            timing_rows,
            ("dense-fp32", "onnxruntime", 1, 128, core_count),
            ("pruned80-int8", "deepsparse", 1, 128, core_count),
        )
        for engine in ("deepsparse", "onnxruntime"):
            int8_vs_fp32[f"{engine}_{core_count}cores"] = ratio_of(
                median("pruned80-fp32", engine, 1, 128, core_count),
                median("pruned80-int8", engine, 1, 128, core_count),
            )

    payload: dict[str, Any] = {
        "mode": mode, "cores": cores, "train_seconds": train_seconds, "settings": cfg, "stages": MODELS,
        "models": summary, "timings": timing_rows, "speedup_target": target,
        "pruned_int8_vs_pruned_fp32_b1_s128": int8_vs_fp32,
    }  # fmt: skip
    if machine:
        payload["machine"] = machine  # write_json's own machine facts give way to the measured run's
    smoke = mode == "quick"  # a smoke run goes to the scratch folder, not docs/
    json_path = write_json("compound", payload, smoke)
    png_path = results_dir(smoke) / "compound.png"
    plot(timing_rows, png_path)

    headers = ["model", "layers", "sparsity", "INT8", "test acc", "ONNX MB"]
    grid_cols = []
    for core_count in cores:
        for batch, length in GRID[mode]:
            for engine, short in (("onnxruntime", "ORT"), ("deepsparse", "DS")):
                grid_cols.append((engine, batch, length, core_count))
                headers.append(f"{short} b{batch} s{length} {core_count}c ms")
    table_rows = []
    for row in summary:
        cells = [
            row["model"],
            row["num_layers"],
            f"{row['sparsity']:.0%}",
            "yes" if row["quantized"] else "no",
            f"{row['accuracy']:.3f}",
            f"{row['onnx_mb']:.1f}",
        ]
        for engine, batch, length, core_count in grid_cols:
            value = median(row["model"], engine, batch, length, core_count)
            cells.append("n/a" if value is None else f"{value:.2f}")
        table_rows.append(cells)
    loads = [r["load_average_1m"] for r in timing_rows if r.get("load_average_1m") is not None]
    kind = (
        "smoke run: small slice, short stages, accuracy not meaningful" if mode == "quick" else "measurement"
    )
    load_text = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "n/a"
    command = command_text("compound.py", mode, cfg)
    key = "pruned80_int8_deepsparse_vs_dense_fp32_ort_b1_s128_{}cores"
    measured = (
        "; ".join(
            f"**{target[key.format(c)]:.2f}x** on {c} core(s) (medians of the rounds), per interleaved "
            "round " + ", ".join(f"{x:.2f}x" for x in target[f"per_round_{c}cores"])
            for c in cores
            if target[key.format(c)]
        )
        or "not measured (an engine failed)"
    ) + "."
    speedups = ", ".join(f"{e.replace('_', ' ')} {v:.2f}x" for e, v in int8_vs_fp32.items() if v) or "n/a"
    parity = (
        max(r["parity_max_abs_diff"] for r in summary if r["quantized"])
        if any(r["quantized"] for r in summary)
        else None
    )
    notes = [
        f"Mode `{mode}` ({kind}): {slice_text(cfg)}, seq {cfg['seq']}; stages (recipes/minilm_*.yaml, "
        f"docs/recipes.md), in epochs: teacher {cfg['teacher_epochs']:g}; "
        + "; ".join(f"{row.name}: {epochs_text(cfg, row)}" for row in rows if row.name != "dense")
        + "; distillation from the teacher throughout. Test accuracy on "
        + (f"the first {cfg['max_test']} test snippets" if cfg["max_test"] else "the 1,913 test snippets")
        + f". Timings: {', '.join(map(str, cores))} core(s), median of {cfg['seconds']:g} s per run, "
        "the median of "
        f"{cfg['rounds']} interleaved round(s); 1-minute load average {load_text} (DeepSparse spin-waits on "
        "its cores, so any other job on the machine inflates its figures; see docs/benchmark.md).",
        "Target: pruned + INT8 on DeepSparse >= 5x faster than dense FP32 on ONNX Runtime at batch 1, "
        "seq 128: " + measured,
        f"INT8 vs FP32 of the same pruned model at b1 s128 (INT8 speed-up): {speedups}.",
        "ONNX Runtime gains nothing from sparsity: it keeps pruned weights as dense matrices (zeros are "
        "multiplied), so pruned80-fp32 runs at dense speed there; only DeepSparse skips zeros. ORT does "
        "gain from INT8 (MatMulInteger), less than DeepSparse.",
        (
            f"INT8 parity: the exported MatMulInteger graph is within {parity:.3g} of the PyTorch QAT model "
            "(QAT models the INT32 bias grid of the integer graph; docs/export.md)."
            if parity is not None
            else ""
        ),
        f"Source: `{command}`; JSON `{json_path.relative_to(ROOT)}`, plot `{png_path.relative_to(ROOT)}`.",
    ]
    markdown = "## Compound sparsification: MiniLM-L6 on Rotten Tomatoes\n\n" + markdown_table(
        headers, table_rows
    )
    markdown += "\n\n" + "\n".join(f"- {n}" for n in notes if n) + "\n\n![compound](results/compound.png)\n"
    update_results_section("compound", markdown, smoke)
    console.print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
