"""One recipe, two adapters, same result.

The same staged recipe (layer drop 4 -> 2, oBERT pruning at epochs 0, 1, 2 with a cyclic learning
rate and distillation (logits and hidden states) from the 4-layer starting model, then INT8 QAT with
observers frozen mid-epoch) trains the same tiny BERT on the same data twice:
through SparseML's stock ``sparseml.transformers.train.text_classification`` in this venv (``.venv``:
SparseML 1.8, transformers 4.40) and through the native adapter's ``obert train`` in ``.venv-modern``
(transformers 5, no SparseML). ``tests/parity_trace.py`` writes what each run did as JSON; this test
compares them.

What must agree, and how closely (measured on the 2-core build machine: everything equal, the mean
training loss equal to the last digit, final weights within 5.5e-6):
- the epochs and targets of the pruning steps, the learning rate of every optimizer step, the layers
  kept, and the saved state-dict keys: exactly; the mean training loss (distillation included): 1e-6;
- the masks of every pruning step: at most 8 of the 16,384 pruned-layer weights may differ. Both venvs
  run the same torch 2.13 wheel, but transformers 4.40 and 5 compute BERT attention differently
  (eager vs SDPA kernels), so gradients differ in the last bits and a weight whose OBS score ties
  with the pruning threshold may land on either side;
- the final weights: within 1e-3 (training amplifies those last-bit differences a little).
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sparseml", reason="the SparseML side runs in .venv (make venv)")

ROOT = Path(__file__).resolve().parents[1]
MODERN_PYTHON = ROOT / ".venv-modern" / "bin" / "python"
TRACE_SCRIPT = Path(__file__).parent / "parity_trace.py"

pytestmark = pytest.mark.integration

PRUNE_PARAMS = (
    "re:bert.encoder.layer.*.(attention.self.(query|key|value)|attention.output.dense|intermediate.dense|"
    "output.dense).weight"
)
RECIPE = f"""
prune_params: ["{PRUNE_PARAMS}"]
prune:
  training_modifiers:
    - !EpochRangeModifier
      start_epoch: 0.0
      end_epoch: 2.0
    - !LearningRateFunctionModifier
      lr_func: cyclic_linear
      cycle_epochs: 1.0
      init_lr: 1.0e-3
      final_lr: 1.0e-4
      start_epoch: 0.0
      end_epoch: 2.0
  structure_modifiers:
    - !LayerDropModifier
      keep: 2
      num_layers: 4
      start_epoch: 0.0
  distillation_modifiers:
    - !OBertDistillationModifier
      hardness: 0.7
      temperature: 2.0
      hidden_weight: 0.5
      start_epoch: 0.0
      end_epoch: 2.0
  pruning_modifiers:
    - !OBertPruningModifier
      params: eval(prune_params)
      init_sparsity: 0.3
      final_sparsity: 0.6
      start_epoch: 0.0
      end_epoch: 2.0
      update_frequency: 1.0
      num_grads: 8
      fisher_block_size: 16
      grad_sampler_kwargs:
        batch_size: 4
qat:
  training_modifiers:
    - !EpochRangeModifier
      start_epoch: 2.0
      end_epoch: 3.0
    - !LearningRateFunctionModifier
      lr_func: linear
      init_lr: 2.0e-4
      final_lr: 1.0e-5
      start_epoch: 2.0
      end_epoch: 3.0
  quantization_modifiers:
    - !OBertQuantizationModifier
      start_epoch: 2.0
      freeze_observer_epoch: 2.5
"""


def _setup(root: Path) -> None:
    """A tiny BERT (4 layers, hidden 32, no dropout: the two stacks draw dropout masks differently)
    with the MiniLM tokenizer, saved as pytorch_model.bin; 64 training sentences, two labels."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from obert_modifiers.models import TOKENIZER_FILES, minilm_l6_dir

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
        id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1},
    )  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(root / "model", safe_serialization=False)
    for name in TOKENIZER_FILES:
        shutil.copyfile(minilm_l6_dir() / name, root / "model" / name)
    rng = random.Random(0)
    words = "good bad great awful fine poor nice terrible".split()
    for split, count in (("train", 64), ("validation", 16)):
        with open(root / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["sentence", "label"])
            for _ in range(count):
                text = rng.choices(words, k=6)
                writer.writerow(
                    [" ".join(text), "pos" if text[0] in ("good", "great", "fine", "nice") else "neg"]
                )
    (root / "recipe.yaml").write_text(RECIPE)


def _flags(root: Path, out: str, accumulation: int) -> list[str]:
    return [
        "--model_name_or_path", str(root / "model"), "--recipe", str(root / "recipe.yaml"),
        "--distill_teacher", str(root / "model"),
        "--train_file", str(root / "train.csv"), "--validation_file", str(root / "validation.csv"),
        "--do_train", "--max_seq_length", "16", "--seed", "7",
        "--per_device_train_batch_size", str(8 // accumulation),
        "--gradient_accumulation_steps", str(accumulation),
        "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
        "--output_dir", str(root / out),
    ]  # fmt: skip


def _trace(python: Path | str, side: str, root: Path, flags: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "NM_DISABLE_ANALYTICS": "1"}  # fmt: skip
    out = root / f"{side}.json"
    result = subprocess.run(
        [str(python), str(TRACE_SCRIPT), side, str(out), "--", *flags],
        capture_output=True, text=True, env=env, timeout=600, cwd=root,
    )  # fmt: skip
    assert result.returncode == 0, f"{side} run failed:\n{result.stderr[-4000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module", params=[1, 2], ids=["batch8", "batch4x2-accumulated"])
