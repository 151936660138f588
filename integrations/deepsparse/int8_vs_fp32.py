"""Is the INT8 export faster than the FP32 export of the same model on DeepSparse? A quick check
without training: MiniLM-L6 (bundled) gets !OBertQuantizationModifier applied through SparseML's
manager, its observers calibrate on a few real sentences, and both versions are exported with
`obert export` and timed with `obert benchmark`'s engine loop.

    python integrations/deepsparse/int8_vs_fp32.py [--out runs/int8-vs-fp32] [--cores 2] [--seconds 5]

The classifier head is random (no fine-tuning), so only the speed is meaningful here.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

RECIPE = """
modifiers:
  - !OBertQuantizationModifier
    start_epoch: 0.0
    freeze_observer_epoch: 1.0
"""

CALIBRATION = [
    "A gripping, beautifully acted film with a script that never settles for the obvious.",
    "The plot wanders for an hour before anything happens, and the ending feels rushed.",
    "Shares in the carmaker rose sharply after it reported record quarterly profits.",
    "What a waste of a talented director.",
]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("runs/int8-vs-fp32"))
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--sequence-length", type=int, default=128)
    args = parser.parse_args()

    import torch
    from sparseml.pytorch.optim import ScheduledModifierManager
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from obert_modifiers.bench import run_benchmark
    from obert_modifiers.export import export_deployment
    from obert_modifiers.models import minilm_l6_dir

    source = minilm_l6_dir()
    fp32_dir, int8_dir = args.out / "fp32-model", args.out / "int8-model"
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    model = AutoModelForSequenceClassification.from_pretrained(str(source), num_labels=2)
    for folder in (fp32_dir, int8_dir):
        shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(str(fp32_dir), safe_serialization=False)
    tokenizer.save_pretrained(str(fp32_dir))

    manager = ScheduledModifierManager.from_yaml(RECIPE)
    manager.apply_structure(model, epoch=0.0)  # fake-quant modules, observers on
    model.eval()
    with torch.no_grad():
        for _ in range(4):
            model(**tokenizer(CALIBRATION, padding=True, return_tensors="pt"))
    int8_dir.mkdir(parents=True)
    torch.save(model.state_dict(), int8_dir / "pytorch_model.bin")
    model.config.save_pretrained(str(int8_dir))
    tokenizer.save_pretrained(str(int8_dir))
    manager.save(str(int8_dir / "recipe.yaml"))

    results = {}
    for name, folder in (("fp32", fp32_dir), ("int8", int8_dir)):
        deployment = export_deployment(
            folder, args.out / f"{name}-deployment", overwrite=True, sequence_length=args.sequence_length
        )
        results[name] = {
            r.engine: r
            for r in run_benchmark(
                deployment.path,
                batch_size=1,
                sequence_length=args.sequence_length,
                num_cores=args.cores,
                seconds=args.seconds,
            )
        }
        print(f"{name}: {deployment.onnx_bytes / 1e6:.1f} MB, parity {deployment.max_abs_diff:.2g}")
    for engine in ("deepsparse", "onnxruntime"):
        fp32, int8 = results["fp32"][engine], results["int8"][engine]
        if fp32.ok and int8.ok:
            print(
                f"{engine:12s} FP32 {fp32.median_ms:7.2f} ms  INT8 {int8.median_ms:7.2f} ms  "
                f"INT8 speedup {fp32.median_ms / int8.median_ms:.2f}x  (load {int8.load_average_1m:.1f})"
            )
        else:
            print(f"{engine}: {fp32.status}/{int8.status} {fp32.error or int8.error}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
