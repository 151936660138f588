"""``obert demo``: the main job on the bundled defaults, offline, in one command.

1. prepare a Rotten Tomatoes (or BBC) slice (``obert_modifiers.data``);
2. fine-tune and prune MiniLM-L6 with the packaged ``demo.yaml`` recipe (``recipes/demo.yaml`` in a
   checkout) through the STOCK ``sparseml.transformers.train.text_classification`` console script,
   in a subprocess (``obert_modifiers.runs.stock``);
3. read the validation accuracy and the test predictions the stock script wrote;
4. export a deployment folder (``obert_modifiers.export.export_deployment``) and score the test
   split again on the exported ONNX file with ONNX Runtime (``obert_modifiers.runs.evaluate``, the
   scorer behind the benchmark tables too);
5. benchmark DeepSparse and ONNX Runtime on it (``obert_modifiers.bench.run_benchmark``);
6. export and time the dense FP32 starting model the same way (the speed-up reference);
7. publish the model with a generated card to a hub started on loopback and pull it back by stub;
8. print one summary table and write ``summary.json``.

The screen shows the steps, the training progress and the table; what the libraries log (SparseML's
ONNX transforms, DeepSparse, transformers' warnings) goes to ``demo.log``, the stock script's output
to ``train.log``. Everything is built in a staging folder beside ``<out>`` and renamed to ``<out>``
at the end (``obert_modifiers.deployment.staged_dir``), so ``runs/demo`` always holds a finished run.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from obert_modifiers.errors import ObertError
from obert_modifiers.runs.stock import STOCK_SCRIPT, StockRunError, offline_env, run_logged, train_command

DEFAULT_RECIPE = Path(__file__).resolve().parent / "recipes" / "demo.yaml"  # package data

# Training budget (measured, see docs/cli.md): MiniLM-L6, seq 64, batch 16.
# pairs / pair_seconds: the paired ORT speed-up over the dense reference (bench.paired_speedups)
FULL = {"max_train": 2000, "max_eval": 300, "max_seq_length": 64, "bench_seconds": 5.0, "pairs": 20,
        "pair_seconds": 0.25}  # fmt: skip
QUICK = {"max_train": 64, "max_eval": 32, "max_seq_length": 64, "bench_seconds": 0.5, "pairs": 4,
         "pair_seconds": 0.05}  # fmt: skip
EXPORT_SEQUENCE_LENGTH = 128
ENGINES = ("deepsparse", "onnxruntime")


class DemoError(ObertError, RuntimeError):
    """A demo step failed; the message names the step and where its log is."""


@dataclass
class DemoRun:
    """What the steps share: the settings, the staging folder and each step's results."""

    console: Any
    work: Path
    dataset: str
    recipe: Path
    quick: bool
    settings: dict[str, Any]
    engines: tuple[str, ...]
    results: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    steps: int = 7
    index: int = 0

    def rule(self, title: str) -> None:
        self.index += 1
        self.console.rule(f"[bold]{self.index}/{self.steps} {title}")


def _step_data(run: DemoRun) -> None:
    from obert_modifiers import data

    run.rule(f"data: {run.dataset}")
    info = data.prepare(
        run.dataset, run.work / "data", max_train=run.settings["max_train"], max_eval=run.settings["max_eval"]
    )
    run.results["data"] = info
    run.console.print(
        f"train {info['counts']['train']}, validation {info['counts']['validation']}, "
        f"test {info['counts']['test']} ({', '.join(info['labels'])}); "
        f"majority-class test accuracy {info['majority_class_test_accuracy']:.3f}"
    )


