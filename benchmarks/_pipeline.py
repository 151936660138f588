"""Stage caching and scheduling for the benchmarks that train (``reproduce.py``, ``compound.py``,
``recovery_schedules.py``).

A *stage* is one run of the STOCK ``sparseml.transformers.train.text_classification`` script with
one of the recipe files in ``recipes/`` (variables overridden with ``--recipe_args``), starting
from the bundled MiniLM-L6 or from another stage's output, optionally distilling from another
stage. Stages are cached: a finished stage folder holds ``stage.json`` with a key made of
everything that determines it (recipe text, arguments, parent key, data slice, training flags),
so scripts sharing a work folder reuse each other's runs and an interrupted run resumes at the
first unfinished stage. Independent stages run side by side (``jobs``), one OMP thread each.

What is not benchmark-specific comes from the package, as ``obert demo`` and the tests use it:
the offline environment, the stock command and its logged run (``obert_modifiers.runs.stock``) and
the accuracy of an exported model (``obert_modifiers.runs.evaluate``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from obert_modifiers.runs.stock import offline_env, run_logged, train_command

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
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


@dataclass
class Stage:
    """One training run. ``parent``/``teacher`` name other stages (``None``: the bundled model /
    no distillation)."""

    name: str
    recipe: str  # file name under recipes/
    recipe_args: dict[str, Any] = field(default_factory=dict)
    parent: str | None = None
    teacher: str | None = None
    parent_subdir: str | None = None  # start from this folder inside the parent's (a ZipLM family member)
    depends: dict[str, Any] = field(default_factory=dict)  # what else decides the run (in the cache key
    # only, not passed to the command): e.g. the digest of the latency table a ZipLM stage reads

    def key(self, keys: dict[str, str], training: dict[str, Any]) -> str:
        text = (RECIPES / self.recipe).read_text()
        parent = keys.get(self.parent) if self.parent else "minilm-l6"
        if self.parent_subdir:
            parent = f"{parent}/{self.parent_subdir}"
        blob = json.dumps(
            {
                "recipe": text,
                "args": self.recipe_args,
                "parent": parent,
                "teacher": keys.get(self.teacher) if self.teacher else None,
                "training": training,
                **({"depends": self.depends} if self.depends else {}),
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def clean_start(model_dir: Path, out: Path) -> Path:
    """Copy config, weights, tokenizer and recipe only: a folder holding optimizer.pt makes
    SparseML's trainer resume the old optimizer and schedule."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in START_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out / name)
    return out


def _command(
    stage: Stage, start: Path, teacher: Path | None, data: Path, out: Path, training: dict
) -> list[str]:
    return train_command(
        start, data, out, RECIPES / stage.recipe, seq=training["seq"], batch=training["batch_size"],
        seed=training["seed"], recipe_args=stage.recipe_args, teacher=teacher or "disable",
        logging_steps=50, evaluate=True, final_bin_only=True,
    )  # fmt: skip


def command_line(stage: Stage, training: dict) -> str:
    """The stage as a user would type it (for the docs)."""
    parts = [
        "sparseml.transformers.train.text_classification",
        "--model_name_or_path", stage.parent or "$(python -c 'from obert_modifiers.models import "
        "minilm_l6_dir; print(minilm_l6_dir())')",
        "--train_file data/train.csv --validation_file data/validation.csv --do_train --do_eval",
        f"--max_seq_length {training['seq']} --per_device_train_batch_size {training['batch_size']}",
        f"--seed {training['seed']} --output_dir {stage.name} --recipe recipes/{stage.recipe}",
    ]  # fmt: skip
    if stage.recipe_args:
        parts.append(f"--recipe_args '{json.dumps(stage.recipe_args)}'")
    if stage.teacher:
        parts.append(f"--distill_teacher {stage.teacher}")
    return " ".join(parts)


def run_stages(
    stages: Sequence[Stage], work: Path, data: Path, training: dict[str, Any], jobs: int = 1
) -> dict[str, Path]:
    """Train every stage (parents first, up to ``jobs`` at a time); return name -> model folder.

    Each stage is the stock command run by ``obert_modifiers.runs.stock.run_logged`` in a worker
    thread (its output in ``<work>/<stage>.log``); every 30 s one line shows each running stage's
    step counter. When a stage fails, the others are stopped and the error names its log."""
    by_name = {s.name: s for s in stages}
    for stage in stages:
        needs = [n for n in (stage.parent, stage.teacher) if n]
        if any(n not in by_name for n in needs):
            raise ValueError(f"stage {stage.name}: unknown parent/teacher {needs}")
    keys: dict[str, str] = {}
    done: dict[str, Path] = {}
    pending = list(stages)
    running: dict[Future, str] = {}
    watch = _Watch()
    work.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        while pending or running:
            for stage in [s for s in pending if all(n in done for n in (s.parent, s.teacher) if n)]:
                key = stage.key(keys, training)
                marker = work / stage.name / "stage.json"
                if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
                    print(f"[pipeline] {stage.name}: reusing {marker.parent}", flush=True)
                    keys[stage.name], done[stage.name] = key, marker.parent
                    pending.remove(stage)
                elif len(running) < jobs:
                    keys[stage.name] = key
                    running[pool.submit(_train_stage, stage, work, data, training, done, watch)] = stage.name
                    pending.remove(stage)
            finished = wait(running, timeout=30, return_when=FIRST_COMPLETED)[0] if running else ()
            for future in finished:
                name = running.pop(future)
                if future.exception() is not None:
                    watch.stop(running.values())
                    raise future.exception()
                marker = {"key": keys[name], "stage": by_name[name].__dict__, "training": training}
                stage_json = {**marker, "train_seconds": future.result()}
                (work / name / "stage.json").write_text(json.dumps(stage_json, indent=2))
                shutil.rmtree(work / f".{name}-start", ignore_errors=True)
                done[name] = work / name
                print(f"[pipeline] {name}: trained in {future.result():.0f} s", flush=True)
            watch.report(running.values())
    return done