def traces(request, tmp_path_factory) -> tuple[dict, dict, Path]:
    """Both runs, at batch 8, and at batch 4 with 2 accumulation steps (8 per optimizer step: the
    same steps per epoch and the same recipe epochs)."""
    if not MODERN_PYTHON.exists():
        if os.environ.get("CI"):  # make test builds both venvs: in CI a missing one is a failure
            pytest.fail(f"{MODERN_PYTHON} is missing: make test builds it")
        pytest.skip(
            f"{MODERN_PYTHON} is missing: build the modern venv (make venv-modern) to compare the adapters"
        )
    root = tmp_path_factory.mktemp("parity")
    _setup(root)
    flags = [*_flags(root, "out-sparseml", request.param), "--save_safetensors", "False"]
    sparseml = _trace(sys.executable, "sparseml", root, flags)
    native = _trace(MODERN_PYTHON, "native", root, _flags(root, "out-native", request.param))
    return sparseml, native, root


def test_same_schedule_learning_rate_and_layers(traces):
    sparseml, native, _ = traces
    assert sparseml["layers"] == native["layers"] == {"num_hidden_layers": 2, "map": [0, 2]}
    steps = [(p["epoch"], p["target"]) for p in sparseml["prune"]]
    assert steps == [(p["epoch"], p["target"]) for p in native["prune"]]
    assert steps == [(0.0, 0.3), (1.0, 0.5625), (2.0, 0.6)]  # cubic 0.3 -> 0.6 over epochs [0, 2]
    assert len(sparseml["lr"]) == len(native["lr"]) == 24  # 64 samples / batch 8, 3 epochs
    assert sparseml["lr"] == native["lr"]
    assert sparseml["lr"][0] == [0.0, 1e-3] and sparseml["lr"][16] == [2.0, 2e-4]


def test_same_masks_at_every_pruning_step(traces):
    from parity_trace import unpack

    sparseml, native, _ = traces
    for ours, theirs in zip(native["prune"], sparseml["prune"], strict=True):
        assert ours["masks"].keys() == theirs["masks"].keys()
        differing = sum(
            int((unpack(ours["masks"][name]) != unpack(theirs["masks"][name])).sum())
            for name in ours["masks"]
        )
        total = sum(entry["size"] for entry in ours["masks"].values())
        assert total == 16384
        assert differing <= 8, f"epoch {ours['epoch']}: {differing} of {total} mask entries differ"
        assert ours["achieved"] == pytest.approx(theirs["achieved"], abs=8 / total)


def test_same_saved_model(traces):
    import torch
    from safetensors.torch import load_file

    _, _, root = traces
    theirs = torch.load(root / "out-sparseml" / "pytorch_model.bin", map_location="cpu", weights_only=True)
    ours = load_file(str(root / "out-native" / "model.safetensors"))
    assert ours.keys() == theirs.keys()  # same layout, QAT modules included: a folder reloads on either stack
    losses = [
        json.loads((root / out / "trainer_state.json").read_text())["log_history"][-1]["train_loss"]
        for out in ("out-sparseml", "out-native")
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    worst = max(float((ours[k].float() - theirs[k].float()).abs().max()) for k in ours)
    assert worst < 1e-3


def test_deepsparse_runs_the_modern_stacks_export(traces, tmp_path):
    """The native run's folder exported on the modern stack (``obert export`` in .venv-modern: opset 14,
    IR 7, an ORT INT8 form) runs in DeepSparse 1.8 (this venv) with ONNX Runtime's outputs."""
    deepsparse = pytest.importorskip("deepsparse", reason="DeepSparse is the optional [deepsparse] extra")
    import numpy as np
    import onnxruntime

    _, _, root = traces
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [str(MODERN_PYTHON.parent / "obert"), "export", str(root / "out-native"), "--out", tmp_path / "d"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "d" / "export.json").read_text())
    assert manifest["quantized"] and manifest["int8_format"] in ("ort", "ort-u8", "qdq")
    path = str(tmp_path / "d" / "model.onnx")
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    ids = np.random.RandomState(0).randint(1000, 2000, (1, 128)).astype(np.int64)
    inputs = [ids if i.name == "input_ids" else np.ones_like(ids) if i.name == "attention_mask" else
              np.zeros_like(ids) for i in session.get_inputs()]  # fmt: skip
    expected = session.run(None, {i.name: x for i, x in zip(session.get_inputs(), inputs, strict=True)})[0]
    got = deepsparse.Engine(path, batch_size=1)(inputs)[0]
    assert np.abs(got - expected).max() < 1e-4
