"""One oBERT pruning step at BERT-base shape: ours vs SparseML's OBSPruningModifier, side by side.

Both modifiers are applied one-shot by SparseML's own ``ScheduledModifierManager`` to the same
random BERT-base-shaped model (``BertConfig()``: 12 layers, hidden 768) with the same gradients
(same deterministic batches), ``fisher_block_size``, ``damp`` and target sparsity. Each runs in its
own subprocess so peak memory is measured cleanly: the step's extra peak RSS is ``VmHWM`` (reset via
``/proc/self/clear_refs`` just before the step) minus ``VmRSS`` before it, both taken after one
warm-up forward/backward of the model (as in training, where a pruning step follows training
steps). A third run uses our ``memory_budget_gb`` at a quarter of our default run's extra peak; its
extra peak should stay under that budget.

The pruned parameters are the six encoder linears of the first ``--layers`` layers (BERT-base has
85 M such weights; at ``fisher_block_size`` 50 SparseML needs 17 GB for them, more than this
2-core machine can spare, so the default is 1 layer = 7.1 M weights, and 256 gradients instead of
the published 1024, for a run of about 15 minutes on 2 shared cores). Our Fisher work has a fixed
part per step (O(d*B^2) inversion and update) and SparseML's grows with every gradient (O(d*B) per
gradient), so the time ratio falls as num_grads grows: about 0.65 at 64 gradients here.

    python benchmarks/obs_step.py                    # 1 layer, 256 grads, B=50, 50 % target
    python benchmarks/obs_step.py --layers 12 --num-grads 64

The last line is ``time_ratio=<ours/sparseml> mem_ratio=<ours/sparseml> mask_agreement=<fraction>``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PARAMS = (
    "re:bert.encoder.layer.({layers}).(attention.self.(query|key|value)|attention.output.dense|"
    "intermediate.dense|output.dense).weight"
)
RECIPE = """
modifiers:
  - !{tag}
    params: ["{params}"]
    init_sparsity: {sparsity}
    final_sparsity: {sparsity}
    start_epoch: 0.0
    end_epoch: 1.0
    update_frequency: 1.0
    num_grads: {num_grads}
    damp: {damp}
    fisher_block_size: {block_size}
    mask_type: {mask_type}
    global_sparsity: true
{extra}"""


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def worker(args: argparse.Namespace) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    from sparseml.pytorch.optim import ScheduledModifierManager
    from transformers import BertConfig, BertForSequenceClassification

    import obert_modifiers  # noqa: F401  (registers !OBertPruningModifier)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = BertConfig(num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 30000, (args.num_grads * args.batch, args.seq_len), generator=generator)
    labels = torch.randint(0, 2, (args.num_grads * args.batch,), generator=generator)

    def builder(kwargs):
        while True:
            for i in range(0, ids.shape[0], args.batch):
                yield [], {"input_ids": ids[i : i + args.batch], "labels": labels[i : i + args.batch]}, None

    sampler = {"data_loader_builder": builder, "loss_function": lambda outputs, target: outputs.loss}
    layers = "|".join(str(i) for i in range(args.layers))
    params = PARAMS.format(layers=layers)
    result: dict = {"impl": args.worker}
    if args.worker == "grads":  # forward/backward only: the part both implementations share
        from sparseml.pytorch.utils import GradSampler

        model.eval()
        begin = time.perf_counter()
        for _ in GradSampler(builder(None), sampler["loss_function"]).iter_module_backwards(
            model, args.num_grads, progress_bar=False
        ):
            pass
        result["seconds"] = time.perf_counter() - begin
        Path(args.out).write_text(json.dumps(result))
        return
    tag = "OBSPruningModifier" if args.worker == "sparseml" else "OBertPruningModifier"
    extra = f"    memory_budget_gb: {args.budget_gb}\n" if args.worker == "ours-budget" else ""
    recipe = RECIPE.format(
        tag=tag,
        params=params,
        sparsity=args.sparsity,
        num_grads=args.num_grads,
        damp=args.damp,
        block_size=args.block_size,
        mask_type=args.mask_type,
        extra=extra,
    )
    manager = ScheduledModifierManager.from_yaml(recipe)
    # one forward/backward first, as training has done before any pruning step: the model's first
    # pass allocates once-per-process memory (kernel workspaces, library pages; ~50 MB here) that
    # belongs to training, not to the pruning step. Same for every implementation.
    import gc

    before_warmup_kb = _status_kb("VmRSS")
    model.eval()
    model(input_ids=ids[: args.batch], labels=labels[: args.batch]).loss.backward()
    model.zero_grad(set_to_none=True)
    gc.collect()
    baseline_kb = _status_kb("VmRSS")
    result["warmup_retained_gb"] = (baseline_kb - before_warmup_kb) / 2**20
    result["peak_reset"] = _reset_peak()
    begin = time.perf_counter()
    manager.apply(model, grad_sampler=sampler)
    result["seconds"] = time.perf_counter() - begin
    result["step_peak_gb"] = (_status_kb("VmHWM") - baseline_kb) / 2**20
    result["process_peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    from sparseml.pytorch.utils import get_named_layers_and_params_by_regex

    named = get_named_layers_and_params_by_regex(model, [params])
    masks = {f"{n.layer_name}.{n.param_name}": (n.param.detach() == 0) for n in named}
    result["num_weights"] = sum(m.numel() for m in masks.values())
    result["sparsity"] = sum(int(m.sum()) for m in masks.values()) / result["num_weights"]
    if tag == "OBertPruningModifier":
        stats = manager.modifiers[0].last_stats
        result.update(
            grad_seconds=stats.grad_seconds,
            fisher_seconds=stats.fisher_seconds,
            inverse_seconds=stats.inverse_seconds,
            score_seconds=stats.score_seconds,
            update_seconds=stats.update_seconds,
            num_groups=stats.num_groups,
            state_gb=stats.state_bytes / 2**30,
            estimate_gb=stats.estimate_bytes / 2**30,
        )
    torch.save(masks, args.out + ".masks")
    Path(args.out).write_text(json.dumps(result))


def run_worker(kind: str, args: argparse.Namespace, tmp: str, budget_gb: float = 0.0) -> dict:
    out = os.path.join(tmp, f"{kind}.json")
    command = [sys.executable, __file__, "--worker", kind, "--out", out, "--budget-gb", str(budget_gb)]
    for key in (
        "layers",
        "num_grads",
        "block_size",
        "damp",
        "sparsity",
        "mask_type",
        "seq_len",
        "batch",
        "threads",
    ):
        command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    from obert_modifiers.runs.stock import offline_env

    env = offline_env(args.threads)
    print(f"[obs_step] running {kind} ...", flush=True)
    subprocess.run(command, check=True, env=env, cwd=tmp)
    return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--layers", type=int, default=1, help="prune the linears of the first N encoder layers"
    )
    parser.add_argument("--num-grads", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=50)
    parser.add_argument("--damp", type=float, default=1e-7)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--mask-type", default="unstructured")
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-budget", action="store_true", help="skip the memory-budget run")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write docs/results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--budget-gb", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    with tempfile.TemporaryDirectory(prefix="obs-step-") as tmp:
        grads = run_worker("grads", args, tmp)
        sparseml = run_worker("sparseml", args, tmp)
        ours = run_worker("ours", args, tmp)
        budget = None
        if not args.no_budget:
            budget_gb = ours["step_peak_gb"] / 4
            budget = run_worker("ours-budget", args, tmp, budget_gb=budget_gb)
            budget["budget_gb"] = budget_gb
        theirs_masks = torch.load(os.path.join(tmp, "sparseml.json.masks"))
        our_masks = torch.load(os.path.join(tmp, "ours.json.masks"))
        agree = sum(int((theirs_masks[n] == our_masks[n]).sum()) for n in our_masks)
        agreement = agree / sum(m.numel() for m in our_masks.values())
        if budget is not None:
            budget_masks = torch.load(os.path.join(tmp, "ours-budget.json.masks"))
            same = sum(int((budget_masks[n] == our_masks[n]).sum()) for n in our_masks)
            budget["agreement_with_default"] = same / sum(m.numel() for m in our_masks.values())

    time_ratio = ours["seconds"] / sparseml["seconds"]
    mem_ratio = ours["step_peak_gb"] / sparseml["step_peak_gb"]
    shared = grads["seconds"]
    rows = [
        [
            "SparseML OBSPruningModifier",
            sparseml["seconds"],
            sparseml["seconds"] - shared,
            sparseml["step_peak_gb"],
            sparseml["process_peak_gb"],
            sparseml["sparsity"],
            "-",
        ],
        [
            "ours (default)",
            ours["seconds"],
            ours["seconds"] - shared,
            ours["step_peak_gb"],
            ours["process_peak_gb"],
            ours["sparsity"],
            f"{ours['state_gb']:.3g} GB Fisher state, planned {ours['estimate_gb']:.3g} GB",
        ],
    ]
    if budget is not None:
        rows.append(
            [
                f"ours, memory_budget_gb={budget['budget_gb']:.3g}",
                budget["seconds"],
                budget["seconds"] - shared,
                budget["step_peak_gb"],
                budget["process_peak_gb"],
                budget["sparsity"],
                f"{budget['num_groups']} groups, planned {budget['estimate_gb']:.3g} GB, "
                f"peak {'<=' if budget['step_peak_gb'] <= budget['budget_gb'] else '> !'} budget, "
                f"masks = default: {budget['agreement_with_default']:.4f}",
            ]
        )
    from benchmarks._results import machine_info, markdown_table

    headers = [
        "implementation",
        "step s",
        "step s minus fwd/bwd",
        "step extra peak GB",
        "process peak GB",
        "sparsity",
        "notes",
    ]
    table = markdown_table(headers, rows)
    settings = (
        f"BERT-base shape (BertConfig 12x768, random weights), pruning the 6 linears of the first "
        f"{args.layers} encoder layer(s) = {ours['num_weights'] / 1e6:.1f} M weights, "
        f"num_grads={args.num_grads} (batch {args.batch} x seq {args.seq_len}), "
        f"fisher_block_size={args.block_size}, damp={args.damp:g}, "
        f"mask_type={args.mask_type}, global target {args.sparsity}, {args.threads} thread(s). "
        f"Forward/backward for the {args.num_grads} gradients alone: {shared:.2f} s. "
        f"Extra peak = peak RSS during the step minus RSS before it, measured after one warm-up "
        f"forward/backward of the model (which itself kept {ours['warmup_retained_gb'] * 1024:.0f} MB)."
    )
    breakdown = (
        f"ours: gradients {ours['grad_seconds']:.2f} s, Fisher accumulation {ours['fisher_seconds']:.2f} s, "
        f"inverse {ours['inverse_seconds']:.2f} s, scores {ours['score_seconds']:.2f} s, "
        f"OBS update {ours['update_seconds']:.2f} s"
    )
    if budget is not None:
        breakdown += (
            f"; with the budget: gradients {budget['grad_seconds']:.2f} s ({budget['num_groups']} sets of "
            f"passes), Fisher accumulation {budget['fisher_seconds']:.2f} s, inverse "
            f"{budget['inverse_seconds']:.2f} s, scores {budget['score_seconds']:.2f} s, OBS update "
            f"{budget['update_seconds']:.2f} s"
        )
    print()
    print(settings)
    print(table)
    print(breakdown)
    if not args.no_write:
        from benchmarks._results import update_results_section, write_json

        payload = {
            "settings": vars(args),
            "grads_only": grads,
            "sparseml": sparseml,
            "ours": ours,
            "ours_budget": budget,
            "time_ratio": time_ratio,
            "mem_ratio": mem_ratio,
            "mask_agreement": agreement,
        }
        write_json("obs_step", payload)
        _plot(rows)
        machine = machine_info()
        update_results_section(
            "obs_step",
            "## One oBERT pruning step: ours vs SparseML (`benchmarks/obs_step.py`)\n\n"
            f"{settings}\n\n{table}\n\n{breakdown}.\n\n"
            '"step s minus fwd/bwd" subtracts the full-model forward/backward time measured alone; ours '
            "computes weight gradients only for the pruned layers, which is why its figure can be small or "
            "negative. `memory_budget_gb` bounds the step's extra peak: the planner charges the Fisher "
            "state, gradient buffers, weight gradients, scores of all weights, mask selection and the "
            "batched workspaces against 90 % of the budget (10 % is left for the gradient passes' "
            "activations and allocator slack), splitting parameters at Fisher-block boundaries into "
            "groups; each group beyond the first costs one more set of `num_grads` gradient passes "
            "(see docs/obert.md). Timings come from a 2-core machine shared with other jobs (load in "
            "the last line): seconds and time_ratio move between runs (the forward/backward-alone "
            "figure shows how loaded the machine was); peak memory does not depend on load.\n\n"
            f"time_ratio={time_ratio:.3f} mem_ratio={mem_ratio:.3f} mask_agreement={agreement:.4f} "
            f"(targets: <= 0.5, <= 1.0, >= 0.99). Machine: {machine['cpu_count']} CPUs, load "
            f"{machine['load_average_1m']:.2f} at {machine['date']}.\n\n![obs_step](results/obs_step.png)",
        )
    print(f"time_ratio={time_ratio:.3f} mem_ratio={mem_ratio:.3f} mask_agreement={agreement:.4f}")


def _plot(rows: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks._results import RESULTS_DIR

    names = [r[0].replace(", ", "\n") for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.bar(names, [r[1] for r in rows], color=["#888", "#2a7", "#27a"][: len(rows)])
    left.set_ylabel("seconds per pruning step")
    right.bar(names, [r[3] for r in rows], color=["#888", "#2a7", "#27a"][: len(rows)])
    right.set_ylabel("extra peak memory (GB)")
    for axis in (left, right):
        axis.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS_DIR / "obs_step.png.tmp"
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, RESULTS_DIR / "obs_step.png")


if __name__ == "__main__":
    main()