class _Watch:
    """The running stages' processes and step counters, shared with the worker threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.processes: dict[str, subprocess.Popen] = {}
        self.progress: dict[str, str] = {}
        self.last_report = time.perf_counter()

    def report(self, names) -> None:
        names = list(names)
        if names and time.perf_counter() - self.last_report > 30:
            self.last_report = time.perf_counter()
            with self.lock:
                line = " | ".join(f"{n} {self.progress.get(n, 'starting')}" for n in names)
            print(f"[pipeline] {line}", flush=True)

    def stop(self, names) -> None:
        with self.lock:
            for name in names:
                if name in self.processes:
                    self.processes[name].terminate()


def _train_stage(
    stage: Stage, work: Path, data: Path, training: dict[str, Any], done: dict[str, Path], watch: _Watch
) -> float:
    """Train one stage from a clean copy of its parent (a worker thread); returns its seconds."""
    from obert_modifiers.models import minilm_l6_dir

    parent = done[stage.parent] if stage.parent else minilm_l6_dir()
    if stage.parent_subdir:
        parent = parent / stage.parent_subdir
    start = clean_start(parent, work / f".{stage.name}-start")
    out = work / stage.name
    if out.exists():
        shutil.rmtree(out)
    log_path = work / f"{stage.name}.log"
    command = _command(stage, start, done[stage.teacher] if stage.teacher else None, data, out, training)
    print(f"[pipeline] {stage.name}: training ({stage.recipe}, log {log_path})", flush=True)

    def show(step: int, total: int, bar: int) -> None:
        with watch.lock:
            watch.progress[stage.name] = f"{step}/{total} steps" if bar == 0 else f"evaluation {step}/{total}"

    def started(process: subprocess.Popen) -> None:
        with watch.lock:
            watch.processes[stage.name] = process

    began = time.perf_counter()
    run_logged(
        command, log_path, show, cwd=work, what=f"stage {stage.name}", on_start=started,
        env=offline_env(training.get("threads", 1), HF_DATASETS_CACHE=str(work / ".hf-cache")),
    )  # fmt: skip
    return time.perf_counter() - began


def train_seconds(model_dir: Path) -> float | None:
    marker = model_dir / "stage.json"
    return json.loads(marker.read_text()).get("train_seconds") if marker.is_file() else None


def eval_results(model_dir: Path) -> dict[str, Any]:
    """The trainer's final evaluation of ``model_dir`` on the validation split ({} if it has none)."""
    path = model_dir / "eval_results.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# The published compound/reproduce tables time DeepSparse (its INT8 kernels run SparseML's integer
# graph) beside dense FP32 on ONNX Runtime; ORT's own fast INT8 forms are compared in ort_int8.py.
INT8_FORMAT = "integer"


def export(model_dir: Path, target: Path, reuse: bool = False, int8_format: str = INT8_FORMAT):
    """Deployment folder for ``model_dir`` (parity-checked by export_deployment). With ``reuse``, an
    existing folder exported from the same weights (older than its manifest, ``model.onnx`` intact)
    is kept. ``int8_format`` is the export's INT8 form (``auto``: the fastest exact on this CPU)."""
    from obert_modifiers.deployment import DeploymentManifest, read_manifest_if_any, sha256_file
    from obert_modifiers.export import ExportResult, export_deployment

    manifest: DeploymentManifest | None = read_manifest_if_any(target) if reuse else None
    if manifest is not None:
        written = (target / "export.json").stat().st_mtime
        weights = [f for f in model_dir.iterdir() if f.suffix in (".bin", ".safetensors")]
        newer = all(written > f.stat().st_mtime for f in weights)
        recorded = manifest.onnx_sha256
        intact = recorded is None or recorded == sha256_file(target / "model.onnx")
        choice = manifest.int8_choice or {}
        form = (
            choice.get("requested", manifest.int8_format) if int8_format == "auto" else manifest.int8_format
        )
        same_form = not manifest.quantized or form == int8_format
        if manifest.source_model == str(model_dir) and weights and newer and intact and same_form:
            return ExportResult(
                path=target,
                max_abs_diff=manifest.parity.max_abs_diff,
                tolerance=manifest.parity.tolerance,
                quantized=manifest.quantized,
                sparsity=manifest.sparsity.overall,
                onnx_bytes=(target / "model.onnx").stat().st_size,
                num_layers=manifest.num_layers or 0,
            )
    return export_deployment(model_dir, target, sequence_length=128, overwrite=True, int8_format=int8_format)


