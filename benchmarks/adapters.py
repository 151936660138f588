"""One recipe through both adapters: SparseML's stock command and the native ``RecipeTrainer``.

Issue #17's measurement: ``recipes/demo.yaml`` (the ``obert demo`` recipe: dense fine-tuning, ZipLM
to 2x and 3x, INT8 QAT) on MiniLM-L6 / Rotten Tomatoes, trained with the same seed, data, sequence
length 64 and batch 16

* by the SparseML adapter: SparseML's STOCK ``sparseml.transformers.train.text_classification``
  console script of the SparseML venv (``--sparseml-bin``, default ``<repo>/.venv/bin``);
* by the native adapter: ``obert train text-classification`` of the modern venv (``--modern-python``,
  default ``<repo>/.venv-modern/bin/python``; its ``obert`` console script beside it), one after the
  other, one OMP thread each.

Each trained folder is exported with ``obert_modifiers.export.export_deployment`` in this process
(run it with the SparseML venv's Python: the native folder's layout is the SparseML adapter's and
reloads there; if it does not, it is exported in the modern venv with ``obert export`` instead and
the JSON says so), scored per test snippet with ONNX Runtime (``runs.evaluate.onnx_correct``), and
the two compared with McNemar's exact paired test. Time per optimizer step is the trainer's
``train_runtime / global_step``, and outside the pruning steps with the seconds of each ZipLM step
(the modifiers' ``!ZipLMPruningModifier step N: ...; X s`` log lines) taken out.

The native adapter's overhead outside pruning steps (target <= 5 % of a plain ``Trainer`` step) is
measured by ``benchmarks/_adapter_overhead.py`` in the modern venv: a plain ``Trainer`` against
``RecipeTrainer`` with active modifiers that take no pruning step, interleaved (ABBA) repetitions.

    .venv/bin/python benchmarks/adapters.py --quick    # smoke run: tiny random BERT, 64 snippets
    .venv/bin/python benchmarks/adapters.py            # the measurement (2,000 training snippets)

Writes ``docs/results/adapters.json``, ``docs/results/adapters.png`` and the ``adapters`` section of
``docs/results.md``; ``--quick`` writes them to ``runs/results-quick/`` instead. ``--from-json``
re-renders the section from a saved JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._results import (  # noqa: E402
    machine_info,
    markdown_table,
    paired_comparison,
    results_dir,
    step_printer,
    update_results_section,
    write_json,
)
from obert_modifiers.runs.evaluate import onnx_correct, read_split  # noqa: E402
from obert_modifiers.runs.stock import STOCK_SCRIPT, apply_offline_env, offline_env, run_logged, train_args  # noqa: E402

NAME = "adapters"
RECIPE = ROOT / "recipes" / "demo.yaml"
OVERHEAD_SCRIPT = ROOT / "benchmarks" / "_adapter_overhead.py"
SIDES = ("sparseml", "native")
SETTINGS: dict[str, dict[str, Any]] = {  # what obert demo trains on, and the overhead timing
    "quick": dict(
        max_train=64, max_eval=32, max_test=200, seq=64, batch=16, seed=42, overhead_steps=10,
        overhead_warmup=3, overhead_repetitions=2,
    ),
    "full": dict(
        max_train=2000, max_eval=300, max_test=None, seq=64, batch=16, seed=42, overhead_steps=40,
        overhead_warmup=5, overhead_repetitions=4,
    ),
}  # fmt: skip
OVERHEAD_TARGET = 0.05  # issue #17: native step <= 1.05 x plain Trainer step, outside pruning steps
ALPHA = 0.05  # "within noise": McNemar's p above this
STEP_LINE = re.compile(r"!ZipLMPruningModifier step (\d+): .*; ([0-9.]+) s\s*$", re.M)


def pruning_step_seconds(log_text: str) -> list[float]:
    """Seconds of each ZipLM pruning step, from the modifier's log lines (both adapters write
    ``!ZipLMPruningModifier step N: ...; X.X s``); a step logged twice counts once."""
    seen: dict[int, float] = {}
    for match in STEP_LINE.finditer(log_text):
        seen.setdefault(int(match[1]), float(match[2]))
    return [seen[k] for k in sorted(seen)]


def step_times(train_runtime: float, global_step: int, pruning_seconds: list[float]) -> dict[str, Any]:
    """Seconds per optimizer step over the whole run, and outside the pruning steps (their logged
    seconds taken out of the runtime; the optimizer steps they sit in still count)."""
    if global_step <= 0:
        raise ValueError(f"global_step {global_step}: the run took no optimizer step")
    outside = train_runtime - sum(pruning_seconds)
    return {
        "train_runtime_s": train_runtime, "global_step": global_step,
        "pruning_steps": len(pruning_seconds), "pruning_seconds": pruning_seconds,
        "step_s": train_runtime / global_step, "step_outside_pruning_s": outside / global_step,
    }  # fmt: skip


def verdict(value: float, target: float) -> str:
    """``met`` / ``**missed**`` for ``value <= target``, with the margin in points."""
    margin = (target - value) * 100
    return f"met, {margin:.1f} points to spare" if value <= target else f"**missed** by {-margin:.1f} points"


def _console_script(bin_dir: Path, name: str) -> Path:
    script = bin_dir / name
    if not script.is_file():
        raise SystemExit(f"error: {script} not found (pass the venv's bin folder / Python with the flag)")
    return script


def _trainer_numbers(out: Path) -> tuple[float, int]:
    """``train_runtime`` (train_results.json, else all_results.json) and ``global_step``
    (trainer_state.json) of a finished run."""
    results: dict[str, Any] = {}
    for name in ("train_results.json", "all_results.json"):
        if (out / name).is_file():
            results = json.loads((out / name).read_text())
            break
    state_path = out / "trainer_state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    runtime = results.get("train_runtime")
    step = state.get("global_step")
    if runtime is None or step is None:
        raise SystemExit(f"error: {out}: no train_runtime / global_step in the trainer's JSON files")
    return float(runtime), int(step)


def _stack_versions() -> dict[str, str]:
    """This (SparseML) environment's transformers and SparseML versions."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("transformers", "sparseml"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def _relative(command: str) -> str:
    """A command line as the docs show it: paths inside the checkout relative to it."""
    return command.replace(f"{ROOT}/", "")


