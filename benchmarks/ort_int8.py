"""ONNX Runtime latency of each INT8 form of one QAT model, against the FP32 graph of the same model.

The model is QAT-trained MiniLM-L6 (``--model DIR``: any QAT-trained text-classification folder;
default: the bundled MiniLM-L6 trained by the STOCK ``sparseml.transformers.train.text_classification``
with ``recipes/qat.yaml`` for a few dozen steps on a BBC slice). Accuracy is not the point of this
table (a short QAT run), latency and parity are.

Each form (``obert_modifiers.export.graph.INT8_FORMATS``, plus two reference rows) is exported from
the same loaded model:

* ``fp32``: the QDQ graph with every QuantizeLinear/DequantizeLinear pair removed (the same float
  graph, weights included, without quantization), the baseline of every speed-up;
* ``ort`` / ``ort-u8`` / ``integer`` / ``qdq``: what ``obert export --int8-format`` writes;
* ``ort-s8s8`` (reference): the ``ort`` rewrite with INT8 activations too;
* ``dynamic`` (reference): ORT's dynamic quantization of the FP32 graph (activation scales computed
  per call, weights re-quantized per tensor): not the QAT model's scales, so its max diff is large.

For each: max |logit difference| vs PyTorch on the parity sentences (``check_parity``), whether
the form's integer kernel is exact on this CPU, and ORT latency at batch 1, sequence 128 and 64,
2 intra-op threads, ``ORT_ENABLE_ALL``, median of per-round medians over interleaved rounds
(every form timed once per round, in turn), with the speed-up vs FP32 per round. CPU model, flags
and load average are recorded: on a shared machine the ratios are the figure to quote.

    python benchmarks/ort_int8.py                         # train 20 steps, export, time
    python benchmarks/ort_int8.py --model runs/qat-model  # a QAT-trained folder
    python benchmarks/ort_int8.py --quick                 # tiny smoke run into runs/results-quick/

Writes docs/results/ort_int8.{json,png} and the ``ort_int8`` section of docs/results.md.
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._results import (  # noqa: E402
    markdown_table,
    results_dir,
    update_results_section,
    write_json,
)

FORMS = ("fp32", "ort", "ort-u8", "integer", "qdq", "ort-s8s8", "dynamic")
REFERENCE = {
    "fp32": "QDQ pairs removed: the baseline",
    "ort-s8s8": "reference: INT8 activations",
    "dynamic": "reference: re-quantized, not QAT scales",
}


def train_qat_model(work: Path, steps_epochs: float, max_train: int, quick: bool) -> Path:
    """The bundled MiniLM-L6 (or a tiny BERT with --quick) QAT-trained by the stock script."""
    from obert_modifiers.data import prepare
    from obert_modifiers.models import minilm_l6_dir, save_tiny_bert
    from obert_modifiers.runs.stock import run_logged, train_command

    data = work / "data"
    prepare("bbc", data, max_train=max_train, max_eval=64)
    start = save_tiny_bert(work / "tiny", num_labels=5) if quick else minilm_l6_dir()
    out = work / "qat-model"
    command = train_command(
        start, data, out, ROOT / "recipes" / "qat.yaml", seq=128, batch=16, seed=42,
        recipe_args={"num_epochs": steps_epochs, "freeze_epoch": steps_epochs / 2, "init_lr": 5e-5},
        final_bin_only=True,
    )  # fmt: skip
    print(f"[ort_int8] training {out} ({' '.join(map(str, command[:3]))} ...)", flush=True)
    run_logged(command, work / "train.log", what="QAT training")
    return out


def strip_qdq(src: Path, dst: Path) -> None:
    """The FP32 graph of a QDQ file: every DequantizeLinear(QuantizeLinear(x)) replaced by x, and
    a Transpose of a constant weight stored transposed (as the FP32 exporter writes it)."""
    import onnx
    from onnx import numpy_helper

    from obert_modifiers.export.graph import _remove_dead_nodes

    model = onnx.load(str(src))
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    rename = {}
    for node in graph.node:
        source = producers.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if source is not None and source.op_type == "QuantizeLinear":
            rename[node.output[0]] = source.input[0]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    inits = {init.name: init for init in graph.initializer}
    for node in list(graph.node):
        if node.op_type == "Transpose" and node.input[0] in inits:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            array = numpy_helper.to_array(inits[node.input[0]])
            graph.initializer.append(numpy_helper.from_array(array.transpose(perm).copy(), node.output[0]))
            graph.node.remove(node)
    _remove_dead_nodes(graph)
    onnx.save(model, str(dst))


def export_forms(model_dir: Path, work: Path, sequence_length: int) -> tuple[dict, dict]:
    """Every form's ONNX file, and its parity record against PyTorch."""
    from obert_modifiers.algorithms.quantization import bake_int32_biases
    from obert_modifiers.export import check_parity, load_model
    from obert_modifiers.export.graph import export_onnx_file, qdq_to_ort_int8, rewrite_dynamic_int8
    from obert_modifiers.export.parity import INT8_KERNELS, INT8_TOLERANCES, int8_kernels_exact

    model, tokenizer, _ = load_model(model_dir)
    bake_int32_biases(model)
    paths = {form: work / f"{form}.onnx" for form in FORMS}
    for form in ("ort", "ort-u8", "integer", "qdq"):
        print(f"[ort_int8] exporting {form}", flush=True)
        export_onnx_file(model, tokenizer, paths[form], sequence_length, quantized=True, int8_format=form)
    shutil.copyfile(paths["qdq"], paths["ort-s8s8"])
    qdq_to_ort_int8(paths["ort-s8s8"], activations="s8")
    strip_qdq(paths["qdq"], paths["fp32"])
    shutil.copyfile(paths["fp32"], paths["dynamic"])
    rewrite_dynamic_int8(paths["dynamic"])
    exact = int8_kernels_exact()
    kernels = {**INT8_KERNELS, "ort-s8s8": "s8s8", "dynamic": "u8s8", "fp32": None}
    parity = {}
    for form in FORMS:
        tolerance = INT8_TOLERANCES.get(form, 1.0)
        report = check_parity(
            model, paths[form], tokenizer, quantized=form != "fp32", sequence_length=sequence_length,
            tolerance=tolerance, raise_on_failure=False,
        )  # fmt: skip
        kernel = kernels[form]
        parity[form] = {
            "max_abs_diff": report.max_abs_diff,
            "tolerance": tolerance if form in INT8_TOLERANCES else None,
            "prediction_agreement": report.prediction_agreement,
            "passed": report.passed,
            "kernel": kernel,
            "kernel_exact": exact[kernel] if kernel else None,
            "onnx_bytes": paths[form].stat().st_size,
        }
        print(f"[ort_int8] {form}: max |diff| vs PyTorch {report.max_abs_diff:.3g}", flush=True)
    return paths, parity


