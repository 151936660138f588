"""``obert demo``: the main job on the bundled defaults, offline, in one command.

1. prepare a Rotten Tomatoes (or BBC) slice (``obert_modifiers.data``);
2. fine-tune and prune MiniLM-L6 with ``recipes/demo.yaml`` through the STOCK
   ``sparseml.transformers.train.text_classification`` console script, in a subprocess;
3. read the validation accuracy and the test predictions the stock script wrote;
4. export a deployment folder (``obert_modifiers.export.export_deployment``) and score the test
   split again on the exported ONNX file with ONNX Runtime;
5. benchmark DeepSparse and ONNX Runtime on it (``obert_modifiers.bench.run_benchmark``);
6. export and time the dense FP32 starting model the same way (the speed-up reference);
7. publish the model with a generated card to a hub started on loopback and pull it back by stub;
8. print one summary table and write ``summary.json``.

Everything is built in ``<out>.partial`` and renamed to ``<out>`` at the end, so a folder named
``runs/demo`` always holds a finished run.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from obert_modifiers.errors import ObertError

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RECIPE = ROOT / "recipes" / "demo.yaml"
STOCK_SCRIPT = "sparseml.transformers.train.text_classification"

# Training budget (measured, see docs/cli.md): MiniLM-L6, seq 64, batch 16.
FULL = {"max_train": 2000, "max_eval": 300, "max_seq_length": 64, "bench_seconds": 5.0}
QUICK = {"max_train": 64, "max_eval": 32, "max_seq_length": 64, "bench_seconds": 0.5}
EXPORT_SEQUENCE_LENGTH = 128
ENGINES = ("deepsparse", "onnxruntime")
PROGRESS_PATTERN = re.compile(r"(\d+)/(\d+) \[")


class DemoError(ObertError, RuntimeError):
    """A demo step failed; the message names the step and where its log is."""


def stock_script() -> list[str]:
    """The stock console script next to this interpreter (the same venv)."""
    script = Path(sys.executable).parent / STOCK_SCRIPT
    if script.exists():
        return [str(script)]
    # installed without console scripts: the same entry point through the interpreter
    return [
        sys.executable,
        "-c",
        "import sys; from sparseml.transformers.text_classification import main; sys.exit(main())",
    ]


def train_command(
    model_dir: Path,
    data_dir: Path,
    output_dir: Path,
    recipe: Path,
    max_seq_length: int,
    seed: int = 42,
) -> list[str]:
    return [
        *stock_script(),
        "--model_name_or_path", str(model_dir),
        "--train_file", str(data_dir / "train.csv"),
        "--validation_file", str(data_dir / "validation.csv"),
        "--test_file", str(data_dir / "test.csv"),
        "--do_train", "--do_eval", "--do_predict",
        "--max_seq_length", str(max_seq_length),
        "--per_device_train_batch_size", "16",
        "--per_device_eval_batch_size", "64",
        "--output_dir", str(output_dir),
        "--overwrite_output_dir",
        "--report_to", "none",
        "--save_strategy", "no",
        "--save_safetensors", "False",
        "--logging_steps", "20",
        "--dataloader_num_workers", "0",
        "--seed", str(seed),
        "--recipe", str(recipe),
    ]  # fmt: skip


def run_with_progress(command: Sequence[str], log_path: Path, cwd: Path, description: str, console) -> None:
    """Run ``command``, log all its output to ``log_path`` and show its tqdm step counter as a rich
    progress bar. Raises :class:`DemoError` with the log's tail when it fails."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    env = dict(os.environ)
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "NM_DISABLE_ANALYTICS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        env.setdefault(key, value)
    env["PYTHONUNBUFFERED"] = "1"  # progress and log lines as they happen
    env["HF_DATASETS_CACHE"] = str(cwd / "hf-datasets-cache")  # fresh: stale Arrow caches mislead
    with (
        open(log_path, "wb") as log,
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as progress,
    ):
        task = progress.add_task(description, total=None)
        totals: list[int] = []  # one per tqdm bar seen: training steps first, then evaluation batches
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        buffer = b""
        assert process.stdout is not None
        while True:
            chunk = (
                process.stdout.read1(4096) if hasattr(process.stdout, "read1") else process.stdout.read(4096)
            )
            if not chunk:
                break
            log.write(chunk)
            log.flush()  # `tail -f train.log` follows the run
            buffer = (buffer + chunk)[-4096:]
            matches = PROGRESS_PATTERN.findall(buffer.decode("utf-8", "replace"))
            if matches:
                done, total = map(int, matches[-1])
                if not totals or (total != totals[-1] and done <= 1):
                    totals.append(total)
                    label = (
                        description if len(totals) == 1 else f"{description}: evaluation {len(totals) - 1}"
                    )
                    progress.update(task, description=label)
                progress.update(task, completed=done, total=total)
        code = process.wait()
    if code != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        raise DemoError(f"{description} failed (exit {code}); log: {log_path}\n" + "\n".join(tail))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def test_accuracy_from_predictions(model_dir: Path, test_csv: Path) -> tuple[float, int]:
    """Accuracy of the stock script's ``predict_results_*.txt`` (label names) against ``test.csv``."""
    from obert_modifiers.data import read_csv

    files = sorted(model_dir.glob("predict_results_*.txt"))
    if not files:
        raise DemoError(f"the stock script wrote no predict_results_*.txt in {model_dir}")
    predictions = [line.split("\t", 1)[1] for line in files[0].read_text().splitlines()[1:]]
    labels = [label for _, label in read_csv(test_csv)]
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