def _step_train(run: DemoRun) -> None:
    """Fine-tune + compress with the stock command."""
    from obert_modifiers import models

    labels = run.results["data"]["labels"]
    if run.quick:
        base = models.save_tiny_bert(run.work / "base-model", num_labels=len(labels), labels=labels)
        run.results["model_name"] = "tiny random BERT (4 layers, hidden 32)"
    else:
        base = models.minilm_l6_dir()
        run.results["model_name"] = "MiniLM-L6 (all-MiniLM-L6-v2, 22.7 M parameters)"
    run.results["base_model"] = Path(base)
    run.rule(f"fine-tune + compress: {run.results['model_name']}")
    model_dir = run.work / "model"
    command = train_command(
        base, run.work / "data", model_dir, run.recipe, seq=run.settings["max_seq_length"], batch=16,
        seed=42, logging_steps=20, evaluate=True, predict=True, final_bin_only=True,
    )  # fmt: skip
    run.console.print(f"[dim]{STOCK_SCRIPT} --recipe {run.recipe} ... (log: train.log in the output folder)")
    cache = run.work / "hf-datasets-cache"  # fresh: stale Arrow caches mislead
    _run_with_progress_bar(run, command, offline_env(HF_DATASETS_CACHE=str(cache)))
    # The optimizer/scheduler state (2x the weights) is only needed to resume; without it the folder
    # is also a valid starting point for `obert train` (which refuses folders that hold it).
    for name in ("optimizer.pt", "scheduler.pt"):
        (model_dir / name).unlink(missing_ok=True)
    shutil.rmtree(cache, ignore_errors=True)
    run.results["model_dir"] = model_dir


def _run_with_progress_bar(run: DemoRun, command: list[str], env: dict[str, str]) -> None:
    """Run the stock command (output in ``train.log``), its trainer's tqdm counter as a rich bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=run.console,
    ) as progress:  # fmt: skip
        task = progress.add_task("training", total=None)

        def show(done: int, total: int, bar: int) -> None:
            label = "training" if bar == 0 else f"training: evaluation {bar}"
            progress.update(task, description=label, completed=done, total=total)

        try:
            run_logged(command, run.work / "train.log", show, cwd=run.work, env=env, what="training")
        except StockRunError as error:
            raise DemoError(str(error)) from None


def _step_evaluate(run: DemoRun) -> None:
    run.rule("evaluate")
    model_dir = run.results["model_dir"]
    results = _read_json(model_dir / "all_results.json") or _read_json(model_dir / "eval_results.json")
    accuracy, rows = test_accuracy_from_predictions(model_dir, run.work / "data" / "test.csv")
    sparsity = weight_sparsity(model_dir)
    run.results.update(validation_accuracy=results.get("eval_accuracy"), test_accuracy=accuracy)
    run.results["sparsity"] = sparsity
    run.console.print(
        f"validation accuracy {results.get('eval_accuracy')}, test accuracy {accuracy:.4f} on {rows} rows, "
        f"encoder sparsity {sparsity['encoder_linear']:.3f}"
    )


def _step_export(run: DemoRun) -> None:
    from rich.progress import Progress

    from obert_modifiers.deployment import DeploymentManifest
    from obert_modifiers.runs.evaluate import onnx_accuracy

    run.rule("export")
    export = _export(run.results["model_dir"], run.work / "deployment")
    onnx_path = export.path / "model.onnx"
    with Progress(console=run.console) as progress:
        task = progress.add_task("ONNX Runtime on the test split", total=None)
        accuracy = onnx_accuracy(
            export.path, run.work / "data" / "test.csv", sequence_length=EXPORT_SEQUENCE_LENGTH,
            on_batch=lambda done, total: progress.update(task, completed=done, total=total),
        )  # fmt: skip
    run.results.update(export=export, onnx_accuracy=accuracy, onnx_gzip=gzip_bytes(onnx_path))
    structure = DeploymentManifest.read(export.path).structure
    run.results["structure"] = structure.model_dump() if structure else None
    run.console.print(
        f"{export.path}: model.onnx {_mb(export.onnx_bytes)} (gzip {_mb(run.results['onnx_gzip'])}), "
        f"ONNX-vs-PyTorch max |diff| {export.max_abs_diff:.2e}, ONNX Runtime test accuracy {accuracy:.4f}"
    )


def _step_benchmark(run: DemoRun) -> None:
    run.rule("benchmark")
    run.results["bench"] = _benchmark(run, run.results["export"].path)


def _step_dense_reference(run: DemoRun) -> None:
    """The dense FP32 starting model, exported and timed the same way: the reference for speed-ups.
    The starting checkpoint may be a bare encoder (MiniLM-L6 is a BertModel): it gets the trained
    model's classification head shape, so both graphs do the same work."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run.rule("dense FP32 reference (the starting model, untrained head: latency only)")
    base, dense_dir = run.results["base_model"], run.work / "dense-deployment-model"
    trained = json.loads((run.results["model_dir"] / "config.json").read_text())
    model = AutoModelForSequenceClassification.from_pretrained(
        base, id2label=trained["id2label"], label2id=trained["label2id"]
    )
    model.save_pretrained(dense_dir, safe_serialization=False)
    AutoTokenizer.from_pretrained(base).save_pretrained(dense_dir)
    dense_deployment = _export(dense_dir, run.work / "dense-deployment").path
    run.results["dense_bench"] = _benchmark(run, dense_deployment)
    if "onnxruntime" in run.engines:
        run.results["paired"] = _paired(run, dense_deployment, run.results["export"].path)


