"""Compound sparsification of MiniLM-L6 on Rotten Tomatoes: accuracy, size and latency.

Four models, each trained by the STOCK ``sparseml.transformers.train.text_classification`` script
with a recipe using this package's modifiers, exported with ``obert_modifiers.export`` and timed
with ``obert_modifiers.bench`` on DeepSparse and ONNX Runtime:

1. ``dense-fp32``         MiniLM-L6 fine-tuned (EpochRange + linear LR)
2. ``pruned80-fp32``      (1) pruned to 80 % with ``!OBertPruningModifier``, recovery at 80 %
3. ``pruned80-int8``      (2) + QAT with ``!OBertQuantizationModifier`` (masks kept)
4. ``3layer-pruned80-int8`` (1) shrunk to 3 layers (``!LayerDropModifier``), pruned 80 %, then QAT

Accuracy is scored on the test split with ONNX Runtime on the exported model.onnx. Latency at
batch 1 / 32 and sequence 128 / 64 on ``--cores`` cores (2 by default), warm-up first.

    python benchmarks/compound.py --quick     # minutes: tiny training slices, 1-2 s timings
    python benchmarks/compound.py             # hours on 2 cores: full training

Writes ``docs/results/compound.json``, ``docs/results/compound.png`` and the ``compound``
section of ``docs/results.md``. The --quick figures are a smoke run: accuracy after a few dozen
steps is not meaningful, and timings on a shared machine are indicative (load is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._results import RESULTS_DIR, markdown_table, update_results_section, write_json  # noqa: E402

PRUNE_PARAMS = (
    '["re:bert.encoder.layer.*.(attention.self.(query|key|value)|attention.output.dense|'
    'intermediate.dense|output.dense).weight"]'
)

SETTINGS = {
    # max_train/max_eval: data slice; epochs per stage; num_grads: oBERT Fisher gradients
    "quick": dict(
        max_train=480,
        max_eval=64,
        max_test=256,
        seq=64,
        dense_epochs=2.0,
        dense_lr=1.5e-4,
        prune_epochs=2.0,
        qat_epochs=1.0,
        num_grads=16,
        seconds=1.5,
        warmup=0.5,
        grid=[(1, 128), (32, 64)],
    ),
    "full": dict(
        max_train=None,
        max_eval=None,
        max_test=None,
        seq=64,
        dense_epochs=2.0,
        dense_lr=5e-5,
        prune_epochs=6.0,
        qat_epochs=2.0,
        num_grads=256,
        seconds=10.0,
        warmup=2.0,
        grid=[(1, 128), (1, 64), (32, 128), (32, 64)],
    ),
}


def dense_recipe(epochs: float, lr: float = 5e-5) -> str:
    return f"""
training_modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: {epochs}
  - !LearningRateFunctionModifier
    lr_func: linear
    init_lr: {lr}
    final_lr: 0.0
    start_epoch: 0.0
    end_epoch: {epochs}
"""


def prune_recipe(
    epochs: float, num_grads: int, keep_layers: int | None = None, qat_epochs: float = 0.0
) -> str:
    """oBERT pruning to 80 % over the first 60 % of ``epochs``, recovery after; optionally layer
    drop first and QAT for ``qat_epochs`` more (one recipe, one training run)."""
    prune_end = round(epochs * 0.6, 3)
    qat = (
        f"""
quantization_modifiers:
  - !OBertQuantizationModifier
    start_epoch: {epochs}
    freeze_observer_epoch: {round(epochs + qat_epochs * 0.5, 3)}
    weight_strategy: tensor
    quantize_matmuls: true
    quantize_embeddings: true
    exclude: [classifier]
"""
        if qat_epochs
        else ""
    )
    epochs = epochs + qat_epochs
    layer_drop = (
        f"""
structure_modifiers:
  - !LayerDropModifier
    keep: {keep_layers}
    strategy: uniform
    num_layers: 6
    start_epoch: 0.0
"""
        if keep_layers
        else ""
    )
    return f"""