def time_forms(paths: dict, sequence_lengths, threads: int, rounds: int, calls: int) -> dict:
    """Interleaved rounds: per round, each form's median of ``calls`` timed calls (after warm-up)."""
    import numpy as np
    import onnxruntime as ort

    sessions = {}
    for form, path in paths.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sessions[form] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    timings = {}
    rng = np.random.default_rng(0)
    for length in sequence_lengths:
        feed_all = {
            "input_ids": rng.integers(1000, 20000, size=(1, length)).astype(np.int64),
            "attention_mask": np.ones((1, length), dtype=np.int64),
            "token_type_ids": np.zeros((1, length), dtype=np.int64),
        }
        per_round = {form: [] for form in paths}
        loads = []
        for round_index in range(rounds):
            loads.append(os.getloadavg()[0])
            for form, session in sessions.items():
                feed = {i.name: feed_all[i.name] for i in session.get_inputs()}
                for _ in range(3):
                    session.run(None, feed)
                times = []
                for _ in range(calls):
                    started = time.perf_counter()
                    session.run(None, feed)
                    times.append((time.perf_counter() - started) * 1e3)
                per_round[form].append(statistics.median(times))
            print(f"[ort_int8] s{length} round {round_index + 1}/{rounds}: "
                  + ", ".join(f"{f} {v[-1]:.1f}" for f, v in per_round.items()), flush=True)
        timings[length] = {
            form: {
                "median_ms": statistics.median(values),
                "rounds_ms": values,
                "speedup_vs_fp32": statistics.median(
                    fp32 / value for fp32, value in zip(per_round["fp32"], values, strict=True)
                ),
            }
            for form, values in per_round.items()
        }
        timings[length]["load_average_1m"] = loads
    return timings


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    forms = [f for f in FORMS if f != "fp32"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.38
    for offset, length in ((-width / 2, "128"), (width / 2, "64")):
        values = [payload["latency"][length][f]["speedup_vs_fp32"] for f in forms]
        ax.bar([i + offset for i in range(len(forms))], values, width, label=f"seq {length}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(forms)))
    ax.set_xticklabels(
        [f"{f}\n{payload['parity'][f]['max_abs_diff']:.2g}" for f in forms], fontsize=8
    )
    ax.set_ylabel("ORT speed-up vs FP32 (b1, 2 threads)")
    ax.set_title(f"INT8 forms on ONNX Runtime, {payload['cpu']['model']} (label: max |diff| vs PyTorch)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(payload: dict) -> str:
    cpu = payload["cpu"]
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu["flags"].items())
    rows = []
    for form in FORMS:
        parity = payload["parity"][form]
        exact = parity["kernel_exact"]
        rows.append([
            form + (f" ({REFERENCE[form]})" if form in REFERENCE else ""),
            f"{parity['max_abs_diff']:.2g}",
            "" if parity["kernel"] is None else f"{parity['kernel']} ({'exact' if exact else 'not exact'})",
            f"{payload['latency']['128'][form]['median_ms']:.1f}",
            f"{payload['latency']['128'][form]['speedup_vs_fp32']:.2f}x",
            f"{payload['latency']['64'][form]['median_ms']:.1f}",
            f"{payload['latency']['64'][form]['speedup_vs_fp32']:.2f}x",
        ])  # fmt: skip
    loads = payload["latency"]["128"]["load_average_1m"] + payload["latency"]["64"]["load_average_1m"]
    return "\n".join([
        "## INT8 forms on ONNX Runtime (`benchmarks/ort_int8.py`)",
        "",
        f"{payload['model']['description']}. CPU: {cpu['model']} ({flags}); ONNX Runtime "
        f"{payload['onnxruntime']}; batch 1, {payload['threads']} threads, median of {payload['rounds']} "
        f"interleaved rounds; load average {min(loads):.1f}-{max(loads):.1f} during timing (shared "
        "machine: quote the ratios). Max |diff|: largest logit difference from PyTorch on the parity "
        "sentences. ms: median over rounds of each round's median; x FP32: median of the per-round "
        "ratios (same round), so the two can disagree when the load moves. "
        "`obert export --int8-format auto` chose "
        f"**{payload['auto_choice']}** on this CPU.",
        "",
        markdown_table(
            ["form", "max diff", "integer kernel here", "ms s128", "x FP32 s128", "ms s64", "x FP32 s64"],
            rows,
        ),
        "",
        "![ORT INT8 forms](results/ort_int8.png)",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="a QAT-trained text-classification folder")
    parser.add_argument("--description", help="how --model was trained (quoted in docs/results.md)")
    parser.add_argument("--epochs", type=float, default=2.0, help="QAT epochs when training")
    parser.add_argument("--max-train", type=int, default=160, help="BBC training rows when training")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny BERT, 2 rounds: a smoke run")
    args = parser.parse_args()
    os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(name, "1")
    if args.quick:
        args.rounds, args.calls, args.max_train, args.epochs = 2, 5, 64, 1.0

    import onnxruntime

    from obert_modifiers.export.parity import int8_kernels_exact
    from obert_modifiers.latency import cpu_flags, cpu_model

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="ort-int8-") as scratch:
        work = Path(scratch)
        if args.model is None:
            model_dir = train_qat_model(work, args.epochs, args.max_train, args.quick)
            description = (
                f"{'tiny BERT' if args.quick else 'MiniLM-L6'} QAT-trained by the stock script with "
                f"recipes/qat.yaml for {args.epochs:g} epochs on {args.max_train} BBC rows (a short run: "
                "accuracy is not the point)"
            )
        else:
            model_dir = args.model.resolve()
            description = args.description or f"QAT model {model_dir.name}"
        paths, parity = export_forms(model_dir, work, 128)
        exact = int8_kernels_exact()
        auto = next(  # what `obert export --int8-format auto` keeps (export/orchestrate.py)
            f for f in ("ort", "ort-u8", "integer", "qdq")
            if parity[f]["passed"] and exact[parity[f]["kernel"]]
        )  # fmt: skip
        latency = time_forms(paths, (128, 64), args.threads, args.rounds, args.calls)
    payload = {
        "model": {"description": description, "path": str(model_dir)},
        "cpu": {"model": cpu_model(), "flags": cpu_flags(("avx2", "avx512f", "avx512_vnni", "avx_vnni"))},
        "kernels_exact": exact,
        "onnxruntime": onnxruntime.__version__,
        "threads": args.threads,
        "rounds": args.rounds,
        "calls_per_round": args.calls,
        "parity": parity,
        "latency": {str(k): v for k, v in latency.items()},
        "auto_choice": auto,
        "seconds": round(time.time() - started, 1),
    }
    payload = json.loads(json.dumps(payload))  # str keys, as read back
    json_path = write_json("ort_int8", payload, smoke=args.quick)
    png = results_dir(args.quick) / "ort_int8.png"
    plot(payload, png)
    section = update_results_section("ort_int8", markdown(payload), smoke=args.quick)
    print(markdown(payload))
    print(f"[ort_int8] wrote {json_path}, {png}, {section} in {payload['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
