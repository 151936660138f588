"""Run an exported deployment folder on DeepSparse and ONNX Runtime and compare predictions.

    python integrations/deepsparse/run_deployment.py DEPLOYMENT_DIR "a gripping film" "dull and long"

DeepSparse's Pipeline loads the folder as is (config.json, tokenizer files, model.onnx), but it
rewrites model.onnx IN PLACE with static input shapes, so this script gives it a copy.
DeepSparse is evaluation-only software (Neural Magic Community License); ONNX Runtime is the
default runtime.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    folder, sentences = Path(argv[0]), argv[1:]
    if not (folder / "model.onnx").is_file():
        print(f"{folder} has no model.onnx (export one with `obert export`)", file=sys.stderr)
        return 1
    import numpy as np
    import onnxruntime as ort
    from transformers import AutoTokenizer

    config = json.loads((folder / "config.json").read_text())
    sequence_length = json.loads((folder / "export.json").read_text()).get("sequence_length", 128)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    encoded = tokenizer(
        sentences, padding="max_length", max_length=sequence_length, truncation=True, return_tensors="np"
    )
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    start = time.perf_counter()
    logits = session.run(None, {i.name: encoded[i.name].astype(np.int64) for i in session.get_inputs()})[0]
    ort_ms = (time.perf_counter() - start) * 1000
    ort_labels = [config["id2label"][str(i)] for i in logits.argmax(-1)]
    print(f"onnxruntime ({ort_ms:.1f} ms): {ort_labels}")

    try:
        from deepsparse import Pipeline
    except ImportError:
        print("deepsparse is not installed (pip install obert-modifiers[deepsparse]); ORT only")
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "deployment"
        shutil.copytree(folder, copy)
        pipeline = Pipeline.create(
            task="text-classification",
            model_path=str(copy),
            batch_size=len(sentences),
            sequence_length=sequence_length,
        )
        start = time.perf_counter()
        output = pipeline(sequences=sentences)
        ds_ms = (time.perf_counter() - start) * 1000
    ds_labels = [labels[0] if isinstance(labels, list) else labels for labels in output.labels]
    print(f"deepsparse  ({ds_ms:.1f} ms, tokenization included): {ds_labels}")
    print("predictions agree" if ds_labels == ort_labels else "PREDICTIONS DIFFER")
    return 0 if ds_labels == ort_labels else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