training_modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: {epochs}
  - !LearningRateFunctionModifier
    lr_func: linear
    init_lr: 5.0e-5
    final_lr: 0.0
    start_epoch: 0.0
    end_epoch: {epochs}
{layer_drop}
pruning_modifiers:
  - !OBertPruningModifier
    params: {PRUNE_PARAMS}
    init_sparsity: 0.3
    final_sparsity: 0.8
    start_epoch: 0.0
    end_epoch: {prune_end}
    update_frequency: {round(prune_end / 3, 3)}
    inter_func: cubic
    global_sparsity: true
    leave_enabled: true
    num_grads: {num_grads}
    fisher_block_size: 50
    damp: 1.0e-7
    grad_sampler_kwargs:
      batch_size: 8
{qat}"""


def qat_recipe(epochs: float) -> str:
    return f"""
training_modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: {epochs}
  - !LearningRateFunctionModifier
    lr_func: linear
    init_lr: 2.0e-5
    final_lr: 0.0
    start_epoch: 0.0
    end_epoch: {epochs}
quantization_modifiers:
  - !OBertQuantizationModifier
    start_epoch: 0.0
    freeze_observer_epoch: {round(epochs * 0.5, 3)}
    weight_strategy: tensor
    quantize_matmuls: true
    quantize_embeddings: true
    exclude: [classifier]
"""


START_FILES = (
    "config.json",
    "pytorch_model.bin",
    "model.safetensors",
    "recipe.yaml",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def clean_start(model_dir: Path, out: Path) -> Path:
    """Copy only config, weights, tokenizer and recipe: a folder holding optimizer.pt makes
    SparseML's trainer resume the old optimizer and schedule (or crash after layer drop)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in START_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out / name)
    return out


def train(stage: str, start: Path, data: Path, recipe_text: str, work: Path, seq: int, console) -> Path:
    from obert_modifiers.demo import run_with_progress

    out = work / stage
    if (out / "pytorch_model.bin").is_file():
        console.print(f"[dim]{stage}: reusing {out}[/dim]")
        return out
    recipe = work / f"{stage}.yaml"
    recipe.write_text(recipe_text)
    script = Path(sys.executable).with_name("sparseml.transformers.train.text_classification")
    command = [
        str(script), "--model_name_or_path", str(clean_start(start, work / f"{stage}-start")),
        "--train_file", str(data / "train.csv"), "--validation_file", str(data / "validation.csv"),
        "--do_train", "--do_eval", "--max_seq_length", str(seq),
        "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "64",
        "--output_dir", str(out), "--overwrite_output_dir", "--report_to", "none",
        "--save_strategy", "no", "--save_safetensors", "False", "--seed", "42",
        "--dataloader_num_workers", "0", "--recipe", str(recipe),
    ]  # fmt: skip
    started = time.perf_counter()
    run_with_progress(command, work / f"{stage}.log", work, f"train {stage}", console)
    console.print(f"{stage}: trained in {time.perf_counter() - started:.0f} s")
    return out