def _paired(run: DemoRun, dense: Path, deployment: Path) -> dict:
    """The model's ORT speed-up over the dense reference, the two timed in alternating short blocks
    (the separate timings above run minutes apart, and a slow spell of the machine moves their ratio)."""
    from obert_modifiers.bench import paired_speedups

    run.console.print(
        f"paired ORT speed-up: {run.settings['pairs']} pairs of {run.settings['pair_seconds']:g} s blocks"
    )
    try:
        paired = paired_speedups(
            dense, {"model": deployment}, batch_size=1, sequence_length=EXPORT_SEQUENCE_LENGTH,
            pairs=run.settings["pairs"], block_seconds=run.settings["pair_seconds"],
            warmup_seconds=min(0.5, run.settings["pair_seconds"]),
        )["model"].to_dict()  # fmt: skip
    except Exception as error:  # noqa: BLE001
        raise DemoError(f"paired timing of {deployment} against {dense} failed: {error}") from error
    # relative to the output folder (the run is built in a staging folder, then renamed)
    for side in ("baseline", "candidate"):
        paired[side] = str(Path(paired[side]).relative_to(run.work))
    return paired


def _step_hub(run: DemoRun) -> None:
    """Publish to a hub on loopback with a generated model card, and pull it back by stub."""
    from obert_modifiers import zoo

    run.rule("publish to a local hub and pull back by stub")
    export = run.results["export"]
    structure = run.results.get("structure") or {}
    stub = demo_stub(
        run.dataset, run.results["sparsity"]["encoder_linear"], export.quantized, run.quick,
        speedup=structure.get("target_speedup"),
    )  # fmt: skip
    try:
        hub = zoo.roundtrip(
            export.path, stub, run.work / "hub", training=run.results["model_dir"], progress=False,
            metrics={"accuracy": round(float(run.results["test_accuracy"]), 4)}, latency=run.results["bench"],
        )  # fmt: skip
    except Exception as error:  # noqa: BLE001 - reported with the step and the stub
        raise DemoError(f"hub round trip of {stub} (hub under {run.work / 'hub'}) failed: {error}") from error
    run.results["hub"] = hub
    run.console.print(f"published and pulled back {hub['stub']} ({hub['files']} files, sha256 checked)")


STEPS: tuple[tuple[str, Callable[[DemoRun], None]], ...] = (
    ("data", _step_data),
    ("train", _step_train),
    ("evaluate", _step_evaluate),
    ("export", _step_export),
    ("benchmark", _step_benchmark),
    ("dense_reference", _step_dense_reference),
    ("hub", _step_hub),
)