def fp32_twin(model_dir: Path, out: Path) -> Path:
    """The FP32 version of a QAT model folder: the same trained (and pruned) float weights, loaded
    without the recipe's quantization structure, saved as a plain model. Its export is "the FP32
    export of the same model" that the INT8 export is compared with."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    marker = out / "twin.json"
    weights = model_dir / "pytorch_model.bin"
    # the source folder is retrained in place when its stage changes: key on the weights' mtime too
    source = {"source": str(model_dir), "weights_mtime_ns": weights.stat().st_mtime_ns}
    if marker.is_file() and json.loads(marker.read_text()) == source:
        return out
    if out.exists():
        shutil.rmtree(out)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the fake-quant buffers are "unused" here, on purpose
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(model_dir), attn_implementation="eager"
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    float_state = {k: v for k, v in state.items() if k in model.state_dict()}
    missing = sorted(set(model.state_dict()) - set(float_state))
    if missing:
        raise ValueError(f"{model_dir}: no float weights for {missing[:3]} (layer-dropped? not supported)")
    model.load_state_dict(float_state, strict=True)
    model.save_pretrained(str(out), safe_serialization=False)
    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(out))
    marker.write_text(json.dumps(source))
    return out


def num_parameters(deployment: Path) -> int:
    from obert_modifiers.deployment import DeploymentManifest

    return DeploymentManifest.read(deployment).num_parameters


def time_deployments(
    deployments: dict[str, Path],
    grid: Sequence[tuple[int, int]],
    cores: Sequence[int],
    seconds: float,
    warmup: float,
    engines: Sequence[str] = ("onnxruntime", "deepsparse"),
    rounds: int = 1,
) -> list[dict]:
    """Latency of every deployment on every engine, batch/sequence pair and core count.

    With ``rounds`` > 1 the whole grid is timed that many times, interleaved (so a slow spell of
    the machine hits every model alike rather than one), and each entry reports the median of its
    per-round medians, with every round's median kept in ``round_medians_ms``.
    """
    from obert_modifiers.bench import run_benchmark

    runs: dict[tuple, list[dict]] = {}
    plan = list(itertools.product(range(rounds), deployments.items(), cores, grid))
    for round_index, (name, folder), core_count, (batch, length) in plan:
        for bench in run_benchmark(
            folder,
            engines=tuple(engines),
            batch_size=batch,
            sequence_length=length,
            num_cores=core_count,
            seconds=seconds,
            warmup_seconds=warmup,
        ):
            key = (name, bench.engine, batch, length, core_count)
            runs.setdefault(key, []).append({**bench.to_dict(), "model": name})
            status = (
                f"median {bench.median_ms:8.2f} ms  load {bench.load_average_1m:.2f}"
                if bench.ok
                else f"{bench.status}: {bench.error}"
            )
            where = f"b{batch:<3d} s{length:<4d} c{core_count}"
            tag = f"round {round_index + 1}/{rounds} " if rounds > 1 else ""
            print(f"[timing] {tag}{name:22s} {bench.engine:12s} {where} {status}", flush=True)
    return [_median_of_rounds(results) for results in runs.values()]


def _median_of_rounds(results: list[dict]) -> dict:
    """One entry for a timed configuration: the round whose median is the median of the rounds."""
    ok = [r for r in results if r["status"] == "ok"]
    if not ok:
        return results[-1]
    ordered = sorted(ok, key=lambda r: r["median_ms"])
    entry = dict(ordered[(len(ordered) - 1) // 2])
    medians = [r["median_ms"] for r in ok]
    entry.update(
        median_ms=statistics.median(medians),
        rounds=len(results),
        round_medians_ms=medians,
    )
    return entry


def timing_entry(
    rows: Sequence[dict], model: str, engine: str, batch: int, length: int, cores: int
) -> dict | None:
    """The successful timing of one configuration in ``time_deployments``' rows, if any."""
    for row in rows:
        key = (row["model"], row["engine"], row["batch_size"], row["sequence_length"], row["num_cores"])
        if key == (model, engine, batch, length, cores) and row["status"] == "ok":
            return row
    return None


def paired_round_ratios(rows: list[dict], baseline: tuple, candidate: tuple) -> list[float]:
    """Per-round ratios baseline / candidate: the two were timed in the same interleaved round,
    minutes apart at most, so a slow spell of the machine that spans a round cancels out."""
    found = timing_entry(rows, *baseline), timing_entry(rows, *candidate)
    a, b = (entry.get("round_medians_ms") if entry else None for entry in found)
    if not a or not b or len(a) != len(b):
        return []
    return [x / y for x, y in zip(a, b, strict=True)]


def median_ms(
    rows: Sequence[dict], model: str, engine: str, batch: int, length: int, cores: int
) -> float | None:
    entry = timing_entry(rows, model, engine, batch, length, cores)
    return entry["median_ms"] if entry else None
