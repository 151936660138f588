"""The repo's 3-layer staged recipe on ModernBERT, on the modern stack (issue #17's ModernBERT row).

No ModernBERT checkpoint ships in a registry package these machines can install (``docs/data.md``
lists the models there: two MiniLM BERTs), so the model is a small random ``ModernBertFor
SequenceClassification`` of MiniLM-L6's depth with MiniLM's WordPiece tokenizer (ModernBERT's
``bos/eos/cls/sep/pad`` ids set to that vocabulary's). Run with the modern venv's Python:

1. ``teacher``: fine-tuned on the Rotten Tomatoes slice with ``recipes/minilm_teacher.yaml``;
2. ``3L``: ``recipes/minilm_3l_drop_prune_qat.yaml``, unchanged (layer drop 6 -> 3 with
   distillation, oBERT to 80 % with ``prune_params`` filled in with ModernBERT's default pattern by
   ``obert train``, recovery, INT8 QAT), distilled from the teacher;

both with ``obert train text-classification`` (the native adapter), then ``obert export`` (FP32 and
INT8 in the form ``auto`` picks on this CPU, parity-checked) and scored on ONNX Runtime. It measures
that the recipe runs and exports on ModernBERT; a random-init encoder trained on 2,000 snippets is not
a useful classifier, so accuracies are reported against the majority class only.

    .venv-modern/bin/python benchmarks/modernbert.py            # 2,000 training snippets
    .venv-modern/bin/python benchmarks/modernbert.py --quick    # smoke run: 128 snippets, short stages

Writes ``docs/results/modernbert.json`` and the ``modernbert`` section of ``docs/results.md``
(``--quick``: ``runs/results-quick/``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._results import machine_info, markdown_table, step_printer, update_results_section, write_json  # noqa: E402
from obert_modifiers.runs.evaluate import onnx_correct, read_split  # noqa: E402
from obert_modifiers.runs.stock import apply_offline_env, offline_env, run_logged, train_args  # noqa: E402

NAME = "modernbert"
RECIPES = ROOT / "recipes"
SETTINGS: dict[str, dict[str, Any]] = {
    "quick": dict(
        max_train=128,
        max_eval=32,
        max_test=200,
        seq=64,
        batch=16,
        seed=42,
        teacher_epochs=1.0,
        recipe_args={
            "drop_epochs": 0.5,
            "prune_epochs": 1.0,
            "recovery_epochs": 0.5,
            "qat_epochs": 0.5,
            "num_grads": 16,
        },
    ),
    "full": dict(
        max_train=2000,
        max_eval=300,
        max_test=None,
        seq=64,
        batch=16,
        seed=42,
        teacher_epochs=3.0,
        recipe_args={"num_grads": 256},
    ),
}
TEACHER_LR = 5e-4  # a random-init encoder: 10x the recipe's fine-tuning rate
SHAPE = dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=512)


def save_tiny_modernbert(out: Path, labels: list[str], seed: int) -> Path:
    """A random ModernBERT classifier of ``SHAPE`` with MiniLM-L6's tokenizer files beside it."""
    import torch
    from transformers import AutoTokenizer, ModernBertConfig, ModernBertForSequenceClassification

    from obert_modifiers.models import minilm_l6_dir

    tokenizer = AutoTokenizer.from_pretrained(minilm_l6_dir())
    config = ModernBertConfig(
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=512,
        **SHAPE,
        pad_token_id=tokenizer.pad_token_id,
        cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    torch.manual_seed(seed)
    model = ModernBertForSequenceClassification(config)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def train(name: str, obert: Path, base: Path, recipe: Path, work: Path, cfg: dict, **kw: Any) -> dict:
    out = work / name
    if out.exists():
        shutil.rmtree(out)
    extra: list[object] = ["--save_strategy", "no", "--dataloader_num_workers", 0, "--logging_steps", 50]
    args = train_args(
        base,
        work / "data",
        out,
        recipe,
        seq=cfg["seq"],
        batch=cfg["batch"],
        seed=cfg["seed"],
        evaluate=True,
        extra=extra,
        **kw,
    )
    command = [
        str(obert),
        "train",
        "text-classification",
        *[a for a in args if a != "--overwrite_output_dir"],
    ]
    print(f"[modernbert] {name}: training (log {work / f'{name}.log'})", flush=True)
    began = time.perf_counter()
    run_logged(
        command,
        work / f"{name}.log",
        step_printer(f"[modernbert] {name}"),
        cwd=work,
        env=offline_env(1),
        what=f"{name} training",
    )
    wall = time.perf_counter() - began
    results = (
        json.loads((out / "all_results.json").read_text()) if (out / "all_results.json").is_file() else {}
    )
    config = json.loads((out / "config.json").read_text())
    return {
        "model": name,
        "out": out,
        "wall_s": wall,
        "validation_accuracy": results.get("eval_accuracy"),
        "num_layers": config["num_hidden_layers"],
        "command": " ".join(command).replace(f"{ROOT}/", ""),
    }


def export(entry: dict, obert: Path, work: Path, texts: list[str], labels: list[str]) -> dict:
    from obert_modifiers.deployment import DeploymentManifest

    target = work / f"deployment-{entry['model']}"
    command = [str(obert), "export", str(entry["out"]), "--out", str(target), "--overwrite"]
    began = time.perf_counter()
    run_logged(command, work / f"export-{entry['model']}.log", cwd=work, env=offline_env(1), what="export")
    manifest = DeploymentManifest.read(target)
    correct = onnx_correct(target, texts, labels)
    return {
        "export_s": time.perf_counter() - began,
        "quantized": manifest.quantized,
        "int8_format": manifest.int8_format,
        "parity_max_abs_diff": manifest.parity.max_abs_diff,
        "num_parameters": manifest.num_parameters,
        "sparsity": manifest.sparsity.overall,
        "onnx_mb": (target / "model.onnx").stat().st_size / 1e6,
        "test_accuracy": sum(correct) / len(correct),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 128 snippets, short stages")
    parser.add_argument("--work", type=Path, help="work folder (default runs/modernbert[-quick])")
    parser.add_argument("--from-json", type=Path, help="re-render the docs section from a modernbert.json")
    args = parser.parse_args(argv)
    if args.from_json:
        report(json.loads(args.from_json.read_text()))
        return 0
    import transformers

    from obert_modifiers import data
    from obert_modifiers.latency import cpu_flags, cpu_model

    if int(transformers.__version__.split(".")[0]) < 5:
        raise SystemExit(
            "error: run with the modern venv's Python (.venv-modern/bin/python): ModernBERT "
            f"needs transformers 5, this is {transformers.__version__}"
        )
    apply_offline_env()
    mode = "quick" if args.quick else "full"
    cfg = SETTINGS[mode]
    obert = Path(sys.executable).with_name("obert")
    work = (args.work or ROOT / "runs" / f"{NAME}{'-quick' if args.quick else ''}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    info = data.prepare("rt", work / "data", max_train=cfg["max_train"], max_eval=cfg["max_eval"])
    base = save_tiny_modernbert(work / "base-model", info["labels"], cfg["seed"])
    texts, test_labels = read_split(work / "data" / "test.csv", cfg["max_test"])

    teacher = train(
        "teacher",
        obert,
        base,
        RECIPES / "minilm_teacher.yaml",
        work,
        cfg,
        recipe_args={"num_epochs": cfg["teacher_epochs"], "init_lr": TEACHER_LR},
    )
    student = train(
        "3L",
        obert,
        teacher["out"],
        RECIPES / "minilm_3l_drop_prune_qat.yaml",
        work,
        cfg,
        recipe_args=cfg["recipe_args"],
        teacher=teacher["out"],
    )
    rows = []
    for entry in (teacher, student):
        entry.update(export(entry, obert, work, texts, test_labels))
        entry["out"] = (
            str(Path(entry["out"]).relative_to(ROOT)) if Path(entry["out"]).is_relative_to(ROOT) else ""
        )
        rows.append(entry)
        print(
            f"[modernbert] {entry['model']}: test accuracy {entry['test_accuracy']:.4f}, "
            f"{entry['num_layers']} layers, parity {entry['parity_max_abs_diff']:.2g}",
            flush=True,
        )
    majority = max(test_labels.count(label) for label in set(test_labels)) / len(test_labels)
    payload = {
        "mode": mode,
        "settings": cfg,
        "shape": SHAPE,
        "rows": rows,
        "majority": majority,
        "test_rows": len(texts),
        "data": {"counts": info["counts"]},
        "machine": {
            **machine_info(),
            "cpu": cpu_model(),
            "cpu_flags": cpu_flags(),
            "transformers": transformers.__version__,
        },
    }
    report(payload)
    return 0


def report(payload: dict) -> None:
    smoke = payload["mode"] == "quick"
    json_path = write_json(NAME, payload, smoke)
    headers = [
        "model",
        "layers",
        "test acc (ORT)",
        "val acc",
        "INT8 form",
        "parity max abs diff",
        "sparsity",
        "params",
        "ONNX MB",
        "train wall s",
        "export s",
    ]
    lines = [
        [
            r["model"],
            r["num_layers"],
            f"{r['test_accuracy']:.4f}",
            f"{r['validation_accuracy']:.4f}" if r.get("validation_accuracy") is not None else "-",
            r["int8_format"] or "FP32",
            f"{r['parity_max_abs_diff']:.2g}",
            f"{r['sparsity']:.1%}",
            f"{r['num_parameters'] / 1e6:.2f} M",
            f"{r['onnx_mb']:.1f}",
            f"{r['wall_s']:.0f}",
            f"{r['export_s']:.0f}",
        ]
        for r in payload["rows"]
    ]
    machine = payload["machine"]
    shape = payload["shape"]
    cfg = payload["settings"]
    markdown = (
        "## ModernBERT through the 3-layer staged recipe (`benchmarks/modernbert.py`)\n\n"
        f"A random-init ModernBERT ({shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, "
        f"{shape['num_attention_heads']} heads, FFN {shape['intermediate_size']}; no ModernBERT checkpoint "
        "is in the registry packages these machines install, docs/data.md) with MiniLM's tokenizer, on "
        f"{payload['data']['counts'].get('train', cfg['max_train'])} Rotten Tomatoes training snippets, "
        f"seq {cfg['seq']}, batch {cfg['batch']}, one thread, transformers {machine['transformers']}. "
        f"`teacher`: `recipes/minilm_teacher.yaml`, {cfg['teacher_epochs']:g} epochs at `init_lr` "
        f"{TEACHER_LR:g} (random init); `3L`: "
        "`recipes/minilm_3l_drop_prune_qat.yaml` unchanged but for `--recipe_args "
        f"'{json.dumps(cfg['recipe_args'])}'`, distilled from the teacher, ModernBERT's default "
        "`prune_params` filled in by `obert train`. Both trained with `obert train text-classification` "
        "(native adapter) "
        "and exported with `obert export` (parity checked on this CPU); test accuracy on ONNX Runtime over "
        f"{payload['test_rows']} test snippets (majority class {payload['majority']:.3f}). What it shows: "
        "the staged recipe (drop 6 -> 3, oBERT 80 %, QAT) runs and exports on ModernBERT; the accuracy of an "
        "encoder trained from scratch on this slice says nothing about the method.\n\n"
        + markdown_table(headers, lines)
        + "".join(f"\n\n{note}" for note in payload.get("notes", []))  # recorded beside the figures
        + f"\n\nCPU: {machine['cpu']}, flags {machine['cpu_flags']}. "
        + f"Figures: `{json_path.relative_to(ROOT)}`.\n"
    )
    update_results_section(NAME, markdown, smoke)


if __name__ == "__main__":
    raise SystemExit(main())