def run_demo(
    out_dir: str | os.PathLike = "runs/demo",
    dataset: str = "rt",
    max_train: int | None = None,
    recipe: str | os.PathLike | None = None,
    quick: bool = False,
    bench_seconds: float | None = None,
    engines: Sequence[str] = ENGINES,
    console: Any = None,
) -> dict:
    """Run the demo end to end; returns the summary (also written to ``<out_dir>/summary.json``)."""
    from obert_modifiers.deployment import staged_dir
    from obert_modifiers.runs.logs import third_party_logs

    settings = {**(QUICK if quick else FULL)}
    if max_train:
        settings["max_train"] = max_train
    if bench_seconds is not None:
        settings["bench_seconds"] = bench_seconds
    if dataset not in ("rt", "bbc"):
        raise DemoError(f"--dataset {dataset!r}: the demo runs on 'rt' or 'bbc'")
    recipe_path = Path(recipe) if recipe else DEFAULT_RECIPE
    if not recipe_path.is_file():
        raise DemoError(f"--recipe {recipe_path}: no such file")
    out_dir = Path(out_dir).resolve()
    started = time.perf_counter()
    with staged_dir(out_dir, overwrite=True) as work:
        run = DemoRun(_console(console), work, dataset, recipe_path, quick, settings, tuple(engines))
        try:
            with third_party_logs(work / "demo.log"):
                for name, step in STEPS:
                    t0 = time.perf_counter()
                    step(run)
                    run.timings[name] = round(time.perf_counter() - t0, 1)
        except DemoError as error:
            raise DemoError(_keep_logs(str(error), work, out_dir)) from None
        run.timings["total"] = round(time.perf_counter() - started, 1)
        summary = _summary(run)
        (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print_summary(summary, out_dir, run.console)
    return summary


def _keep_logs(message: str, work: Path, out_dir: Path) -> str:
    """A failed run's staging folder is removed (nothing half-built is left looking complete), but its
    logs are what the error points to: they move to ``<out>.failed-logs/`` (replacing an older one)
    and the message names them there."""
    logs = [p for p in (work / "train.log", work / "demo.log") if p.is_file()]
    if not logs:
        return message
    kept = out_dir.parent / f"{out_dir.name}.failed-logs"
    shutil.rmtree(kept, ignore_errors=True)
    kept.mkdir(parents=True, exist_ok=True)
    for path in logs:
        shutil.move(str(path), kept / path.name)
    text = message.replace(str(work), str(kept))
    return text if str(kept) in text else f"{text} (logs: {kept})"


def _console(console: Any) -> Any:
    from rich.console import Console

    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or captured: keep the summary table readable
            console = Console(width=max(console.width, 120))
    return console


def _export(model_dir: Path, out: Path):
    from obert_modifiers.export import export_deployment

    try:
        return export_deployment(
            model_dir, out, task="text-classification", sequence_length=EXPORT_SEQUENCE_LENGTH, overwrite=True
        )
    except Exception as error:  # noqa: BLE001 - reported with the step and the folders
        raise DemoError(f"export of {model_dir} to {out} failed: {error}") from error


def _benchmark(run: DemoRun, deployment: Path) -> list:
    from obert_modifiers.bench import run_benchmark

    seconds = run.settings["bench_seconds"]
    try:
        return run_benchmark(
            deployment, engines=run.engines, batch_size=1, sequence_length=EXPORT_SEQUENCE_LENGTH,
            seconds=seconds, warmup_seconds=min(1.0, seconds),
        )  # fmt: skip
    except Exception as error:  # noqa: BLE001
        raise DemoError(f"benchmark of {deployment} failed: {error}") from error


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def test_accuracy_from_predictions(model_dir: Path, test_csv: Path) -> tuple[float, int]:
    """Accuracy of the stock script's ``predict_results_*.txt`` (label names) against ``test.csv``."""
    from obert_modifiers.runs.evaluate import read_split

    files = sorted(model_dir.glob("predict_results_*.txt"))
    if not files:
        raise DemoError(f"the stock script wrote no predict_results_*.txt in {model_dir}")
    predictions = [line.split("\t", 1)[1] for line in files[0].read_text().splitlines()[1:]]
    _, labels = read_split(test_csv)
    if len(predictions) != len(labels):
        raise DemoError(f"{files[0]}: {len(predictions)} predictions for {len(labels)} test rows")
    correct = sum(p == t for p, t in zip(predictions, labels, strict=True))
    return correct / len(labels), len(labels)


def weight_sparsity(model_dir: Path, pattern: str = r"bert\.encoder\.layer\.\d+\..*\.weight$") -> dict:
    """Fraction of zeros in the encoder's 2-D weights of a saved model, overall and in all weights."""
    import torch

    state = torch.load(model_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    zeros = total = all_zeros = all_total = 0
    regex = re.compile(pattern)
    for name, tensor in state.items():
        if not torch.is_floating_point(tensor):
            continue
        n, z = tensor.numel(), int((tensor == 0).sum())
        all_total += n
        all_zeros += z
        if tensor.dim() == 2 and regex.search(name):
            total += n
            zeros += z
    return {
        "encoder_linear": zeros / total if total else 0.0,
        "all_parameters": all_zeros / all_total if all_total else 0.0,
    }


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def gzip_bytes(path: Path) -> int:
    """Size of ``path`` gzip-compressed (level 6): zeros compress, so this shows what sparsity saves
    in storage and download even for an fp32 file."""
    with open(path, "rb") as handle:
        return len(gzip.compress(handle.read(), compresslevel=6))


def demo_stub(
    dataset: str, sparsity: float, quantized: bool, quick: bool, speedup: float | None = None
) -> str:
    """The SparseZoo-style stub the demo publishes under, e.g.
    ``zoo:nlp/text_classification/minilm-l6/pytorch/huggingface/rotten_tomatoes/structured3x_quant-none``
    (structured pruning to a 3x target, INT8) or ``.../pruned80_quant-none`` (80 % sparse, INT8)."""
    architecture = "tiny_bert-test" if quick else "minilm-l6"
    data = {"rt": "rotten_tomatoes", "bbc": "bbc_news"}[dataset]
    percent = int(round(sparsity * 100))
    parts = [f"structured{speedup:g}x"] if speedup else []
    parts += [f"pruned{percent}"] if percent else ([] if parts else ["base"])
    tag = "_".join(parts) + ("_quant" if quantized else "")
    return f"zoo:nlp/text_classification/{architecture}/pytorch/huggingface/{data}/{tag}-none"


def _summary(run: DemoRun) -> dict:
    results, info, export = run.results, run.results["data"], run.results["export"]
    base = results["base_model"]
    source_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors")) or sum(
        p.stat().st_size for p in base.glob("pytorch_model*.bin")
    )
    return {
        "format_version": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": run.quick,
        "model": results["model_name"],
        "dataset": {
            k: info[k] for k in ("dataset", "title", "counts", "labels", "majority_class_test_accuracy")
        },
        "recipe": str(run.recipe),
        "max_seq_length": run.settings["max_seq_length"],
        "accuracy": {
            "validation": results["validation_accuracy"],
            "test_pytorch": results["test_accuracy"],
            "test_onnx": results["onnx_accuracy"],
            "majority_class": info["majority_class_test_accuracy"],
        },
        "sparsity": {**results["sparsity"], "export_overall": float(export.sparsity)},
        # structured pruning (!ZipLMPruningModifier): per-layer heads / FFN neurons kept and the
        # latency table's prediction, as export.json records them (None: not shrunk)
        "structure": results.get("structure"),
        "num_parameters": export.num_parameters,
        "quantized": bool(export.quantized),
        "size_bytes": {
            "base_model_weights": source_bytes,
            "trained_pytorch_model": (results["model_dir"] / "pytorch_model.bin").stat().st_size,
            "onnx": export.onnx_bytes,
            "onnx_gzip": results["onnx_gzip"],
            "deployment_folder": folder_bytes(export.path),
        },
        "export": {
            "max_abs_diff": export.max_abs_diff,
            "tolerance": export.tolerance,
            "sequence_length": EXPORT_SEQUENCE_LENGTH,
        },
        "benchmark": [r.to_dict() for r in results["bench"]],
        "benchmark_dense_reference": [r.to_dict() for r in results["dense_bench"]],
        # the ORT speed-up over the dense reference from alternating blocks (None without ORT)
        "speedup_paired_onnxruntime": results.get("paired"),
        # relative to the output folder (the run is built in a staging folder, then renamed)
        "hub": {
            "stub": results["hub"]["stub"],
            "files": results["hub"]["files"],
            "pulled": str(Path(results["hub"]["pulled"]).relative_to(run.work)),
        },
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "timings_s": run.timings,
        "paths": {
            "model": "model", "deployment": "deployment", "data": "data", "train_log": "train.log",
            "log": "demo.log",
        },
    }  # fmt: skip


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def structure_rows(structure: dict, num_parameters: int | None) -> list[tuple[str, str, str]]:
    """Summary rows of a structurally pruned model: what it kept per layer and what the latency table
    predicted (the measured figures are the latency rows)."""
    heads, ffn = structure["heads"], structure["ffn"]
    rows = [
        (
            "structure: heads kept",
            f"{sum(heads)}",
            "per layer "
            + " ".join(map(str, heads))
            + (f"; {num_parameters / 1e6:.1f} M parameters" if num_parameters else ""),
        ),
        ("structure: FFN neurons kept", f"{sum(ffn)}", "per layer " + " ".join(map(str, ffn))),
    ]
    if structure.get("predicted_speedup"):
        key = structure.get("latency_key") or {}
        setting = ", ".join(
            f"{k.replace('_', ' ')} {key[k]}"
            for k in ("runtime", "precision", "threads", "batch_size", "sequence_length")
            if k in key
        )
        rows.append(
            (
                "predicted speed-up",
                f"{structure['predicted_speedup']:.2f}x",
                f"target {structure.get('target_speedup', 0):g}x over the dense model at the same precision; "
                f"{structure.get('predicted_latency', 0):.2f} vs {structure.get('dense_latency', 0):.2f} "
                f"{structure.get('unit') or ''} in the latency table ({setting})",
            )
        )
    return rows


def print_summary(summary: dict, out_dir: Path, console: Any) -> None:
    from rich.table import Table

    acc = summary["accuracy"]
    size = summary["size_bytes"]
    table = Table(title=f"obert demo: {summary['model']} on {summary['dataset']['title']}", show_lines=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    table.add_column("note")
    table.add_row(
        "test accuracy (PyTorch)",
        f"{acc['test_pytorch']:.4f}",
        f"{summary['dataset']['counts']['test']} held-out rows; majority class {acc['majority_class']:.3f}",
    )
    table.add_row(
        "test accuracy (exported ONNX, ORT)", f"{acc['test_onnx']:.4f}", "same rows, deployment folder"
    )
    if acc.get("validation") is not None:
        table.add_row("validation accuracy", f"{acc['validation']:.4f}", "stock script's --do_eval")
    sparsity, structure = summary["sparsity"], summary.get("structure")
    if structure:
        for name, value, note in structure_rows(structure, summary.get("num_parameters")):
            table.add_row(name, value, note)
    if sparsity["encoder_linear"] > 0 or not structure:
        table.add_row(
            "sparsity, encoder linear weights",
            f"{sparsity['encoder_linear']:.1%}",
            f"all parameters {sparsity['all_parameters']:.1%}",
        )
    table.add_row("quantized (INT8)", "yes" if summary["quantized"] else "no", "")
    table.add_row("size: model.onnx", _mb(size["onnx"]), f"gzip {_mb(size['onnx_gzip'])}")
    table.add_row("size: base model weights", _mb(size["base_model_weights"]), "before training")
    dense = {r.get("engine"): r for r in summary.get("benchmark_dense_reference", [])}
    dense_ort = dense.get("onnxruntime", {}).get("median_ms")
    for row in summary["benchmark"]:
        engine = row.get("engine", "?")
        if row.get("median_ms") is None:
            table.add_row(f"latency: {engine}", "n/a", str(row.get("error") or "not available"))
            continue
        reference = dense.get(engine, {}).get("median_ms")
        versus = f"dense FP32 {reference:.2f} ms ({reference / row['median_ms']:.1f}x)" if reference else ""
        if dense_ort:
            versus += f"; {dense_ort / row['median_ms']:.1f}x vs dense FP32 on ORT"
        table.add_row(
            f"latency: {engine}",
            f"{row['median_ms']:.2f} ms",
            f"median, p90 {row.get('p90_ms', float('nan')):.2f} ms, batch {row.get('batch_size')}, "
            f"seq {row.get('sequence_length')}; {versus}",
        )
    paired = summary.get("speedup_paired_onnxruntime")
    if paired:
        low, high = paired["quartiles"]
        table.add_row(
            "measured speed-up (ORT, paired)",
            f"{paired['median']:.2f}x",
            f"dense FP32 / this model, median of {len(paired['ratios'])} back-to-back block pairs "
            f"(quartiles {low:.2f}-{high:.2f}x)",
        )
    if summary.get("hub"):
        table.add_row("hub round trip", "ok", summary["hub"]["stub"])
    table.add_row(
        "wall time",
        f"{summary['timings_s'].get('total', 0):.0f} s",
        ", ".join(f"{k} {v:.0f} s" for k, v in summary["timings_s"].items() if k != "total"),
    )
    console.print(table)
    load = summary.get("load_average_1m")
    if load is not None and load > 1.0:
        console.print(f"[yellow]load average {load:.1f} during the run: latencies are from a busy machine")
    console.print(f"outputs: {out_dir} (summary.json, model/, deployment/, data/, train.log, demo.log)")
