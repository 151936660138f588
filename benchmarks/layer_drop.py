"""Layer drop 6 -> 3 on MiniLM-L6 / Rotten Tomatoes, with and without distillation, uniform vs importance.

Steps (every training run is SparseML's unmodified ``sparseml.transformers.train.text_classification``
in a subprocess, driven by ``recipes/``):

1. teacher: MiniLM-L6 (``obert_modifiers.models.minilm_l6_dir``) fine-tuned on Rotten Tomatoes;
2. four students from the teacher with ``recipes/layer_drop_minilm_3layer.yaml``: 3 layers chosen
   ``uniform`` or by ``importance``, trained with distillation from the teacher (``--distill_teacher
   self``) or plainly (``--distill_teacher disable``), for the same number of epochs;
3. each model exported with :func:`obert_modifiers.export.export_deployment` (ONNX parity checked),
   scored on the test split with ONNX Runtime, and timed with :func:`obert_modifiers.bench.run_benchmark`
   (ONNX Runtime, batch 1, sequence 128, 1 core; all models interleaved over ``--bench-rounds`` rounds,
   the median of the per-round medians reported, so load from other processes hits every model alike).

Writes ``docs/results/layer_drop.json``, ``docs/results/layer_drop.png`` and the ``layer_drop`` section
of ``docs/results.md``. ``--quick`` trains on a slice (minutes on 2 cores) and writes the same files to
``runs/results-quick/`` (a smoke run is not a result); the full run follows the
DATA.md reference point (2 epochs, all 10.8 k training snippets; about an hour on 2 idle cores).

    python benchmarks/layer_drop.py --quick [--work-dir DIR [--reuse]]

``--work-dir`` keeps the data, teacher and students; ``--reuse`` then skips training the teacher and
students found there (re-export, re-score and re-time only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._results import markdown_table, paired_comparison, update_results_section, write_json  # noqa: E402
from obert_modifiers.runs.evaluate import onnx_correct  # noqa: E402
from obert_modifiers.runs.stock import apply_offline_env, offline_env, run_logged, train_command  # noqa: E402

NAME = "layer_drop"
RECIPE = ROOT / "recipes" / "layer_drop_minilm_3layer.yaml"
TEACHER_RECIPE = """# dense fine-tuning of the teacher (written by benchmarks/layer_drop.py)
modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: {epochs}
  - !LearningRateFunctionModifier
    lr_func: linear
    init_lr: 5.0e-5
    final_lr: 0.0
    start_epoch: 0.0
    end_epoch: {epochs}