def test_accuracy(deployment: Path, test_csv: Path, max_rows: int | None) -> float:
    """Accuracy of the exported model.onnx (ONNX Runtime) on the test split."""
    import csv

    import numpy as np
    import onnxruntime as ort
    from transformers import AutoTokenizer

    with open(test_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))[: max_rows or None]
    config = json.loads((deployment / "config.json").read_text())
    label2id = {v: int(k) for k, v in config["id2label"].items()}
    tokenizer = AutoTokenizer.from_pretrained(str(deployment))
    session = ort.InferenceSession(str(deployment / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    correct = 0
    for start in range(0, len(rows), 64):
        chunk = rows[start : start + 64]
        encoded = tokenizer(
            [r["sentence"] for r in chunk], padding=True, truncation=True, max_length=128, return_tensors="np"
        )
        logits = session.run(None, {n: encoded[n].astype(np.int64) for n in names})[0]
        correct += sum(int(p == label2id[r["label"]]) for p, r in zip(logits.argmax(-1), chunk, strict=True))
    return correct / len(rows)


def _result_from_manifest(folder: Path):
    from obert_modifiers.export import ExportResult

    manifest = json.loads((folder / "export.json").read_text())
    return ExportResult(
        path=folder,
        max_abs_diff=manifest["parity"]["max_abs_diff"],
        tolerance=manifest["parity"]["tolerance"],
        quantized=manifest["quantized"],
        sparsity=manifest["sparsity"]["overall"],
        onnx_bytes=(folder / "model.onnx").stat().st_size,
        num_layers=manifest["num_layers"],
    )


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
    parser.add_argument("--quick", action="store_true", help="tiny training slices and short timings")
    parser.add_argument(
        "--work",
        type=Path,
        default=ROOT / "runs" / "compound",
        help="training/export folder (reused between runs)",
    )
    parser.add_argument(
        "--cores", type=int, nargs="+", default=[2, 1], help="core counts to time (default: 2 and 1)"
    )
    parser.add_argument("--skip-layer-drop", action="store_true")
    parser.add_argument(
        "--reuse-exports", action="store_true", help="benchmark existing deployment folders, no re-export"
    )
    args = parser.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "NM_DISABLE_ANALYTICS"):
        os.environ.setdefault(key, "1")
    from rich.console import Console

    from obert_modifiers.bench import run_benchmark
    from obert_modifiers.data import prepare
    from obert_modifiers.export import export_deployment
    from obert_modifiers.models import minilm_l6_dir

    console = Console()
    mode = "quick" if args.quick else "full"
    cfg = SETTINGS[mode]
    work = args.work / mode
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not (data / "train.csv").is_file():
        prepare("rt", data, max_train=cfg["max_train"], max_eval=cfg["max_eval"])
    seq = cfg["seq"]

    started = time.perf_counter()
    dense = train(
        "dense-fp32",
        minilm_l6_dir(),
        data,
        dense_recipe(cfg["dense_epochs"], cfg["dense_lr"]),
        work,
        seq,
        console,
    )
    pruned = train(
        "pruned80-fp32", dense, data, prune_recipe(cfg["prune_epochs"], cfg["num_grads"]), work, seq, console
    )
    quant = train("pruned80-int8", pruned, data, qat_recipe(cfg["qat_epochs"]), work, seq, console)
    models = {"dense-fp32": dense, "pruned80-fp32": pruned, "pruned80-int8": quant}
    if not args.skip_layer_drop:
        # one run: drop to 3 layers, prune, then QAT (a staged recipe on top of a layer-dropped
        # model would have to re-apply the drop from its saved recipe)
        models["3layer-pruned80-int8"] = train(
            "3layer-pruned80-int8",
            dense,
            data,
            prune_recipe(cfg["prune_epochs"], cfg["num_grads"], keep_layers=3, qat_epochs=cfg["qat_epochs"]),
            work,
            seq,
            console,
        )
    train_seconds = time.perf_counter() - started

    summary, timing_rows = [], []
    for name, model_dir in models.items():
        target = work / "deployments" / name
        if args.reuse_exports and (target / "export.json").is_file():
            result = _result_from_manifest(target)
        else:
            result = export_deployment(model_dir, target, sequence_length=128, overwrite=True)
        accuracy = test_accuracy(result.path, data / "test.csv", cfg["max_test"])
        summary.append({
            "model": name, "accuracy": accuracy, "quantized": result.quantized,
            "sparsity": result.sparsity, "num_layers": result.num_layers,
            "onnx_mb": result.onnx_bytes / 1e6, "parity_max_abs_diff": result.max_abs_diff,
        })  # fmt: skip
        console.print(
            f"{name}: test accuracy {accuracy:.3f}, {result.onnx_bytes / 1e6:.1f} MB, "
            f"sparsity {result.sparsity:.1%}, parity {result.max_abs_diff:.2g}"
        )
        for cores, (batch, length) in [(c, g) for c in args.cores for g in cfg["grid"]]:
            for bench in run_benchmark(
                result.path,
                engines=("onnxruntime", "deepsparse"),
                batch_size=batch,
                sequence_length=length,
                num_cores=cores,
                seconds=cfg["seconds"],
                warmup_seconds=cfg["warmup"],
            ):
                timing_rows.append({**bench.to_dict(), "model": name, "onnx": bench.model})
                console.print(
                    f"  {bench.engine:12s} b{batch:<3d} s{length:<4d} c{cores} "
                    + (
                        f"median {bench.median_ms:8.2f} ms  {bench.items_per_second:8.1f} items/s  "
                        f"load {bench.load_average_1m:.2f}"
                        if bench.ok
                        else f"{bench.status}: {bench.error}"
                    )
                )

    def median(model: str, engine: str, batch: int, length: int, cores: int) -> float | None:
        for row in timing_rows:
            key = (row["model"], row["engine"], row["batch_size"], row["sequence_length"], row["num_cores"])
            if key == (model, engine, batch, length, cores) and row["status"] == "ok":
                return row["median_ms"]
        return None

    def ratio_of(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    target: dict[str, Any] = {"target": 5.0}
    int8_vs_fp32: dict[str, Any] = {}
    for cores in args.cores:
        target[f"pruned80_int8_deepsparse_vs_dense_fp32_ort_b1_s128_{cores}cores"] = ratio_of(
            median("dense-fp32", "onnxruntime", 1, 128, cores),
            median("pruned80-int8", "deepsparse", 1, 128, cores),
        )
        for engine in ("deepsparse", "onnxruntime"):
            int8_vs_fp32[f"{engine}_{cores}cores"] = ratio_of(
                median("pruned80-fp32", engine, 1, 128, cores), median("pruned80-int8", engine, 1, 128, cores)
            )

    payload: dict[str, Any] = {
        "mode": mode, "cores": args.cores, "train_seconds": train_seconds, "settings": cfg,
        "models": summary, "timings": timing_rows, "speedup_target": target,
        "pruned_int8_vs_pruned_fp32_b1_s128": int8_vs_fp32,
    }  # fmt: skip
    json_path = write_json("compound", payload)
    png_path = RESULTS_DIR / "compound.png"
    plot(timing_rows, png_path)

    headers = ["model", "layers", "sparsity", "INT8", "test acc", "ONNX MB"]
    grid_cols = []
    for cores in args.cores:
        for batch, length in cfg["grid"]:
            for engine, short in (("onnxruntime", "ORT"), ("deepsparse", "DS")):
                grid_cols.append((engine, batch, length, cores))
                headers.append(f"{short} b{batch} s{length} {cores}c ms")
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
        for engine, batch, length, cores in grid_cols:
            value = median(row["model"], engine, batch, length, cores)
            cells.append("n/a" if value is None else f"{value:.2f}")
        table_rows.append(cells)
    loads = [r["load_average_1m"] for r in timing_rows if r.get("load_average_1m") is not None]
    kind = (
        "smoke run: a few dozen training steps, accuracy not meaningful"
        if mode == "quick"
        else "full training"
    )
    load_text = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "n/a"
    command = "python benchmarks/compound.py" + (" --quick" if mode == "quick" else "")
    key = "pruned80_int8_deepsparse_vs_dense_fp32_ort_b1_s128_{}cores"
    measured = (
        ", ".join(
            f"**{target[key.format(c)]:.2f}x** on {c} core(s)" for c in args.cores if target[key.format(c)]
        )
        or "not measured (an engine failed)"
    ) + "."
    speedups = ", ".join(f"{e.replace('_', ' ')} {v:.2f}x" for e, v in int8_vs_fp32.items() if v) or "n/a"
    notes = [
        f"Mode `{mode}` ({kind}); cores {args.cores}; 1-minute load average during timings {load_text} "
        "on a 2-core machine shared with other jobs. With every core requested, both engines fight the "
        "other jobs: ORT slows about 2x and DeepSparse, whose threads spin-wait on each other, can slow "
        "10x or more; the 1-core columns are the stable ones here (see docs/benchmark.md).",
        "Target: pruned + INT8 on DeepSparse >= 5x faster than dense FP32 on ONNX Runtime at batch 1, "
        "seq 128: " + measured,
        f"INT8 vs FP32 of the same pruned model at b1 s128: {speedups}.",
        "ONNX Runtime gains nothing from sparsity: it keeps pruned weights as dense matrices (zeros are "
        "multiplied), so pruned80-fp32 runs at dense speed there; only DeepSparse skips zeros. ORT does "
        "gain from INT8 (MatMulInteger), less than DeepSparse (ratios above).",
        "INT8 parity: the integer graph differs from the fake-quantized PyTorch model by up to ~0.1 "
        "(SparseML folds biases into int32; see docs/export.md), within the documented INT8 tolerance.",
        (
            "Full run (`python benchmarks/compound.py`: whole training split, 10 epochs over 3 stages) not "
            "done: hours of training on this shared 2-core machine."
            if mode == "quick"
            else ""
        ),
        f"Source: `{command}`; JSON `{json_path.relative_to(ROOT)}`, plot `{png_path.relative_to(ROOT)}`.",
    ]
    markdown = "## Compound sparsification: MiniLM-L6 on Rotten Tomatoes\n\n" + markdown_table(
        headers, table_rows
    )
    markdown += "\n\n" + "\n".join(f"- {n}" for n in notes if n) + "\n\n![compound](results/compound.png)\n"
    update_results_section("compound", markdown)
    console.print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