def train_side(side: str, command: list[str], out: Path, log: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run one adapter's training command; its log, wall time, steps and step times."""
    if out.exists():
        shutil.rmtree(out)
    print(f"[adapters] {side}: training (log {log})", flush=True)
    load_before = os.getloadavg()[0]
    began = time.perf_counter()
    run_logged(
        command, log, step_printer(f"[adapters] {side}"), cwd=out.parent, env=env, what=f"{side} training"
    )
    wall = time.perf_counter() - began
    runtime, global_step = _trainer_numbers(out)
    pruning = pruning_step_seconds(log.read_text(errors="replace"))
    eval_path = out / "eval_results.json"
    validation = json.loads(eval_path.read_text()).get("eval_accuracy") if eval_path.is_file() else None
    entry = {
        "side": side, "wall_s": wall, "validation_accuracy": validation,
        "load_average_1m": [load_before, os.getloadavg()[0]],
        **step_times(runtime, global_step, pruning),
    }  # fmt: skip
    print(
        f"[adapters] {side}: {global_step} steps in {runtime:.0f} s ({entry['step_s']:.3f} s/step, "
        f"{entry['step_outside_pruning_s']:.3f} outside {len(pruning)} pruning steps), wall {wall:.0f} s",
        flush=True,
    )
    return entry


TABLE_SCRIPT = """import json, sys, time
from transformers import AutoConfig
from obert_modifiers.latency import latency_table
began = time.perf_counter()
latency_table(AutoConfig.from_pretrained(sys.argv[1]), progress=False, **json.loads(sys.argv[2]))
print(json.dumps({"seconds": time.perf_counter() - began}))
"""


def latency_settings(recipe: Path) -> list[dict[str, Any]]:
    """The measured latency tables the recipe's ZipLM modifiers read (``latency_table`` keywords)."""
    from obert_modifiers.native.recipe import load_recipe

    found = []
    for modifier in load_recipe(recipe).modifiers:
        p = modifier.params
        if modifier.tag == "ZipLMPruningModifier" and p.latency_runtime != "flops":
            setting = {
                "runtime": p.latency_runtime, "threads": p.latency_threads,
                "batch_size": p.latency_batch_size, "sequence_length": p.latency_sequence_length,
                "precision": p.latency_precision, "cache_dir": p.latency_cache_dir,
            }  # fmt: skip
            if setting not in found:
                found.append(setting)
    return found


def latency_tables_first(recipe: Path, base: Path, modern_python: Path, env: dict) -> list[dict[str, Any]]:
    """Build (or read from the cache) the recipe's latency tables on both stacks before any training:
    a table is cached per ONNX Runtime version, so each venv has its own, and a first ZipLM step that
    builds one would count minutes of table timing as pruning-step cost."""
    from transformers import AutoConfig

    from obert_modifiers.latency import latency_table

    costs = []
    for setting in latency_settings(recipe):
        began = time.perf_counter()
        latency_table(AutoConfig.from_pretrained(base), progress=False, **setting)
        sparseml_seconds = time.perf_counter() - began
        command = [str(modern_python), "-c", TABLE_SCRIPT, str(base), json.dumps(setting)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"error: latency table in the modern venv failed:\n{done.stderr[-3000:]}")
        modern_seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
        costs.append({**setting, "sparseml_seconds": sparseml_seconds, "native_seconds": modern_seconds})
        print(
            f"[adapters] latency table {setting['precision']} {setting['threads']} threads: "
            f"{sparseml_seconds:.0f} s (SparseML venv), {modern_seconds:.0f} s (modern venv)",
            flush=True,
        )
    return costs


def export_side(side: str, model_dir: Path, target: Path, modern_bin: Path, env: dict) -> dict[str, Any]:
    """Deployment folder for ``model_dir``: on this (SparseML) stack, else with the modern venv's
    ``obert export``; returns where it went and which stack exported it."""
    from obert_modifiers.export import export_deployment

    try:
        export_deployment(model_dir, target, sequence_length=128, overwrite=True, progress=False)
        return {"path": target, "stack": "sparseml", "error": None}
    except Exception as error:  # noqa: BLE001 - reported in the JSON, then the modern stack tries
        if side != "native":
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"[adapters] native folder does not export on the SparseML stack ({first}); modern venv")
        command = [str(modern_bin / "obert"), "export", str(model_dir), "--out", str(target), "--overwrite"]
        run_logged(command, target.parent / f"export-{side}.log", cwd=target.parent, env=env, what="export")
        return {"path": target, "stack": "modern", "error": first}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny random BERT, 64 snippets")
    parser.add_argument("--max-train", type=int, help="training snippets (default 2,000; quick 64)")
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="recipe both adapters train with")
    parser.add_argument("--work", type=Path, help="work folder (default runs/adapters[-quick])")
    parser.add_argument(
        "--sparseml-bin", type=Path, default=ROOT / ".venv" / "bin",
        help=f"bin folder of the SparseML venv (holds {STOCK_SCRIPT})",
    )  # fmt: skip
    parser.add_argument(
        "--modern-python", type=Path, default=ROOT / ".venv-modern" / "bin" / "python",
        help="Python of the modern venv (its obert console script beside it)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="OMP threads of each run")
    parser.add_argument("--overhead-steps", type=int, help="timed steps per overhead run")
    parser.add_argument("--overhead-repetitions", type=int, help="overhead runs of each trainer")
    parser.add_argument("--from-json", type=Path, help="re-render the docs section from an adapters.json")
    parser.add_argument(
        "--reuse-training", action="store_true",
        help="keep each side's finished training (run-<side>.json, out-<side>/) and go on from the export",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.from_json:
        report(json.loads(args.from_json.read_text()))
        return 0

    from obert_modifiers import data, models
    from obert_modifiers.latency import cpu_flags, cpu_model

    apply_offline_env()
    mode = "quick" if args.quick else "full"
    cfg = dict(SETTINGS[mode])
    if args.max_train is not None:
        cfg["max_train"] = args.max_train or None
    for key in ("overhead_steps", "overhead_repetitions"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    stock = _console_script(args.sparseml_bin.absolute(), STOCK_SCRIPT)
    modern_bin = args.modern_python.absolute().parent
    obert = _console_script(modern_bin, "obert")
    recipe = args.recipe.resolve()
    work = (args.work or ROOT / "runs" / ("adapters-quick" if args.quick else "adapters")).resolve()
    work.mkdir(parents=True, exist_ok=True)

    info = data.prepare("rt", work / "data", max_train=cfg["max_train"], max_eval=cfg["max_eval"])
    labels = info["labels"]
    if args.quick:
        shutil.rmtree(work / "base-model", ignore_errors=True)
        base = models.save_tiny_bert(work / "base-model", num_labels=len(labels), labels=labels)
        model_name = "tiny random BERT (4 layers, hidden 32)"
    else:
        base = models.minilm_l6_dir()
        model_name = "MiniLM-L6 (all-MiniLM-L6-v2)"

    def flags(out: Path, native: bool) -> list[str]:
        extra: list[object] = ["--save_strategy", "no", "--dataloader_num_workers", 0, "--logging_steps", 20]
        if not native:
            extra += ["--save_safetensors", "False"]
        listed = train_args(
            base, work / "data", out, recipe, seq=cfg["seq"], batch=cfg["batch"], seed=cfg["seed"],
            evaluate=True, extra=extra,
        )  # fmt: skip
        # transformers 5 has no --overwrite_output_dir (the folder is removed before each run anyway)
        return [a for a in listed if a != "--overwrite_output_dir"] if native else listed

    commands = {
        "sparseml": [str(stock), *flags(work / "out-sparseml", native=False)],
        "native": [str(obert), "train", "text-classification", *flags(work / "out-native", native=True)],
    }
    tables = latency_tables_first(recipe, Path(base), args.modern_python, offline_env(args.threads))
    runs: dict[str, dict[str, Any]] = {}
    for side in SIDES:
        env = offline_env(args.threads, HF_DATASETS_CACHE=str(work / f".hf-cache-{side}"))
        record = work / f"run-{side}.json"  # the finished training's figures: --reuse-training reads them
        if args.reuse_training and record.is_file() and (work / f"out-{side}" / "config.json").is_file():
            runs[side] = json.loads(record.read_text())
            print(f"[adapters] {side}: reusing the finished training in {work / f'out-{side}'}", flush=True)
        else:
            record.unlink(missing_ok=True)
            out, log = work / f"out-{side}", work / f"train-{side}.log"
            runs[side] = train_side(side, commands[side], out, log, env)
            runs[side]["command"] = _relative(" ".join(commands[side]))
            record.write_text(json.dumps(runs[side], indent=2))

    texts, test_labels = read_split(work / "data" / "test.csv", cfg["max_test"])
    correct: dict[str, list[bool]] = {}
    for side in SIDES:
        exported = export_side(
            side, work / f"out-{side}", work / f"deployment-{side}", modern_bin, offline_env(args.threads)
        )
        from obert_modifiers.deployment import DeploymentManifest

        manifest = DeploymentManifest.read(exported["path"])
        correct[side] = onnx_correct(exported["path"], texts, test_labels)
        runs[side].update(
            export_stack=exported["stack"], export_error=exported["error"],
            test_accuracy=sum(correct[side]) / len(correct[side]), quantized=manifest.quantized,
            int8_format=manifest.int8_format, num_parameters=manifest.num_parameters,
            parity_max_abs_diff=manifest.parity.max_abs_diff,
            structure=manifest.structure.model_dump() if manifest.structure else None,
        )  # fmt: skip
        print(f"[adapters] {side}: test accuracy {runs[side]['test_accuracy']:.4f} on {len(texts)} snippets")
    comparison = paired_comparison(correct["sparseml"], correct["native"])

    overhead_json = work / "overhead.json"
    overhead_command = [
        str(args.modern_python), str(OVERHEAD_SCRIPT), "--model", str(base),
        "--train-csv", str(work / "data" / "train.csv"), "--out", str(overhead_json),
        "--steps", str(cfg["overhead_steps"]), "--warmup", str(cfg["overhead_warmup"]),
        "--repetitions", str(cfg["overhead_repetitions"]), "--seq", str(cfg["seq"]),
        "--batch", str(cfg["batch"]), "--seed", str(cfg["seed"]),
    ]  # fmt: skip
    print(f"[adapters] overhead: {cfg['overhead_repetitions']} runs of each trainer (log overhead.log)")
    env = offline_env(args.threads)
    run_logged(overhead_command, work / "overhead.log", cwd=work, env=env, what="overhead timing")
    overhead = json.loads(overhead_json.read_text())
    overhead["command"] = _relative(" ".join(overhead_command))

    payload = {
        "mode": mode, "settings": cfg, "threads": args.threads, "model": model_name, "base_model": str(base),
        "recipe": str(recipe.relative_to(ROOT) if recipe.is_relative_to(ROOT) else recipe),
        "data": {"counts": info["counts"], "labels": labels}, "test_rows": len(texts),
        "runs": runs, "paired_test": comparison, "overhead": overhead, "latency_tables": tables,
        "targets": {"overhead": OVERHEAD_TARGET, "alpha": ALPHA},
        "machine": {**machine_info(), "cpu": cpu_model(), "cpu_flags": cpu_flags(), **_stack_versions()},
    }  # fmt: skip
    report(payload)
    return 0


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, overhead = payload["runs"], payload["overhead"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    x = range(len(SIDES))
    left.bar([i - 0.2 for i in x], [runs[s]["step_s"] for s in SIDES], width=0.4, label="all steps")
    left.bar(
        [i + 0.2 for i in x], [runs[s]["step_outside_pruning_s"] for s in SIDES], width=0.4,
        label="outside pruning steps",
    )  # fmt: skip
    left.set_xticks(list(x), [f"{s}\nacc {runs[s]['test_accuracy']:.3f}" for s in SIDES])
    left.set_ylabel("seconds per optimizer step")
    left.set_title(f"{Path(payload['recipe']).name}: time per step", fontsize=9)
    left.legend(fontsize=7)
    medians = overhead["repetition_medians_s"]
    for i, side in enumerate(("plain", "native")):
        right.scatter([i] * len(medians[side]), [m * 1e3 for m in medians[side]], color=f"C{i}")
    right.set_xticks([0, 1], ["plain Trainer", "RecipeTrainer"])
    right.set_xlim(-0.5, 1.5)
    right.set_ylabel("median step, ms (one dot per run)")
    right.set_title(f"overhead {overhead['overhead']:+.1%} (target <= {OVERHEAD_TARGET:.0%})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _seconds(value: float) -> str:
    """A latency table's cost: read from the cache when it took under a second."""
    return f"{value:.0f} s" if value >= 1 else "read from the cache"


def report(payload: dict) -> None:
    """Write adapters.{json,png} and the docs section (``--from-json`` re-renders a saved run)."""
    mode, cfg, runs = payload["mode"], payload["settings"], payload["runs"]
    smoke = mode == "quick"
    json_path = write_json(NAME, payload, smoke)
    png_path = results_dir(smoke) / f"{NAME}.png"
    plot(payload, png_path)
    test, overhead = payload["paired_test"], payload["overhead"]
    headers = [
        "adapter", "test acc", "val acc", "steps", "train s", "s/step", "s/step outside pruning",
        "pruning steps (s)", "wall s", "export stack",
    ]  # fmt: skip
    rows = []
    for side in SIDES:
        r = runs[side]
        pruning = ", ".join(f"{s:.1f}" for s in r["pruning_seconds"]) or "-"
        rows.append([
            {"sparseml": "SparseML (stock command)", "native": "native (obert train)"}[side],
            f"{r['test_accuracy']:.4f}",
            "-" if r["validation_accuracy"] is None else f"{r['validation_accuracy']:.4f}",
            r["global_step"], f"{r['train_runtime_s']:.0f}", f"{r['step_s']:.3f}",
            f"{r['step_outside_pruning_s']:.3f}", f"{r['pruning_steps']} ({pruning})", f"{r['wall_s']:.0f}",
            r["export_stack"],
        ])  # fmt: skip
    ratio = runs["native"]["step_outside_pruning_s"] / runs["sparseml"]["step_outside_pruning_s"]
    within = test["p_value"] > payload["targets"]["alpha"]
    accuracy_verdict = (
        f"McNemar's exact test on the same {test['n']:,} test snippets: SparseML alone right on "
        f"{test['a_only']}, native alone on {test['b_only']}, p = {test['p_value']:.3g}: "
        + ("**met** (no significant difference at 5 %)" if within else "**missed** (significant at 5 %)")
    )
    settings = overhead["settings"]
    per_rep = ", ".join(f"{o:+.1%}" for o in overhead["overhead_per_repetition"])
    machine = payload.get("machine", {})
    tables = payload.get("latency_tables", [])
    table_text = (
        "the latency tables were built (or read from the cache) on each stack before the trainings: "
        + "; ".join(
            f"{s['precision']}, {s['threads']} threads: {_seconds(s['sparseml_seconds'])} (SparseML venv), "
            f"{_seconds(s['native_seconds'])} (modern venv)"
            for s in tables
        )
        if tables
        else "no measured latency table"
    )
    loads = [v for side in SIDES for v in runs[side].get("load_average_1m") or []]
    load_text = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "not recorded"
    run_notes = [f"{side}: {runs[side]['note']}" for side in SIDES if runs[side].get("note")]
    command = "python benchmarks/adapters.py" + (" --quick" if smoke else "")
    if cfg["max_train"] != SETTINGS[mode]["max_train"]:
        command += f" --max-train {cfg['max_train'] or 0}"
    if payload["recipe"] != str(RECIPE.relative_to(ROOT)):
        command += f" --recipe {payload['recipe']}"
    counts = payload["data"]["counts"]
    # fmt: off
    notes = [
        f"Mode `{mode}` ({'smoke run: figures not meaningful' if smoke else 'measurement'}): "
        f"{payload['model']}, `{payload['recipe']}`, Rotten Tomatoes {counts['train']:,} training / "
        f"{counts['validation']:,} validation snippets (the `obert demo` slice), seq {cfg['seq']}, batch "
        f"{cfg['batch']}, seed {cfg['seed']}, {payload['threads']} OMP thread(s) per run, the two runs one "
        "after the other. Test accuracy: ONNX Runtime on each export (seq 128), "
        f"{payload['test_rows']:,} test snippets.",
        f"Accuracy within noise: {accuracy_verdict}.",
        "Time per step: the trainer's `train_runtime / global_step`; outside pruning: the seconds of the "
        "ZipLM steps (each adapter's `!ZipLMPruningModifier step N: ...; X s` log line) taken out; "
        f"{table_text}. Native / SparseML "
        f"outside pruning: {ratio:.2f}x (different stacks: SparseML with transformers "
        f"{machine.get('transformers', 'n/a')} and torch {machine.get('torch', 'n/a')} against transformers "
        f"{overhead['versions']['transformers']} and torch {overhead['versions']['torch']}).",
        f"Native overhead outside pruning steps (target <= {OVERHEAD_TARGET:.0%} of a plain `Trainer` step): "
        f"plain `Trainer` {overhead['plain_median_s'] * 1e3:.1f} ms, `RecipeTrainer` "
        f"{overhead['native_median_s'] * 1e3:.1f} ms per step, overhead {overhead['overhead']:+.1%}: "
        f"{verdict(overhead['overhead'], OVERHEAD_TARGET)}. Median of {settings['repetitions']} runs' "
        f"medians each ({settings['steps']} timed steps after {settings['warmup']} warm-up, fresh model per "
        f"run, ABBA order, after {settings.get('warmup_runs', 0)} untimed run(s) of each); per pair: "
        f"{per_rep}. Recipe: `!ConstantPruningModifier` on the encoder "
        "linears (masks re-applied every step) + `!LearningRateFunctionModifier`, no pruning step in the "
        f"window (`benchmarks/_adapter_overhead.py`, torch {overhead['versions']['torch']}, transformers "
        f"{overhead['versions']['transformers']}).",
        f"Machine: {machine.get('cpu', 'n/a')}, flags {machine.get('cpu_flags', 'n/a')}, "
        f"{machine.get('cpu_count')} cores; 1-minute load average around the trainings "
        f"{load_text} (a shared machine: absolute seconds move with it)"
        + (f"; {'; '.join(run_notes)}" if run_notes else "") + ".",
        f"Commands: SparseML `{Path(runs['sparseml']['command'].split()[0]).name} "
        f"{' '.join(runs['sparseml']['command'].split()[1:])}`; native `obert "
        f"{' '.join(runs['native']['command'].split()[1:])}`.",
        *payload.get("notes", []),  # what the run's operator recorded beside the figures (the JSON's "notes")
        f"Source: `{command}`; JSON `{json_path.relative_to(ROOT)}`, plot `{png_path.relative_to(ROOT)}`.",
    ]
    # fmt: on
    markdown = "## One recipe, two adapters: SparseML's stock command and the native RecipeTrainer\n\n"
    markdown += markdown_table(headers, rows)
    markdown += "\n\n" + "\n".join(f"- {n}" for n in notes) + f"\n\n![{NAME}](results/{NAME}.png)\n"
    update_results_section(NAME, markdown, smoke)
    print(markdown)


if __name__ == "__main__":
    raise SystemExit(main())
