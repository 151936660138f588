"""Structured pruning to speed-up targets on ONNX Runtime: MiniLM-L6 on Rotten Tomatoes.

The ``!ZipLMPruningModifier`` (docs/structured.md) against the compound table's models, every model
trained by the STOCK ``sparseml.transformers.train.text_classification`` script through the shared
stage pipeline (``benchmarks/_pipeline.py``; the teacher and the 3-layer rows are the stages of
``reproduce.py``, so their cache is shared), exported with ``obert_modifiers.export`` (parity-checked;
INT8 in the fastest form that is exact on this CPU, ``int8_format="auto"``) and timed on ONNX
Runtime (and DeepSparse where installed) in interleaved rounds:

* ``dense``                 the fine-tuned teacher (``recipes/minilm_teacher.yaml``), FP32
* ``3L-drop``               the teacher dropped to 3 layers with distillation (FP32)
* ``3L-80-block4-INT8``     the compound table's 3-layer, 80 % block4, INT8 row
* ``ziplm-<t>x``            one ZipLM run (``recipes/minilm_ziplm.yaml``) to each target ``t`` in
                            turn, distilled from the teacher; every target's model is saved (a
                            family) and exported FP32
* ``ziplm-<t>x-int8``       that member after INT8 QAT with distillation (``minilm_structured_qat.yaml``)
* ``ziplm-<a>x-uniform``    ablation: the same schedule to the ablation target with the same heads and
                            FFN width in every layer (``allocation: uniform``)
* ``ziplm-<a>x-no-update``  ablation: the same, removing without the OBS weight update

Columns: test accuracy (ONNX Runtime on the exported file), recovery against the teacher,
parameters, ONNX MB, ORT latency at batch 1, seq 128 and 64 on ``--threads`` threads, the measured
speed-up over dense FP32 on ORT beside the latency table's prediction, DeepSparse latency, the
training time; McNemar's paired test of each row against ``3L-80-block4-INT8`` on the same test
snippets; the cost of building the latency table and of one pruning step; CPU model and flags.

    python benchmarks/structured.py --quick            # smoke run: small slice, short stages
    python benchmarks/structured.py                    # the measurement (all training snippets)
    python benchmarks/structured.py --max-train 2000   # a slice (stated as such in the section)

Writes ``docs/results/structured.json``, ``docs/results/structured.png`` and the ``structured`` section
of ``docs/results.md``; ``--quick`` writes them to ``runs/results-quick/`` instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import _pipeline as pipeline  # noqa: E402
from benchmarks._pipeline import Stage  # noqa: E402
from benchmarks._results import (  # noqa: E402
    markdown_table,
    paired_comparison,
    results_dir,
    update_results_section,
    write_json,
)
from benchmarks._rows import ROWS, SETTINGS, slice_text, stages_for, training_flags, workspace  # noqa: E402
from obert_modifiers.bench import paired_speedups  # noqa: E402
from obert_modifiers.runs.evaluate import onnx_correct, read_split  # noqa: E402
from obert_modifiers.runs.stock import apply_offline_env  # noqa: E402

# ZipLM settings per mode (the teacher and 3-layer rows keep _rows.SETTINGS); epochs are per target
ZIPLM: dict[str, dict[str, Any]] = {
    "quick": dict(
        targets=[2.0, 3.0], ablation_target=2.0, update_frequency=0.5, recovery_epochs=0.5, qat_epochs=0.5,
        calibration=64, drop_epochs=0.5,
    ),
    # all 9,755 training snippets: half an epoch is 305 steps between targets, more than the 125 of a
    # whole epoch on the 2,000-snippet slice (which trained 1.0 / 1.0 / 1.0 / 2.0), sized so that the
    # run fits about 1.5 h of training with 2 jobs on the 2-core machine
    "full": dict(
        targets=[2.0, 3.0, 4.0, 5.0], ablation_target=3.0, update_frequency=0.5, recovery_epochs=0.5,
        qat_epochs=0.5, calibration=1024, drop_epochs=1.0,
    ),
}  # fmt: skip
REFERENCE = "3L-80-block4-INT8"  # the paired-significance baseline (the compound table's fastest row)
LENGTHS = (128, 64)
# paired speed-ups (obert_modifiers.bench.paired_speedups): dense and each row alternate in short blocks,
# so that the VM's slow spells (minutes long) fall on both sides of every ratio
PAIRED: dict[str, dict[str, Any]] = {
    "quick": dict(pairs=4, block_seconds=0.05),
    "full": dict(pairs=20, block_seconds=0.25),
}
TARGETS = {  # issue #16's targets: (minimum speed-up over dense FP32 on ORT b1 s128, minimum recovery)
    "int8": (3.0, 0.97),
    "fp32": (2.0, 0.98),
    "stretch": (5.0, 0.95),
}


def member(target: float) -> str:
    return f"ziplm-{target:g}x"


def ziplm_args(z: dict, targets: list[float], threads: int, **extra: Any) -> dict[str, Any]:
    return {
        "speedup_targets": targets,
        "num_targets": len(targets),
        "update_frequency": z["update_frequency"],
        "recovery_epochs": z["recovery_epochs"],
        "num_calibration_samples": z["calibration"],
        "latency_threads": threads,
        "latency_precision": "fp32",
        **extra,
    }


def stages(
    cfg: dict, z: dict, threads: int, table_digest: str = ""
) -> tuple[list[Stage], dict[str, tuple[str, str | None, bool]]]:
    """The training stages and, per table row, (stage, sub-folder, int8). The ZipLM stages' cache key
    holds the latency table's digest: a re-measured table retrains them (their structures come from it)."""
    depends = {"latency_table": table_digest} if table_digest else {}
    reference = next(r for r in ROWS if r.name == REFERENCE)
    teacher, *compound = stages_for([reference], cfg)  # dense + the 3-layer INT8 row (as reproduce.py)
    # the ZipLM family first after the teacher: its INT8 members wait for it (the longest chain)
    out = [teacher]
    out.append(
        Stage(
            "ziplm",
            "minilm_ziplm.yaml",
            ziplm_args(z, z["targets"], threads),
            parent="dense",
            teacher="dense",
            depends=depends,
        )
    )
    out += compound
    out.append(
        Stage(
            "3L-drop", "layer_drop_minilm_3layer.yaml", {"num_epochs": z["drop_epochs"]},
            parent="dense", teacher="dense",
        )
    )  # fmt: skip
    rows: dict[str, tuple[str, str | None, bool]] = {
        "dense": ("dense", None, False),
        "3L-drop": ("3L-drop", None, False),
        REFERENCE: (REFERENCE, None, True),
    }
    for target in z["targets"]:
        rows[member(target)] = ("ziplm", member(target), False)
    for target in z["targets"]:
        name = f"{member(target)}-int8"
        out.append(
            Stage(
                name, "minilm_structured_qat.yaml", {"qat_epochs": z["qat_epochs"]},
                parent="ziplm", teacher="dense", parent_subdir=member(target),
            )
        )  # fmt: skip
        rows[name] = (name, None, True)
    ablation = [t for t in z["targets"] if t <= z["ablation_target"]]
    for suffix, extra in (("uniform", {"allocation": "uniform"}), ("no-update", {"weight_update": False})):
        name = f"{member(z['ablation_target'])}-{suffix}"
        out.append(
            Stage(
                name,
                "minilm_ziplm.yaml",
                ziplm_args(z, ablation, threads, **extra),
                parent="dense",
                teacher="dense",
                depends=depends,
            )
        )
        rows[name] = (name, None, False)
    return out, rows