"""
STUDENTS = [  # (name, strategy, distil)
    ("3 layers, uniform, fine-tuned", "uniform", False),
    ("3 layers, uniform, distilled", "uniform", True),
    ("3 layers, importance, fine-tuned", "importance", False),
    ("3 layers, importance, distilled", "importance", True),
]
KEEP_FILES = (
    "config.json",
    "pytorch_model.bin",
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def train(model_dir: Path, data_dir: Path, out_dir: Path, recipe: Path, teacher: str, args, recipe_args=None):
    """One stock SparseML training run; returns (seconds, eval accuracy on the validation split)."""
    command = train_command(
        model_dir, data_dir, out_dir, recipe, seq=64, batch=16, seed=args.seed, recipe_args=recipe_args,
        teacher=teacher, evaluate=True, final_bin_only=True,
        extra=["--learning_rate", "5e-5", "--disable_tqdm", "True"],
    )  # fmt: skip
    started = time.perf_counter()
    log_path = out_dir.parent / f"{out_dir.name}.log"
    env = offline_env(args.threads)
    run_logged(command, log_path, cwd=out_dir.parent, env=env, what=f"training {out_dir.name}")
    seconds = time.perf_counter() - started
    results = json.loads((out_dir / "eval_results.json").read_text())
    return seconds, results.get("eval_accuracy")


def clean_copy(source: Path, target: Path) -> Path:
    """Weights, config and tokenizer only: SparseML would also load optimizer.pt / recipe.yaml."""
    target.mkdir(parents=True)
    for name in KEEP_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, target / name)
    return target


def measure(name: str, model_dir: Path, work: Path, test_rows: list, args, extra: dict) -> dict:
    from obert_modifiers.export import export_deployment

    log(f"{name}: export + parity check")
    result = export_deployment(
        model_dir, work / f"deploy-{len(list(work.glob('deploy-*')))}", sequence_length=128
    )
    log(f"{name}: test accuracy ({len(test_rows)} snippets, ONNX Runtime)")
    correct = onnx_correct(result.path, [text for text, _ in test_rows], [label for _, label in test_rows])
    accuracy = sum(correct) / len(correct)
    config = json.loads((model_dir / "config.json").read_text())
    row = {
        "model": name,
        "num_layers": result.num_layers,
        "layer_map": config.get("obert_layer_map"),
        "test_accuracy": accuracy,
        "test_correct": "".join("1" if c else "0" for c in correct),
        "parameters": result.num_parameters,
        "onnx_bytes": result.onnx_bytes,
        "parity_max_abs_diff": result.max_abs_diff,
        "deployment": str(result.path),
        **extra,
    }
    log(f"{name}: accuracy {accuracy:.4f}, {result.num_parameters / 1e6:.1f} M params")
    return row


def time_all(rows: list, args) -> None:
    """ONNX Runtime latency of every model, interleaved over ``args.bench_rounds`` rounds so that load
    from other processes hits all models alike; each model reports the median of its per-round
    medians (all of them are kept in the JSON): robust to a round that was lucky or unlucky."""
    from obert_modifiers.bench import run_benchmark

    for round_index in range(args.bench_rounds):
        log(f"latency round {round_index + 1}/{args.bench_rounds}: ORT, batch 1, seq 128, 1 core")
        for row in rows:
            bench = run_benchmark(
                row["deployment"], engines=("onnxruntime",), batch_size=1, sequence_length=128,
                num_cores=1, seconds=args.bench_seconds, warmup_seconds=0.5,
            )[0]  # fmt: skip
            row.setdefault("ort_medians_ms", []).append(bench.median_ms if bench.ok else None)
            row["ort_status"] = bench.status
    for row in rows:
        medians = [m for m in row["ort_medians_ms"] if m is not None]
        row["ort_median_ms"] = statistics.median(medians) if medians else None


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["model"] for r in rows]
    colors = ["#444444"] + ["#1f77b4" if "distilled" in n else "#ff7f0e" for n in names[1:]]
    left.barh(names, [r["test_accuracy"] for r in rows], color=colors)
    left.set_xlabel("test accuracy (Rotten Tomatoes)")
    low = min(r["test_accuracy"] for r in rows)
    left.set_xlim(max(0.0, low - 0.1), 1.0)
    left.invert_yaxis()
    right.barh(names, [r["ort_median_ms"] or 0 for r in rows], color=colors)
    right.set_xlabel("ONNX Runtime median latency, ms (batch 1, seq 128, 1 core)")
    right.set_yticks([])
    right.invert_yaxis()
    figure.suptitle("MiniLM-L6 -> 3 layers: layer drop with and without distillation")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="train on a slice: minutes, not an hour")
    parser.add_argument("--epochs", type=float, default=None, help="student epochs (default 2; quick 1)")
    parser.add_argument("--teacher-epochs", type=float, default=2.0, help="teacher fine-tuning epochs (2)")
    parser.add_argument(
        "--teacher",
        type=Path,
        help="use this fine-tuned MiniLM-L6 folder as the teacher (e.g. the dense stage of "
        "benchmarks/reproduce.py, trained on the same split) instead of fine-tuning one",
    )
    parser.add_argument(
        "--max-train", type=int, default=None, help="training snippets (default all; quick 1200)"
    )
    parser.add_argument(
        "--max-test", type=int, default=None, help="test snippets scored (default all; quick 400)"
    )
    parser.add_argument(
        "--bench-seconds", type=float, default=None, help="ORT timing per model (10; quick 3)"
    )
    parser.add_argument("--bench-rounds", type=int, default=5, help="interleaved timing rounds (5)")
    parser.add_argument(
        "--reuse", action="store_true", help="reuse students already trained in --work-dir (same settings)"
    )
    parser.add_argument("--threads", type=int, default=1, help="OMP threads for training (default 1)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the models here (default: temp)")
    args = parser.parse_args()
    args.epochs = args.epochs or (1.0 if args.quick else 2.0)
    args.max_train = args.max_train or (1200 if args.quick else None)
    args.max_test = args.max_test or (400 if args.quick else None)
    args.bench_seconds = args.bench_seconds or (3.0 if args.quick else 10.0)
    apply_offline_env()

    import pandas

    from obert_modifiers.data import prepare
    from obert_modifiers.models import minilm_l6_dir

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="obert-layer-drop-"))
    work.mkdir(parents=True, exist_ok=True)
    data_dir = work / "data"
    if not (args.reuse and (data_dir / "train.csv").exists()):
        prepare(
            "rt", data_dir, max_train=args.max_train, max_eval=200 if args.quick else None, seed=args.seed
        )
    test = pandas.read_csv(data_dir / "test.csv")
    if args.max_test:
        test = test.sample(n=min(args.max_test, len(test)), random_state=args.seed)
    test_rows = list(zip(test["sentence"].astype(str), test["label"].astype(str), strict=True))
    log(
        f"work dir {work}; {len(pandas.read_csv(data_dir / 'train.csv'))} training snippets, "
        f"{len(test_rows)} test"
    )

    rows = []
    teacher_recipe = work / "teacher_recipe.yaml"
    teacher_recipe.write_text(TEACHER_RECIPE.format(epochs=args.teacher_epochs))
    teacher_out = args.teacher or work / "teacher-train"
    if args.teacher:
        log(f"teacher: {args.teacher} (given)")
    elif not (args.reuse and (teacher_out / "pytorch_model.bin").exists()):
        log(f"teacher: fine-tuning MiniLM-L6 for {args.teacher_epochs} epoch(s)")
        seconds, _ = train(minilm_l6_dir(), data_dir, teacher_out, teacher_recipe, "disable", args)
        log(f"teacher: trained in {seconds:.0f} s")
    teacher = work / "teacher"
    if teacher.exists() and not args.reuse:
        shutil.rmtree(teacher)
    if not teacher.exists():
        clean_copy(teacher_out, teacher)
    rows.append(
        measure("teacher: MiniLM-L6, 6 layers", teacher, work, test_rows, args, {"train_seconds": None})
    )

    for index, (name, strategy, distil) in enumerate(STUDENTS):
        out = work / f"student-{index}"
        marker = out / "train_seconds.json"
        if args.reuse and marker.exists():
            seconds = json.loads(marker.read_text())["seconds"]
            log(f"{name}: reusing the model trained earlier in {out}")
        else:
            log(f"{name}: training {args.epochs} epoch(s)")
            seconds, _ = train(
                teacher, data_dir, out, RECIPE, "self" if distil else "disable", args,
                recipe_args={"drop_strategy": strategy, "num_epochs": args.epochs},
            )  # fmt: skip
            for leftover in ("optimizer.pt", "scheduler.pt"):
                (out / leftover).unlink(missing_ok=True)
            marker.write_text(json.dumps({"seconds": seconds}))
        extra = {"strategy": strategy, "distilled": distil, "train_seconds": round(seconds, 1)}
        rows.append(measure(name, out, work, test_rows, args, extra))

    time_all(rows, args)
    teacher_ms = rows[0]["ort_median_ms"]
    for row in rows:
        row["speedup_vs_teacher"] = (
            (teacher_ms / row["ort_median_ms"]) if teacher_ms and row["ort_median_ms"] else None
        )
    best_plain = max(r["test_accuracy"] for r in rows[1:] if not r["distilled"])
    best_distilled = max(r["test_accuracy"] for r in rows[1:] if r["distilled"])
    by_arm = {(r["strategy"], r["distilled"]): r["test_accuracy"] for r in rows[1:]}
    teacher_accuracy = rows[0]["test_accuracy"]
    correct = {(r["strategy"], r["distilled"]): [c == "1" for c in r["test_correct"]] for r in rows[1:]}
    paired = {
        strategy: paired_comparison(correct[(strategy, False)], correct[(strategy, True)])
        for strategy in ("uniform", "importance")
    }
    summary = {
        "distillation_gain": best_distilled - best_plain,
        "distillation_gain_uniform": by_arm[("uniform", True)] - by_arm[("uniform", False)],
        "distillation_gain_importance": by_arm[("importance", True)] - by_arm[("importance", False)],
        "accuracy_95ci_half_width": 1.96
        * (teacher_accuracy * (1 - teacher_accuracy) / len(test_rows)) ** 0.5,
        "paired_mcnemar": paired,  # a = fine-tuned, b = distilled, same test snippets
        "target_distillation_recovers_more": best_distilled > best_plain,
        "speedup_3_vs_6_layers": min(r["speedup_vs_teacher"] or 0 for r in rows[1:]),
        "target_speedup_1_8x": min(r["speedup_vs_teacher"] or 0 for r in rows[1:]) >= 1.8,
    }
    settings = {
        "quick": args.quick,
        "epochs": args.epochs,
        "teacher_epochs": None if args.teacher else args.teacher_epochs,
        "teacher": str(args.teacher) if args.teacher else "fine-tuned by this script",
        "train_snippets": len(pandas.read_csv(data_dir / "train.csv")),
        "test_snippets": len(test_rows),
        "max_seq_length_train": 64,
        "benchmark": (
            f"ONNX Runtime, batch 1, sequence 128, 1 core, median of {args.bench_rounds} interleaved rounds"
        ),
        "recipe": str(RECIPE.relative_to(ROOT)),
    }
    # a --quick run goes to the scratch folder, not docs/
    json_path = write_json(NAME, {"settings": settings, "summary": summary, "rows": rows}, args.quick)
    png_path = json_path.with_suffix(".png")
    plot(rows, png_path)

    headers = ["model", "layers", "test acc", "params (M)", "ONNX MB", "ORT ms", "speed-up", "train s"]
    table = markdown_table(
        headers,
        [
            [
                r["model"], r["num_layers"], round(r["test_accuracy"], 4), round(r["parameters"] / 1e6, 2),
                round(r["onnx_bytes"] / 1e6, 1), r["ort_median_ms"] and round(r["ort_median_ms"], 2),
                r["speedup_vs_teacher"] and f"{r['speedup_vs_teacher']:.2f}x", r["train_seconds"] or "-",
            ]
            for r in rows
        ],
    )  # fmt: skip
    mode = "`--quick` (a slice: " if args.quick else "full ("
    markdown = "\n".join(
        [
            "## Layer drop 6 -> 3 (MiniLM-L6, Rotten Tomatoes)",
            "",
            f"`benchmarks/layer_drop.py` {mode}{settings['train_snippets']} training snippets, "
            + (
                f"teacher `{args.teacher.name}` given (`--teacher {args.teacher}`), "
                if args.teacher
                else f"teacher {args.teacher_epochs:g} epoch(s), "
            )
            + f"students {args.epochs:g} epoch(s), "
            f"{len(test_rows)} test snippets; {settings['benchmark']}). "
            "Students start from the fine-tuned teacher, drop 3 of its 6 layers (`uniform` keeps 0, 2, 4; "
            "`importance` drops the layers whose removal changes the loss least) and train for the same "
            "epochs with distillation from the teacher (`--distill_teacher self`, hardness 1.0, T 2.0) or "
            "without (`--distill_teacher disable`). Test accuracy is measured on the exported ONNX files.",
            "",
            table,
            "",
            f"Distillation gain (best distilled - best fine-tuned): {summary['distillation_gain']:+.4f} "
            f"(uniform {summary['distillation_gain_uniform']:+.4f}, importance "
            f"{summary['distillation_gain_importance']:+.4f}); with {len(test_rows)} test snippets an "
            f"accuracy's 95 % interval is about +/-{summary['accuracy_95ci_half_width']:.3f}, so differences "
            "smaller than that are noise for two independent accuracies. Paired on the same snippets "
            "(McNemar's exact test; snippets only the distilled / only the fine-tuned student gets right): "
            + "; ".join(
                f"{k} {v['b_only']} vs {v['a_only']}, p = {v['p_value']:.3f}" for k, v in paired.items()
            )
            + ". "
            f"3-layer vs 6-layer ORT speed-up: {summary['speedup_3_vs_6_layers']:.2f}x (target >= 1.8x). "
            f"Machine load (1 min) at the end: {os.getloadavg()[0]:.1f}.",
            "",
            "![layer drop](results/layer_drop.png)",
        ]
    )
    update_results_section(NAME, markdown, args.quick)
    print(table)
    print(json.dumps(summary, indent=2))
    log(f"wrote {json_path}, {png_path} and the '{NAME}' section of docs/results.md")


if __name__ == "__main__":
    main()
