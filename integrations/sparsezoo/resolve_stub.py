"""Serve a model from a local hub and load it by `zoo:` stub with the real SparseZoo client and a
DeepSparse pipeline (the way recipes and scripts written for Neural Magic's SparseZoo do).

    python integrations/sparsezoo/resolve_stub.py                       # builds a tiny BERT to publish
    python integrations/sparsezoo/resolve_stub.py --deployment out/deployment [--training out/model]

Steps: start `python -m obert_modifiers.zoo.server` on loopback (temporary SQLite + store), push the
model under a stub, then, in a fresh process with SPARSEZOO_API_URL pointing at the hub,
`sparsezoo.Model(stub).download()` and `deepsparse.Pipeline.create(task="text-classification",
model_path=stub)`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from obert_modifiers.zoo import local_hub, push

STUB = "zoo:nlp/text_classification/bert-tiny/pytorch/huggingface/bbc_news/base-none"

CLIENT = """
import sys, sparsezoo
from deepsparse import Pipeline
stub = sys.argv[1]
model = sparsezoo.Model(stub)
print("sparsezoo download:", model.download(), "->", model._path)
pipeline = Pipeline.create(task="text-classification", model_path=stub, sequence_length=int(sys.argv[2]))
print("deepsparse:", pipeline(sequences=["the central bank raised interest rates"]))
"""


def tiny_model(root: Path, sequence_length: int) -> tuple[Path, Path]:
    """A random 4-layer BERT classifier (training/) and its ONNX export (deployment/)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from obert_modifiers.models import save_tiny_bert

    training = save_tiny_bert(root / "training", num_labels=5)
    model = AutoModelForSequenceClassification.from_pretrained(training).eval()
    deployment = root / "deployment"
    deployment.mkdir()
    ids = torch.ones(1, sequence_length, dtype=torch.long)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    torch.onnx.export(
        model,
        (ids, torch.ones_like(ids), torch.zeros_like(ids)),
        str(deployment / "model.onnx"),
        input_names=names,
        output_names=["logits"],
        opset_version=14,
        dynamo=False,
        dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names}, "logits": {0: "batch"}},
    )
    for name in (
        "config.json",
        "vocab.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ):
        shutil.copy(training / name, deployment / name)
    return deployment, training


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--deployment", type=Path, help="deployment folder (model.onnx, config, tokenizer)")
    parser.add_argument("--training", type=Path, help="training output folder (optional)")
    parser.add_argument("--stub", default=STUB)
    parser.add_argument("--sequence-length", type=int, default=32)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="obert-zoo-example-") as tmp:
        work = Path(tmp)
        deployment, training = args.deployment, args.training
        if deployment is None:
            deployment, training = tiny_model(work / "model", args.sequence_length)
        with local_hub(work / "hub") as hub:
            record = push(deployment, args.stub, hub.url, hub.token, training=training)
            print(f"hub at {hub.url}: published {record['stub']} ({len(record['files'])} files)")
            env = {
                **os.environ,
                "SPARSEZOO_API_URL": hub.url,
                "SPARSEZOO_MODELS_PATH": str(work / "sparsezoo"),
                "NM_DISABLE_ANALYTICS": "1",
            }
            result = subprocess.run(
                [sys.executable, "-c", CLIENT, args.stub, str(args.sequence_length)], env=env
            )
            sys.exit(result.returncode)


if __name__ == "__main__":
    main()