def onnx_test_accuracy(
    deployment: Path, test_csv: Path, limit: int | None = None, console: Any = None
) -> tuple[float, int]:
    """Accuracy of the exported ``model.onnx`` on ``test.csv`` with ONNX Runtime (the deployment's
    own tokenizer and ``config.json`` labels): proves the exported file is the trained model."""
    import numpy as np
    import onnxruntime as ort
    from transformers import AutoTokenizer

    from obert_modifiers.data import read_csv

    rows = read_csv(test_csv)[:limit] if limit else read_csv(test_csv)
    config = _read_json(deployment / "config.json")
    id2label = {int(k): v for k, v in config.get("id2label", {}).items()}
    tokenizer = AutoTokenizer.from_pretrained(deployment)
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, int(os.environ.get("OMP_NUM_THREADS", "0") or 0))
    session = ort.InferenceSession(
        str(deployment / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    inputs = session.get_inputs()
    shape = inputs[0].shape
    batch = shape[0] if isinstance(shape[0], int) else 32
    length = shape[1] if isinstance(shape[1], int) else EXPORT_SEQUENCE_LENGTH
    correct = 0
    starts = range(0, len(rows), batch)
    if console is not None:
        from rich.progress import track

        starts = track(starts, description="ONNX Runtime on the test split", console=console)
    for start in starts:
        chunk = rows[start : start + batch]
        texts = [text for text, _ in chunk]
        pad = batch - len(texts) if isinstance(shape[0], int) else 0
        encoded = tokenizer(
            texts + [""] * pad, padding="max_length", truncation=True, max_length=length, return_tensors="np"
        )
        feed = {i.name: encoded[i.name].astype(np.int64) for i in inputs if i.name in encoded}
        for i in inputs:  # token_type_ids etc. that the tokenizer did not give
            feed.setdefault(i.name, np.zeros((len(texts) + pad, length), dtype=np.int64))
        logits = session.run(None, feed)[0][: len(texts)]
        for (_, label), index in zip(chunk, logits.argmax(-1), strict=True):
            correct += id2label.get(int(index)) == label
    return correct / len(rows), len(rows)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def gzip_bytes(path: Path) -> int:
    """Size of ``path`` gzip-compressed (level 6): zeros compress, so this shows what sparsity saves
    in storage and download even for an fp32 file."""
    with open(path, "rb") as handle:
        return len(gzip.compress(handle.read(), compresslevel=6))


def _replace_dir(staging: Path, out_dir: Path) -> None:
    if out_dir.exists():
        trash = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.rename(out_dir, trash)
        os.rename(staging, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(staging, out_dir)


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
    from rich.console import Console

    from obert_modifiers import data as data_module
    from obert_modifiers import models

    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or captured: keep the summary table readable
            console = Console(width=max(console.width, 120))
    settings = dict(QUICK if quick else FULL)
    if max_train:
        settings["max_train"] = max_train
    if bench_seconds is not None:
        settings["bench_seconds"] = bench_seconds
    if dataset not in ("rt", "bbc"):
        raise DemoError(f"--dataset {dataset!r}: the demo runs on 'rt' or 'bbc'")
    recipe_path = Path(recipe) if recipe else DEFAULT_RECIPE
    if not recipe_path.is_file():
        raise DemoError(f"recipe {recipe_path} not found")

    out_dir = Path(out_dir).resolve()
    work = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def step(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)

    # 1. data
    t0 = time.perf_counter()
    console.rule(f"[bold]1/7 data: {dataset}")
    data_dir = work / "data"
    info = data_module.prepare(
        dataset, data_dir, max_train=settings["max_train"], max_eval=settings["max_eval"]
    )
    console.print(
        f"train {info['counts']['train']}, validation {info['counts']['validation']}, "
        f"test {info['counts']['test']} ({', '.join(info['labels'])}); "
        f"majority-class test accuracy {info['majority_class_test_accuracy']:.3f}"
    )
    step("data", t0)

    # 2. train + prune with the stock command
    t0 = time.perf_counter()
    if quick:
        base_model = models.save_tiny_bert(
            work / "base-model", num_labels=len(info["labels"]), labels=info["labels"]
        )
        model_name = "tiny random BERT (4 layers, hidden 32)"
    else:
        base_model = models.minilm_l6_dir()
        model_name = "MiniLM-L6 (all-MiniLM-L6-v2, 22.7 M parameters)"
    console.rule(f"[bold]2/7 fine-tune + compress: {model_name}")
    model_dir = work / "model"
    command = train_command(base_model, data_dir, model_dir, recipe_path, settings["max_seq_length"])
    console.print(f"[dim]{STOCK_SCRIPT} --recipe {recipe_path} ... (log: {work.name}/train.log)")
    run_with_progress(command, work / "train.log", work, "training", console)
    # The optimizer/scheduler state (2x the weights) is only needed to resume; without it the folder
    # is also a valid starting point for `obert train` (which refuses folders that hold it).
    for name in ("optimizer.pt", "scheduler.pt"):
        (model_dir / name).unlink(missing_ok=True)
    shutil.rmtree(work / "hf-datasets-cache", ignore_errors=True)
    step("train", t0)

    # 3. evaluate
    t0 = time.perf_counter()
    console.rule("[bold]3/7 evaluate")
    results = _read_json(model_dir / "all_results.json") or _read_json(model_dir / "eval_results.json")
    validation_accuracy = results.get("eval_accuracy")
    test_accuracy, test_rows = test_accuracy_from_predictions(model_dir, data_dir / "test.csv")
    sparsity = weight_sparsity(model_dir)
    console.print(
        f"validation accuracy {validation_accuracy}, test accuracy {test_accuracy:.4f} on {test_rows} rows, "
        f"encoder sparsity {sparsity['encoder_linear']:.3f}"
    )
    step("evaluate", t0)

    # 4. export
    t0 = time.perf_counter()
    console.rule("[bold]4/7 export")
    from obert_modifiers.export import export_deployment

    deployment = work / "deployment"
    try:
        export = export_deployment(
            model_dir,
            deployment,
            task="text-classification",
            sequence_length=EXPORT_SEQUENCE_LENGTH,
            overwrite=True,
        )
    except Exception as error:  # noqa: BLE001 - reported with the step and the folders
        raise DemoError(f"export of {model_dir} to {deployment} failed: {error}") from error
    deployment = Path(getattr(export, "path", deployment))
    onnx_path = deployment / "model.onnx"
    onnx_accuracy, _ = onnx_test_accuracy(deployment, data_dir / "test.csv", console=console)
    onnx_size = onnx_path.stat().st_size
    onnx_gzip = gzip_bytes(onnx_path)
    console.print(
        f"{deployment}: model.onnx {onnx_size / 1e6:.1f} MB (gzip {onnx_gzip / 1e6:.1f} MB), "
        f"ONNX-vs-PyTorch max |diff| {getattr(export, 'max_abs_diff', float('nan')):.2e}, "
        f"ONNX Runtime test accuracy {onnx_accuracy:.4f}"
    )
    step("export", t0)

    # 5. benchmark
    t0 = time.perf_counter()
    console.rule("[bold]5/7 benchmark")
    from obert_modifiers.bench import run_benchmark

    try:
        bench = run_benchmark(
            deployment,
            engines=tuple(engines),
            batch_size=1,
            sequence_length=EXPORT_SEQUENCE_LENGTH,
            seconds=settings["bench_seconds"],
            warmup_seconds=min(1.0, settings["bench_seconds"]),
        )
    except Exception as error:  # noqa: BLE001
        raise DemoError(f"benchmark of {deployment} failed: {error}") from error
    step("benchmark", t0)

    # 6. the dense FP32 starting model, exported and timed the same way: the reference for speed-ups
    t0 = time.perf_counter()
    console.rule("[bold]6/7 dense FP32 reference (the starting model, untrained head: latency only)")
    dense_bench = _dense_reference(base_model, work / "dense-deployment", engines, settings, run_benchmark)
    step("dense_reference", t0)

    # 7. publish to a hub on loopback with a generated model card, and pull it back by stub
    t0 = time.perf_counter()
    console.rule("[bold]7/7 publish to a local hub and pull back by stub")
    hub = _hub_roundtrip(
        deployment, model_dir, work / "hub", dataset, sparsity, export, test_accuracy, bench, quick
    )
    console.print(f"published and pulled back {hub['stub']} ({hub['files']} files, sha256 checked)")
    step("hub", t0)

    source_bytes = sum(p.stat().st_size for p in Path(base_model).glob("*.safetensors")) or sum(
        p.stat().st_size for p in Path(base_model).glob("pytorch_model*.bin")
    )
    summary = {
        "format_version": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "model": model_name,
        "dataset": {
            k: info[k] for k in ("dataset", "title", "counts", "labels", "majority_class_test_accuracy")
        },
        "recipe": str(recipe_path),
        "max_seq_length": settings["max_seq_length"],
        "accuracy": {
            "validation": validation_accuracy,
            "test_pytorch": test_accuracy,
            "test_onnx": onnx_accuracy,
            "majority_class": info["majority_class_test_accuracy"],
        },
        "sparsity": {**sparsity, "export_overall": _export_sparsity(export)},
        "quantized": bool(getattr(export, "quantized", False)),
        "size_bytes": {
            "base_model_weights": source_bytes,
            "trained_pytorch_model": (model_dir / "pytorch_model.bin").stat().st_size,
            "onnx": onnx_size,
            "onnx_gzip": onnx_gzip,
            "deployment_folder": folder_bytes(deployment),
        },
        "export": {
            "max_abs_diff": getattr(export, "max_abs_diff", None),
            "tolerance": getattr(export, "tolerance", None),
            "sequence_length": EXPORT_SEQUENCE_LENGTH,
        },
        "benchmark": [_bench_row(r) for r in bench],
        "benchmark_dense_reference": [_bench_row(r) for r in dense_bench],
        # relative to the output folder (the run is built in a staging folder, then renamed)
        "hub": {
            "stub": hub["stub"],
            "files": hub["files"],
            "pulled": str(Path(hub["pulled"]).relative_to(work)),
        },
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "timings_s": timings,
        "paths": {"model": "model", "deployment": "deployment", "data": "data", "train_log": "train.log"},
    }
    timings["total"] = round(time.perf_counter() - started, 1)
    (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    _replace_dir(work, out_dir)
    print_summary(summary, out_dir, console)
    return summary


def _dense_reference(
    base_model: Path, out: Path, engines: Sequence[str], settings: dict, run_benchmark
) -> list:
    """Export the starting model as dense FP32 and time it like the compressed one."""
    from obert_modifiers.export import export_deployment

    try:
        # the starting checkpoint may be a bare encoder (MiniLM-L6 is a BertModel): give it the
        # trained model's classification head shape, so both graphs do the same work
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        dense_dir = out.with_name(out.name + "-model")
        trained_config = json.loads((out.parent / "model" / "config.json").read_text())
        model = AutoModelForSequenceClassification.from_pretrained(
            base_model, id2label=trained_config["id2label"], label2id=trained_config["label2id"]
        )
        model.save_pretrained(dense_dir, safe_serialization=False)
        AutoTokenizer.from_pretrained(base_model).save_pretrained(dense_dir)
        export_deployment(
            dense_dir,
            out,
            task="text-classification",
            sequence_length=EXPORT_SEQUENCE_LENGTH,
            overwrite=True,
        )
        return run_benchmark(
            out,
            engines=tuple(engines),
            batch_size=1,
            sequence_length=EXPORT_SEQUENCE_LENGTH,
            seconds=settings["bench_seconds"],
            warmup_seconds=min(1.0, settings["bench_seconds"]),
        )
    except Exception as error:  # noqa: BLE001 - reported with the step and the folders
        raise DemoError(
            f"dense reference export/benchmark of {base_model} in {out} failed: {error}"
        ) from error


def demo_stub(dataset: str, sparsity: float, quantized: bool, quick: bool) -> str:
    """The SparseZoo-style stub the demo publishes under, e.g.
    ``zoo:nlp/text_classification/minilm-l6/pytorch/huggingface/rotten_tomatoes/pruned80_quant-none``."""
    architecture = "tiny_bert-test" if quick else "minilm-l6"
    data = {"rt": "rotten_tomatoes", "bbc": "bbc_news"}[dataset]
    percent = int(round(sparsity * 100))
    tag = (f"pruned{percent}" if percent else "base") + ("_quant" if quantized else "")
    return f"zoo:nlp/text_classification/{architecture}/pytorch/huggingface/{data}/{tag}-none"


def _hub_roundtrip(
    deployment: Path,
    model_dir: Path,
    root: Path,
    dataset: str,
    sparsity: dict,
    export: Any,
    test_accuracy: float,
    bench: list,
    quick: bool,
) -> dict:
    from obert_modifiers import zoo

    quantized = bool(getattr(export, "quantized", False))
    stub = demo_stub(dataset, sparsity["encoder_linear"], quantized, quick)
    try:
        return zoo.roundtrip(
            deployment,
            stub,
            root,
            training=model_dir,
            metrics={"accuracy": round(float(test_accuracy), 4)},
            latency=bench,
        )
    except Exception as error:  # noqa: BLE001 - reported with the step and the stub
        raise DemoError(f"hub round trip of {stub} (hub under {root}) failed: {error}") from error


def _export_sparsity(export: Any) -> float | None:
    value = getattr(export, "sparsity", None)
    if isinstance(value, dict):
        value = value.get("overall")
    return float(value) if isinstance(value, (int, float)) else None


def _bench_row(result: Any) -> dict:
    if isinstance(result, dict):
        return result
    fields = (
        "engine",
        "batch_size",
        "sequence_length",
        "num_cores",
        "median_ms",
        "p90_ms",
        "mean_ms",
        "items_per_second",
        "error",
    )
    return {f: getattr(result, f) for f in fields if hasattr(result, f)}


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


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
    sparsity = summary["sparsity"]
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
    console.print(f"outputs: {out_dir} (summary.json, model/, deployment/, data/, train.log)")
