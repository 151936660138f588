"""Accuracy vs sparsity: MiniLM-L6 fine-tuned on Rotten Tomatoes, dense vs SparseML's GMP vs oBERT.

Every run is the stock ``sparseml.transformers.train.text_classification`` console script on the
same data, epochs, learning-rate schedule and pruning schedule; the pruned runs differ only in the
pruning modifier (``!GMPruningModifier`` vs ``!OBertPruningModifier``, same params, init/final
sparsity, start/end epoch, update frequency, cubic interpolation, global sparsity). Test accuracy is
computed on the fixed test split (1,913 snippets) from the saved model.

    python benchmarks/accuracy_vs_sparsity.py            # full: hours on 2 cores
    python benchmarks/accuracy_vs_sparsity.py --quick    # smoke run: tiny slice, 1 epoch, minutes

Writes ``docs/results/accuracy_vs_sparsity.{json,png}`` and the ``accuracy_vs_sparsity`` section
of ``docs/results.md``; ``--quick`` writes the same files to ``runs/results-quick/`` (a smoke run is
not a result and never overwrites one).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PARAMS = (
    "re:bert.encoder.layer.*.(attention.self.(query|key|value)|attention.output.dense|"
    "intermediate.dense|output.dense).weight"
)

TEMPLATE = """
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
{pruning}"""

PRUNING = """pruning_modifiers:
  - !{tag}
    params: ["{params}"]
    init_sparsity: {init_sparsity}
    final_sparsity: {final_sparsity}
    start_epoch: {start}
    end_epoch: {end}
    update_frequency: {frequency}
    inter_func: cubic
    leave_enabled: true
{extra}"""

OBERT_EXTRA = """    global_sparsity: true
    mask_type: unstructured
    num_grads: {num_grads}
    damp: {damp}
    fisher_block_size: {block_size}
    grad_sampler_kwargs:
      batch_size: {grad_batch}
