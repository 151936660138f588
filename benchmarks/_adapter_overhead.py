"""The native adapter's cost outside pruning steps: a plain ``transformers.Trainer`` step against a
``RecipeTrainer`` step on the same model, data and seed (run by ``benchmarks/adapters.py`` in the
modern venv, as a subprocess: it imports transformers 5 and ``obert_modifiers.native``).

The recipe keeps every modifier active without a pruning step in the timed window: a
``!ConstantPruningModifier`` on the encoder's linear weights (masks made at step 0, re-applied after
every optimizer step, gradients of pruned weights zeroed before it) and a
``!LearningRateFunctionModifier`` (the rate set before every step), over far more epochs than the run
lasts. After ``--warmup-runs`` untimed runs of each side, each repetition builds a fresh model and
trainer and runs ``warmup + steps`` optimizer steps; a step's time is the interval between two
``on_step_end`` events (data, forward, backward, the recipe's hooks, the optimizer and the scheduler).
Repetitions alternate plain/native in ABBA order so a slow spell of a shared machine falls on both.

    python benchmarks/_adapter_overhead.py --model DIR --train-csv data/train.csv --out overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

OVERHEAD_RECIPE = """# by benchmarks/_adapter_overhead.py: active modifiers, no pruning step in the window
num_epochs: {epochs}
modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: eval(num_epochs)
  - !LearningRateFunctionModifier
    lr_func: linear
    init_lr: {lr}
    final_lr: 0.0
    start_epoch: 0.0
    end_epoch: eval(num_epochs)
  - !ConstantPruningModifier
    params: {params}
    start_epoch: 0.0
    end_epoch: eval(num_epochs)
"""


def abba_order(repetitions: int) -> list[str]:
    """``plain, native, native, plain, plain, native, ...``: ``repetitions`` runs of each, every pair
    in the opposite order of the last one, so a linear drift in the machine's speed cancels."""
    order: list[str] = []
    for index in range(repetitions):
        pair = ["plain", "native"] if index % 2 == 0 else ["native", "plain"]
        order += pair
    return order


def overhead_summary(step_seconds: dict[str, list[list[float]]]) -> dict:
    """Median step time of each side (median of the repetitions' medians) and the overhead
    native / plain - 1; also per repetition (the two runs of one ABBA pair, minutes apart)."""
    medians = {side: [statistics.median(run) for run in runs] for side, runs in step_seconds.items()}
    plain, native = statistics.median(medians["plain"]), statistics.median(medians["native"])
    pairs = [n / p - 1 for p, n in zip(medians["plain"], medians["native"], strict=True)]
    return {
        "plain_median_s": plain,
        "native_median_s": native,
        "overhead": native / plain - 1,
        "overhead_per_repetition": pairs,
        "repetition_medians_s": medians,
    }


def _dataset(model_dir: str, train_csv: Path, seq: int):
    from transformers import AutoTokenizer

    from obert_modifiers.data import read_csv
    from obert_modifiers.native.train import Features

    rows = read_csv(train_csv)
    labels = sorted({label for _, label in rows})
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoded = dict(tokenizer([t for t, _ in rows], truncation=True, max_length=seq, padding="max_length"))
    encoded["labels"] = [labels.index(label) for _, label in rows]
    return Features(encoded), labels, tokenizer


def _run(side: str, args, dataset, labels, tokenizer, recipe: Path) -> list[float]:
    import torch
    from transformers import AutoModelForSequenceClassification, Trainer, TrainerCallback, TrainingArguments
    from transformers import logging as hf_logging

    from obert_modifiers.native import RecipeTrainer

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_begin(self, *_, **__):
            self.ends.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            self.ends.append(time.perf_counter())

    torch.manual_seed(args.seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" on a bare encoder: expected
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )  # fmt: skip
    hf_logging.set_verbosity(verbosity)
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps,
            learning_rate=args.lr, seed=args.seed, report_to="none", save_strategy="no",
            logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, use_cpu=True,
        )  # fmt: skip
        clock = StepClock()
        common = dict(model=model, args=training, train_dataset=dataset, processing_class=tokenizer)
        if side == "plain":
            trainer = Trainer(**common, callbacks=[clock])
        else:
            trainer = RecipeTrainer(recipe=recipe, **common, callbacks=[clock])
        trainer.train()
    steps = [b - a for a, b in zip(clock.ends, clock.ends[1:], strict=False)]
    if len(steps) != args.warmup + args.steps:
        raise RuntimeError(f"{side}: timed {len(steps)} steps, expected {args.warmup + args.steps}")
    return steps[args.warmup :]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder (a bare encoder gets a new head)")
    parser.add_argument("--train-csv", type=Path, required=True, help="prepared train.csv")
    parser.add_argument("--out", type=Path, required=True, help="JSON to write")
    parser.add_argument("--steps", type=int, default=40, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps first")
    parser.add_argument("--repetitions", type=int, default=4, help="runs of each side (ABBA order)")
    parser.add_argument("--warmup-runs", type=int, default=1, help="untimed runs of each side first")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--lr", type=float, default=8e-5)
    args = parser.parse_args(argv)

    import torch
    import transformers
    from transformers import AutoConfig

    from obert_modifiers.native.families import default_prune_params

    threads = int(os.environ.get("OMP_NUM_THREADS", "1") or 1)
    torch.set_num_threads(threads)
    dataset, labels, tokenizer = _dataset(args.model, args.train_csv, args.seq)
    params = default_prune_params(AutoConfig.from_pretrained(args.model))
    steps_per_epoch = -(-len(dataset) // args.batch)
    epochs = float(max(10, 10 * -(-(args.warmup + args.steps) // steps_per_epoch)))  # never ends in the run
    text = OVERHEAD_RECIPE.format(epochs=epochs, lr=args.lr, params=json.dumps(params))
    step_seconds: dict[str, list[list[float]]] = {"plain": [], "native": []}
    with tempfile.TemporaryDirectory() as folder:
        recipe = Path(folder) / "overhead.yaml"
        recipe.write_text(text)
        for side in ("plain", "native") * args.warmup_runs:  # first-run costs (allocator, lazy imports)
            _run(side, args, dataset, labels, tokenizer, recipe)
        for index, side in enumerate(abba_order(args.repetitions)):
            began = time.perf_counter()
            steps = _run(side, args, dataset, labels, tokenizer, recipe)
            step_seconds[side].append(steps)
            print(
                f"[overhead] run {index + 1}/{2 * args.repetitions} {side:6s}: median step "
                f"{statistics.median(steps) * 1e3:.1f} ms ({time.perf_counter() - began:.0f} s, "
                f"load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
    payload = {
        **overhead_summary(step_seconds),
        "step_seconds": step_seconds,
        "order": abba_order(args.repetitions),
        "recipe": text,
        "settings": {
            "steps": args.steps,
            "warmup": args.warmup,
            "repetitions": args.repetitions,
            "warmup_runs": args.warmup_runs,
            "seq": args.seq,
            "batch": args.batch,
            "seed": args.seed,
            "lr": args.lr,
            "threads": threads,
            "train_rows": len(dataset),
            "model": args.model,
        },  # fmt: skip
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
