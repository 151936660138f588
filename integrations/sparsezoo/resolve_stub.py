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
import subprocess
import sys
import tempfile
from pathlib import Path

from obert_modifiers.testing.hub_fixtures import make_tiny_bert_folders
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
            deployment, training = make_tiny_bert_folders(work / "model", args.sequence_length)
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