"""


def make_recipe(method: str, sparsity: float, args: argparse.Namespace) -> str:
    if method == "dense":
        pruning = ""
    else:
        extra = (
            OBERT_EXTRA.format(
                num_grads=args.num_grads,
                damp=args.damp,
                block_size=args.block_size,
                grad_batch=args.grad_batch,
            )
            if method == "obert"
            else "    global_sparsity: true\n"
        )
        pruning = PRUNING.format(
            tag="OBertPruningModifier" if method == "obert" else "GMPruningModifier",
            params=PARAMS,
            init_sparsity=args.init_sparsity,
            final_sparsity=sparsity,
            start=args.prune_start,
            end=args.prune_end,
            frequency=args.update_frequency,
            extra=extra,
        )
    return TEMPLATE.format(epochs=args.epochs, lr=args.lr, pruning=pruning)


def test_accuracy(model_dir: Path, test_csv: Path, max_length: int) -> float:
    import pandas as pd
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    frame = pd.read_csv(test_csv)
    label2id = {str(k): int(v) for k, v in model.config.label2id.items()}
    correct = 0
    with torch.no_grad():
        for start in range(0, len(frame), 64):
            batch = frame.iloc[start : start + 64]
            inputs = tokenizer(
                list(batch["sentence"].astype(str)),
                truncation=True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            )
            predicted = model(**inputs).logits.argmax(-1).tolist()
            correct += sum(
                int(p == label2id[str(label)]) for p, label in zip(predicted, batch["label"], strict=False)
            )
    return correct / len(frame)


def encoder_sparsity(model_dir: Path) -> float:
    import torch

    state = torch.load(model_dir / "pytorch_model.bin", map_location="cpu")
    suffixes = ("query.weight", "key.weight", "value.weight", "dense.weight")
    weights = [v for k, v in state.items() if "encoder.layer" in k and k.endswith(suffixes)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def run(method: str, sparsity: float, args: argparse.Namespace, data_dir: Path, work: Path) -> dict:
    from obert_modifiers.models import minilm_l6_dir
    from obert_modifiers.runs.stock import offline_env, train_command

    name = "dense" if method == "dense" else f"{method}{int(round(sparsity * 100))}"
    out = work / name
    done = work / f"{name}.json"  # a finished run (with --keep, a rerun reuses it)
    recipe_text = make_recipe(method, sparsity, args)
    if done.is_file() and (out / "pytorch_model.bin").is_file():
        row = json.loads(done.read_text())
        if row.get("recipe") == recipe_text:
            row.pop("recipe")
            print(f"[accuracy_vs_sparsity] reusing {name}: {json.dumps(row)}", flush=True)
            return row
    recipe = work / f"{name}.yaml"
    recipe.write_text(recipe_text)
    command = train_command(
        minilm_l6_dir(), data_dir, out, recipe, seq=args.seq_len, batch=args.batch_size, seed=args.seed,
        logging_steps=50, final_bin_only=True, extra=["--learning_rate", args.lr],
    )  # fmt: skip
    env = offline_env(args.threads)
    print(f"[accuracy_vs_sparsity] training {name} ...", flush=True)
    begin = time.perf_counter()
    with open(work / f"{name}.log", "w") as log:
        result = subprocess.run(command, env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - begin
    if result.returncode != 0:
        tail = (work / f"{name}.log").read_text()[-3000:]
        raise RuntimeError(f"training {name} failed (exit {result.returncode}):\n{tail}")
    accuracy = test_accuracy(out, data_dir / "test.csv", args.seq_len)
    row = {
        "run": name,
        "method": method,
        "target_sparsity": sparsity,
        "sparsity": encoder_sparsity(out),
        "test_accuracy": accuracy,
        "train_seconds": seconds,
    }
    print(f"[accuracy_vs_sparsity] {json.dumps(row)}", flush=True)
    done.write_text(json.dumps({**row, "recipe": recipe_text}))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 256 training rows, 1 epoch, 8 grads")
    parser.add_argument("--sparsities", default="0.8,0.9")
    parser.add_argument(
        "--methods", default="gmp,obert", help="pruning runs to do (several processes can share --keep)"
    )
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--prune-start", type=float, default=0.5)
    parser.add_argument("--prune-end", type=float, default=2.0)
    parser.add_argument("--update-frequency", type=float, default=0.25)
    parser.add_argument("--init-sparsity", type=float, default=0.3)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--num-grads", type=int, default=64)
    parser.add_argument("--grad-batch", type=int, default=16)
    parser.add_argument("--damp", type=float, default=1e-7)
    parser.add_argument("--block-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per training run")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--max-eval", type=int, default=None)
    parser.add_argument("--keep", help="keep trained models and logs in this folder")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.prune_start, args.prune_end, args.update_frequency = 1.0, 0.0, 0.5, 0.25
        args.num_grads, args.grad_batch, args.seq_len = 8, 8, 32
        args.max_train, args.max_eval = args.max_train or 256, args.max_eval or 128
    sparsities = [float(s) for s in args.sparsities.split(",")]

    from obert_modifiers.data import prepare

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="acc-vs-sparsity-"))
    work.mkdir(parents=True, exist_ok=True)
    data_dir = work / "data"
    prepare("rt", data_dir, max_train=args.max_train, max_eval=args.max_eval, seed=args.seed)
    rows = []
    try:
        rows.append(run("dense", 0.0, args, data_dir, work))
        for sparsity in sparsities:
            for method in args.methods.split(","):
                rows.append(run(method, sparsity, args, data_dir, work))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if sorted(args.methods.split(",")) != ["gmp", "obert"]:
        print("[accuracy_vs_sparsity] partial run (--methods): no report; rerun with both methods and --keep")
        return
    report(rows, args, sparsities)


def report(rows: list, args: argparse.Namespace, sparsities: list) -> None:
    from benchmarks._results import markdown_table, update_results_section, write_json

    dense = next(r for r in rows if r["method"] == "dense")["test_accuracy"]
    for row in rows:
        row["recovery"] = row["test_accuracy"] / dense if dense else None
    name, smoke = "accuracy_vs_sparsity", args.quick  # a smoke run goes to the scratch folder, not docs/
    by = {(r["method"], r["target_sparsity"]): r for r in rows}
    verdicts = {s: by[("obert", s)]["test_accuracy"] > by[("gmp", s)]["test_accuracy"] for s in sparsities}
    write_json(name, {"settings": vars(args), "runs": rows, "obert_beats_gmp": verdicts}, smoke)
    _plot(rows, sparsities, dense, name, smoke)
    headers = ["run", "method", "encoder sparsity", "test accuracy", "recovery vs dense", "train s"]
    table = markdown_table(
        headers,
        [
            [
                r["run"],
                r["method"],
                r["sparsity"],
                r["test_accuracy"],
                r["recovery"],
                round(r["train_seconds"]),
            ]
            for r in rows
        ],
    )
    mode = (
        "QUICK SMOKE RUN (tiny slice, 1 epoch: the figures say nothing about quality)"
        if args.quick
        else "full run"
    )
    settings = (
        f"{mode}. MiniLM-L6 (all-MiniLM-L6-v2 + new classification head), Rotten Tomatoes "
        f"(`obert data prepare rt`, max_train={args.max_train}, max_eval={args.max_eval}), "
        f"{args.epochs} epochs, lr {args.lr} linear to 0, "
        f"batch {args.batch_size}, seq {args.seq_len}; pruning of the 36 encoder linears from "
        f"{args.init_sparsity} at epoch {args.prune_start} to the target at epoch {args.prune_end} every "
        f"{args.update_frequency} epochs (cubic, global); oBERT: num_grads={args.num_grads}, "
        f"fisher_block_size={args.block_size}, damp={args.damp:g}."
    )
    lines = [f"oBERT beats GMP at {s:.0%}: {'yes' if v else 'NO'}" for s, v in verdicts.items()]
    if ("obert", 0.8) in by:
        lines.append(f"oBERT recovery at 80 %: {by[('obert', 0.8)]['recovery']:.3f} of dense accuracy")
    title = (
        "Accuracy vs sparsity (quick smoke run)"
        if args.quick
        else "Accuracy vs sparsity: dense vs GMP vs oBERT"
    )
    update_results_section(
        name,
        f"## {title} (`benchmarks/accuracy_vs_sparsity.py`)\n\n{settings}\n\n{table}\n\n"
        + "; ".join(lines)
        + f".\n\n![{name}](results/{name}.png)",
        smoke,
    )
    print(table)
    print("; ".join(lines))


def _plot(rows: list, sparsities: list, dense: float, name: str, smoke: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks._results import results_dir

    fig, axis = plt.subplots(figsize=(5.5, 3.6))
    for method, color in (("gmp", "#888"), ("obert", "#2a7")):
        points = [(r["target_sparsity"], r["test_accuracy"]) for r in rows if r["method"] == method]
        axis.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            "o-",
            color=color,
            label="SparseML GMP" if method == "gmp" else "oBERT (ours)",
        )
    axis.axhline(dense, color="#27a", linestyle="--", label="dense")
    axis.set_xlabel("encoder sparsity")
    axis.set_ylabel("test accuracy")
    axis.set_xticks(sparsities)
    axis.legend()
    fig.tight_layout()
    folder = results_dir(smoke)
    tmp = folder / f"{name}.png.tmp"
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, folder / f"{name}.png")


if __name__ == "__main__":
    main()