def step_costs(log: Path) -> list[float]:
    """Seconds of each ZipLM pruning step, from the modifier's log lines in a stage's log."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    return [
        float(s) for s in re.findall(r"!ZipLMPruningModifier step \d+: .*; ([0-9.]+) s$", text, flags=re.M)
    ]


def latency_table_first(threads: int, refresh: bool) -> dict[str, Any]:
    """MiniLM-L6's FP32 ORT latency table (the one the ZipLM stages read from the cache), measured
    before any training starts (a table timed beside running trainings is inflated and skewed), unless
    it is cached and ``refresh`` is off; returns its cost and the conditions it was measured in."""
    from transformers import AutoConfig

    from obert_modifiers.latency import latency_table, shape_key, table_cache_path
    from obert_modifiers.models import minilm_l6_dir

    config = AutoConfig.from_pretrained(minilm_l6_dir())
    key = shape_key(config, threads=threads, sequence_length=128, precision="fp32")
    cached = table_cache_path(key).is_file() and not refresh
    began = time.perf_counter()
    table = latency_table(config, threads=threads, sequence_length=128, refresh=refresh)
    seconds = time.perf_counter() - began
    meta = table.meta
    return {
        "trusted": meta.get("trusted"), "consistency": meta.get("consistency"),
        "seconds": meta.get("total_s") if cached else seconds, "from_cache": cached,
        "cached_read_seconds": seconds if cached else None, "dense_ms": table.dense(),
        "measured_at": meta.get("measured_at"), "load_average": meta.get("load_average"),
        "digest": hashlib.sha256(table.to_json().encode()).hexdigest()[:16],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small training slice and short timings")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "pipeline", help="stage cache folder")
    parser.add_argument(
        "--threads", type=int, default=2, help="ORT/DeepSparse threads of the timings and table"
    )
    parser.add_argument("--jobs", type=int, default=2, help="training runs side by side (1 thread each)")
    parser.add_argument("--max-train", type=int, help="training snippets (default: the mode's; 0: all 9,755)")
    parser.add_argument("--refresh-table", action="store_true", help="re-measure the cached latency table")
    parser.add_argument("--train-only", action="store_true", help="train (or reuse) the stages, then stop")
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="STAGE",
        help="leave out a stage that nothing else needs, and its rows (a partial run; the section says so)",
    )
    parser.add_argument(
        "--allow-untrusted-table",
        action="store_true",
        help="go on with a latency table measured under load or that does not add up (its figures say so)",
    )
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds (default: the mode's)")
    parser.add_argument("--seconds", type=float, help="seconds per timing run (default: the mode's)")
    parser.add_argument(
        "--pairs", type=int, help="dense/row timing pairs of the paired speed-ups (default: the mode's)"
    )
    parser.add_argument(
        "--from-json", type=Path, help="re-render the docs section from a saved structured.json"
    )
    args = parser.parse_args(argv)
    if args.from_json:
        report(json.loads(args.from_json.read_text()))
        return 0

    apply_offline_env()
    mode = "quick" if args.quick else "full"
    cfg = dict(SETTINGS[mode])
    if args.max_train is not None:
        cfg["max_train"] = args.max_train or None
    z = ZIPLM[mode]
    work, data = workspace(args.work, mode, cfg)
    cfg.update({k: v for k, v in (("rounds", args.rounds), ("seconds", args.seconds)) if v is not None})
    paired_cfg = {**PAIRED[mode], **({"pairs": args.pairs} if args.pairs else {})}
    training = training_flags(cfg)
    table_cost = latency_table_first(args.threads, args.refresh_table)
    if not table_cost["trusted"] and not args.allow_untrusted_table:
        print(
            f"[structured] the latency table is not trusted (measured under 1-minute load "
            f"{(table_cost['load_average'] or ['?'])[0]}, dense predicted / measured "
            f"{table_cost['consistency']}): the ZipLM rows would be chosen on noise. Run again with "
            "--refresh-table on a quiet machine, or pass --allow-untrusted-table.",
            file=sys.stderr,
        )
        return 2
    plan, rows = stages(cfg, z, args.threads, table_cost["digest"])
    needed = {n for s in plan if s.name not in args.skip for n in (s.parent, s.teacher) if n}
    unknown, blocked = sorted(set(args.skip) - {s.name for s in plan}), sorted(needed & set(args.skip))
    if unknown or blocked:
        parser.error(f"--skip: unknown stages {unknown}, stages others need {blocked}")
    plan = [s for s in plan if s.name not in args.skip]
    rows = {name: row for name, row in rows.items() if row[0] not in args.skip}
    started = time.perf_counter()
    trained = pipeline.run_stages(plan, work / "stages", data, training, args.jobs)
    train_wall = time.perf_counter() - started
    if args.train_only:
        print(f"[structured] trained in {train_wall:.0f} s; run again without --train-only to time them")
        return 0

    texts, labels = read_split(data / "test.csv", cfg["max_test"])
    models, deployments, correct = [], {}, {}
    for name, (stage, sub, _) in rows.items():
        source = trained[stage] / sub if sub else trained[stage]
        result = pipeline.export(
            source, work / "structured-deployments" / name, reuse=True, int8_format="auto"
        )
        from obert_modifiers.deployment import DeploymentManifest

        manifest = DeploymentManifest.read(result.path)
        deployments[name] = result.path
        correct[name] = onnx_correct(result.path, texts, labels)
        accuracy = sum(correct[name]) / len(correct[name])
        structure = manifest.structure.model_dump() if manifest.structure else None
        models.append({
            "model": name, "stage": stage, "accuracy": accuracy, "quantized": manifest.quantized,
            "int8_format": manifest.int8_format, "num_parameters": manifest.num_parameters,
            "num_layers": manifest.num_layers, "onnx_mb": (result.path / "model.onnx").stat().st_size / 1e6,
            "parity_max_abs_diff": manifest.parity.max_abs_diff, "sparsity": manifest.sparsity.overall,
            "structure": structure, "train_seconds": pipeline.train_seconds(trained[stage]),
            "validation_accuracy": pipeline.eval_results(source).get("eval_accuracy"),
        })  # fmt: skip
        print(
            f"[structured] {name}: test accuracy {accuracy:.4f}, {models[-1]['onnx_mb']:.1f} MB", flush=True
        )
    costs = {
        "pruning_step_seconds": {
            stage.name: step_costs(work / "stages" / f"{stage.name}.log")
            for stage in plan
            if stage.recipe == "minilm_ziplm.yaml"
        },
        "latency_table": table_cost,
    }
    grid = [(1, length) for length in LENGTHS]
    timings = pipeline.time_deployments(
        deployments, grid, [args.threads], cfg["seconds"], cfg["warmup"], rounds=cfg["rounds"]
    )
    print(
        f"[structured] paired speed-ups over dense on ORT (b1 s128, {paired_cfg['pairs']} pairs of "
        f"{paired_cfg['block_seconds']:g} s blocks)",
        flush=True,
    )
    paired = {
        name: result.to_dict()
        for name, result in paired_speedups(
            deployments["dense"],
            {name: path for name, path in deployments.items() if name != "dense"},
            sequence_length=128,
            num_cores=args.threads,
            progress=lambda name, r: print(
                f"[paired] {name:22s} {r.median:5.2f}x (quartiles {r.quartiles[0]:.2f}-{r.quartiles[1]:.2f})",
                flush=True,
            ),
            **paired_cfg,
        ).items()
    }
    significance = {
        name: paired_comparison(correct[REFERENCE], correct[name]) for name in rows if name != REFERENCE
    }
    from benchmarks._results import machine_info
    from obert_modifiers.latency import cpu_flags, cpu_model

    machine = {**machine_info(), "cpu": cpu_model(), "cpu_flags": cpu_flags()}
    payload = {
        "mode": mode, "settings": cfg, "ziplm": z, "threads": args.threads, "jobs": args.jobs,
        "train_wall_seconds": train_wall,
        "models": models, "timings": timings, "paired": paired, "paired_settings": paired_cfg,
        "significance_vs_reference": significance, "costs": costs,
        "reference": REFERENCE, "machine": machine, "test_rows": len(texts), "skipped": args.skip,
    }  # fmt: skip
    report(payload)
    return 0


def _speedups(payload: dict) -> dict[str, dict[str, Any]]:
    """Per model and sequence length: measured speed-up over dense FP32 on ORT (medians of the rounds)
    and per interleaved round; at seq 128 also the paired speed-up (``paired``: median of the pairs'
    ratios, ``pairs``: each pair's), which the targets and predictability use where a run measured it."""
    threads, timings = payload["threads"], payload["timings"]
    paired = payload.get("paired") or {}
    out: dict[str, dict[str, Any]] = {}
    for row in payload["models"]:
        entry: dict[str, Any] = {}
        if row["model"] == "dense":
            entry["paired"], entry["pairs"] = 1.0, []
        elif row["model"] in paired:
            entry["paired"], entry["pairs"] = paired[row["model"]]["median"], paired[row["model"]]["ratios"]
        else:
            entry["paired"], entry["pairs"] = None, []
        for length in LENGTHS:
            dense = pipeline.median_ms(timings, "dense", "onnxruntime", 1, length, threads)
            mine = pipeline.median_ms(timings, row["model"], "onnxruntime", 1, length, threads)
            entry[f"s{length}"] = dense / mine if dense and mine else None
            entry[f"s{length}_rounds"] = pipeline.paired_round_ratios(
                timings,
                ("dense", "onnxruntime", 1, length, threads),
                (row["model"], "onnxruntime", 1, length, threads),
            )
        entry["headline"] = entry["paired"] if paired and entry["paired"] is not None else entry["s128"]
        out[row["model"]] = entry
    return out


def plot(payload: dict, speedups: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next(r for r in payload["models"] if r["model"] == "dense")["accuracy"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for row in payload["models"]:
        x = speedups[row["model"]]["headline"]
        if x is None:
            continue
        name = row["model"]
        family = name.startswith("ziplm") and not name.endswith(("uniform", "no-update"))
        marker = "o" if family else ("s" if name.startswith("ziplm") else "^")
        color = "tab:blue" if not row["quantized"] else "tab:orange"
        ax.scatter(x, row["accuracy"] / dense, marker=marker, color=color)
        ax.annotate(name, (x, row["accuracy"] / dense), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0.97, color="grey", linestyle=":", linewidth=1)
    ax.axvline(3.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel(
        f"{'paired ' if payload.get('paired') else ''}speed-up over dense FP32 on ONNX Runtime "
        f"(batch 1, seq 128, {payload['threads']} threads)"
    )
    ax.set_ylabel("recovery (test accuracy / teacher's)")
    ax.set_title(
        "MiniLM-L6 on Rotten Tomatoes: ZipLM (circles), ablations (squares), compound rows (triangles)"
    )
    ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(payload: dict) -> None:
    """Write structured.{json,png} and the docs section (``--from-json`` re-renders a saved run)."""
    mode, cfg, threads = payload["mode"], payload["settings"], payload["threads"]
    smoke = mode == "quick"
    json_path = write_json("structured", payload, smoke)
    png_path = results_dir(smoke) / "structured.png"
    speedups = _speedups(payload)
    plot(payload, speedups, png_path)
    timings = payload["timings"]
    dense_acc = next(r for r in payload["models"] if r["model"] == "dense")["accuracy"]

    headers = [
        "model", "INT8", "test acc", "recovery", "params M", "ONNX MB",
        *(f"ORT b1 s{n} ms" for n in LENGTHS), "speed-up s128 paired (pred.)", "speed-up s128 rounds",
        "speed-up s64",
        "DS b1 s128 ms", "train s", f"p vs {REFERENCE}",
    ]  # fmt: skip
    lines = []
    for row in payload["models"]:
        name = row["model"]
        ort = [pipeline.median_ms(timings, name, "onnxruntime", 1, n, threads) for n in LENGTHS]
        ds = pipeline.median_ms(timings, name, "deepsparse", 1, 128, threads)
        s = speedups[name]
        predicted = (row.get("structure") or {}).get("predicted_speedup")
        measured = f"{s['paired']:.2f}x" if s["paired"] else "n/a"
        if predicted and not row["quantized"]:
            measured += f" ({predicted:.2f}x)"
        rounds_text = f"{s['s128']:.2f}x" if s["s128"] else "n/a"
        sig = payload["significance_vs_reference"].get(name)
        lines.append([
            name, "yes" if row["quantized"] else "no", f"{row['accuracy']:.4f}",
            f"{row['accuracy'] / dense_acc:.1%}",
            f"{row['num_parameters'] / 1e6:.1f}", f"{row['onnx_mb']:.1f}",
            *("n/a" if v is None else f"{v:.2f}" for v in ort), measured, rounds_text,
            f"{s['s64']:.2f}x" if s["s64"] else "n/a", "n/a" if ds is None else f"{ds:.2f}",
            "-" if row["train_seconds"] is None else f"{row['train_seconds']:.0f}",
            "-" if sig is None else f"{sig['p_value']:.2g}",
        ])  # fmt: skip

    def best(int8: bool, speedup: float) -> dict | None:
        """The most accurate row of the kind that reaches ``speedup`` (the headline speed-up: paired
        where measured, else the medians of the rounds)."""
        fast = [
            r for r in payload["models"]
            if r["model"].startswith("ziplm") and r["quantized"] == int8
            and not r["model"].endswith(("uniform", "no-update"))
            and (speedups[r["model"]]["headline"] or 0) >= speedup
        ]  # fmt: skip
        return max(fast, key=lambda r: r["accuracy"]) if fast else None

    verdicts = []
    for label, (kind, int8) in {
        "INT8": ("int8", True), "FP32": ("fp32", False), "stretch (INT8 or FP32)": ("stretch", None),
    }.items():  # fmt: skip
        speedup, recovery = TARGETS[kind]
        candidates = [best(True, speedup), best(False, speedup)] if int8 is None else [best(int8, speedup)]
        candidates = [c for c in candidates if c]
        if not candidates:
            verdicts.append(
                f"{label}: >= {speedup:g}x at >= {recovery:.0%}: no row reaches {speedup:g}x: **missed**"
            )
            continue
        row = max(candidates, key=lambda r: r["accuracy"])
        got = row["accuracy"] / dense_acc
        s = speedups[row["model"]]
        rounds, pairs = s["s128_rounds"], s["pairs"]
        reached = f"{sum(x >= speedup for x in rounds)} of {len(rounds)} rounds"
        if pairs:
            reached += f", {sum(x >= speedup for x in pairs)} of {len(pairs)} pairs"
        verdicts.append(
            f"{label}: >= {speedup:g}x at >= {recovery:.0%}: best row {row['model']}, "
            f"{s['headline']:.2f}x, recovery {got:.1%} "
            f"({'met' if got >= recovery else f'**missed** by {recovery - got:.1%}'}); speed-up reached in "
            f"{reached}"
        )

    def prediction_errors(kind: str) -> list[tuple[str, float]]:
        errors = []
        for row in payload["models"]:
            predicted = (row.get("structure") or {}).get("predicted_speedup")
            if predicted and not row["quantized"] and speedups[row["model"]][kind]:
                errors.append((row["model"], speedups[row["model"]][kind] / predicted - 1))
        return errors

    def within_text(errors: list[tuple[str, float]]) -> str:
        within = sum(abs(e) <= 0.10 for _, e in errors)
        return f"within ±10 % for {within} of {len(errors)}: " + ", ".join(
            f"{name} {e:+.0%}" for name, e in errors
        )

    paired_note = ""
    if payload.get("paired"):
        pc = payload["paired_settings"]
        paired_note = (
            f"; paired speed-ups (the headline): dense and each row alternate in {pc['pairs']} pairs of "
            f"{pc['block_seconds']:g} s blocks (ABBA), each pair's ratio of block medians, the median over "
            "the pairs (quartiles in the JSON), so that the machine's slow spells fall on both sides"
        )
    costs = payload["costs"]
    steps = [s for values in costs["pruning_step_seconds"].values() for s in values]
    table = costs["latency_table"]
    table_load = (table.get("load_average") or [None])[0]
    trust = "trusted" if table.get("trusted") else "**not trusted** (measured under load or not adding up)"
    machine = payload.get("machine", {})
    loads = [r["load_average_1m"] for r in timings if r.get("load_average_1m") is not None]
    load_text = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "n/a"
    z = payload["ziplm"]
    stage_seconds = {r["stage"]: r["train_seconds"] or 0.0 for r in payload["models"]}
    stage_minutes = sum(stage_seconds.values()) / 60
    command = "python benchmarks/structured.py" + (" --quick" if smoke else "")
    if cfg["max_train"] != SETTINGS[mode]["max_train"]:
        command += f" --max-train {cfg['max_train'] or 0}"
    for name in ("rounds", "seconds"):
        if cfg[name] != SETTINGS[mode][name]:
            command += f" --{name} {cfg[name]:g}"
    if payload.get("paired_settings", PAIRED[mode])["pairs"] != PAIRED[mode]["pairs"]:
        command += f" --pairs {payload['paired_settings']['pairs']}"
    command += "".join(f" --skip {name}" for name in payload.get("skipped", []))
    # fmt: off
    notes = [
        f"Mode `{mode}` ({'smoke run: accuracy not meaningful' if smoke else 'measurement'}): "
        f"{slice_text(cfg)}, seq {cfg['seq']}, test accuracy on {payload['test_rows']:,} test snippets, "
        "scored with ONNX Runtime on the exported files. Teacher: "
        f"{cfg['teacher_epochs']:g} epochs. ZipLM: targets {', '.join(f'{t:g}x' for t in z['targets'])} "
        f"(FP32 latency table, ORT, {threads} threads, batch 1, seq 128), one step every "
        f"{z['update_frequency']:g} epoch(s) of distillation (logits + hidden states), "
        f"{z['recovery_epochs']:g} more after the last; each member saved before the next step; "
        f"{z['calibration']} calibration sequences. INT8 rows: {z['qat_epochs']:g} epoch(s) of QAT with "
        "distillation from each member, "
        "exported in the INT8 form `auto` picks here. Ablations: the schedule up to "
        f"{z['ablation_target']:g}x with `allocation: uniform` / `weight_update: false`.",
        f"Timings: ONNX Runtime (and DeepSparse) at batch 1, {threads} threads, median of "
        f"{cfg['seconds']:g} s "
        f"per run, the median of {cfg['rounds']} interleaved round(s){paired_note}; 1-minute load average "
        f"{load_text}. "
        f"CPU: {machine.get('cpu', 'n/a')}, flags {machine.get('cpu_flags', 'n/a')}. DeepSparse on a CPU "
        "without AVX-512 VNNI emulates INT8 (each export's `int8_choice` and the JSON's `path` fields record "
        "it).",
        "Targets (speed-up over dense FP32 on ORT, b1 s128; recovery on the test split): "
        + "; ".join(verdicts)
        + ".",
        "Predictability: measured vs predicted speed-up (FP32 rows) "
        + (
            f"paired {within_text(prediction_errors('paired'))}; from the rounds' medians "
            if payload.get("paired")
            else ""
        )
        + within_text(prediction_errors("s128"))
        + ".",
        f"Cost: building the latency table {table['seconds']:.0f} s (measured {table['measured_at']}, before "
        f"the trainings, 1-minute load {table_load if table_load is None else round(table_load, 1)}; read "
        f"from the cache afterwards; dense predicted / measured {table.get('consistency')}: {trust}); ZipLM "
        "pruning steps "
        + (f"{min(steps):.0f}-{max(steps):.0f} s each ({len(steps)} steps)" if steps else "n/a")
        + f"; training: the stages' own times sum to {stage_minutes:.0f} min, {payload['jobs']} run side by "
        f"side ({payload['train_wall_seconds'] / 60:.0f} min of wall time in the run that wrote this "
        "section; stages trained by an earlier run were reused).",
        f"p: McNemar's exact test against {REFERENCE} on the same test snippets.",
        *(
            [f"**Partial run**: stages left out ({', '.join(payload['skipped'])}); their rows are missing."]
            if payload.get("skipped")
            else []
        ),
        f"Source: `{command}`; JSON `{json_path.relative_to(ROOT)}`, plot `{png_path.relative_to(ROOT)}`.",
    ]
    # fmt: on
    markdown = "## Structured pruning to speed-up targets: MiniLM-L6 on Rotten Tomatoes\n\n"
    markdown += markdown_table(headers, lines)
    markdown += "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n\n![structured](results/structured.png)\n"
    update_results_section("structured", markdown, smoke)
    print(markdown)


if __name__ == "__main__":
    raise SystemExit(main())
