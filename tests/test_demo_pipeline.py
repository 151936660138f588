"""The main job end to end: `obert demo --quick` (tiny BERT, real stock CLI, export, both engines),
and the real MiniLM-L6 fine-tuned for a few dozen steps through the stock SparseML command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env["HF_DATASETS_CACHE"] = str(tmp_path / "datasets-cache")  # no stale Arrow caches
    return env


@pytest.mark.integration
def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [str(BIN / "obert"), "demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=_env(tmp_path),
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    # recipes/demo.yaml: !OBertPruningModifier to final_sparsity (0.8), then !OBertQuantizationModifier
    assert summary["sparsity"]["encoder_linear"] == pytest.approx(0.8, abs=0.01)
    assert summary["sparsity"]["export_overall"] > 0.5
    assert summary["quantized"] is True
    # the exported ONNX file is the trained model: same test predictions, within truncation noise
    accuracy = summary["accuracy"]
    assert summary["dataset"]["counts"]["test"] == 1913
    assert abs(accuracy["test_onnx"] - accuracy["test_pytorch"]) <= 0.01
    assert summary["export"]["max_abs_diff"] <= summary["export"]["tolerance"]
    engines = {row["engine"]: row for row in summary["benchmark"]}
    assert set(engines) == {"deepsparse", "onnxruntime"}
    assert engines["onnxruntime"]["median_ms"] > 0
    # the dense FP32 starting model, timed the same way, is the speed-up reference
    dense = {row["engine"]: row for row in summary["benchmark_dense_reference"]}
    assert dense["onnxruntime"]["median_ms"] > 0
    assert (out / "dense-deployment" / "model.onnx").is_file()
    # published to a loopback hub with a card, pulled back by stub (sha256 checked by the round trip)
    stub = summary["hub"]["stub"]
    assert stub.endswith("/rotten_tomatoes/pruned80_quant-none") and summary["hub"]["files"] > 5
    assert (out / summary["hub"]["pulled"] / "config.json").is_file()
    assert (out / "deployment" / "model.onnx").is_file()
    assert not (out / "model" / "optimizer.pt").exists()
    assert not any(p.name.startswith(".demo") for p in tmp_path.iterdir())  # staging folder renamed
    assert "latency: onnxruntime" in result.stdout and "test accuracy (PyTorch)" in result.stdout
    assert "hub round trip" in result.stdout


@pytest.mark.integration
def test_minilm_l6_learns_bbc_through_the_stock_cli(tmp_path):
    """integrations/huggingface/train_bbc.sh: the real MiniLM-L6 from its package, 30 steps on a BBC
    slice with the stock SparseML command and a GMPruningModifier recipe."""
    out = tmp_path / "hf-example"
    env = _env(tmp_path)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(
        ["bash", str(ROOT / "integrations" / "huggingface" / "train_bbc.sh"), str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    info = json.loads((out / "data" / "data.json").read_text())
    assert info["counts"] == {"train": 480, "validation": 100, "test": 319}
    majority = max(info["label_counts"]["validation"].values()) / info["counts"]["validation"]
    assert majority < 0.3
    metrics = json.loads((out / "model" / "eval_results.json").read_text())
    # 30 steps must beat the majority class by far (DATA.md: L3 reaches 0.906 in 40 steps)
    assert metrics["eval_accuracy"] > majority + 0.3, metrics
    assert "validation accuracy" in result.stdout
    # the recipe's GMPruningModifier left the FFN weights at its final_sparsity (0.4)
    from obert_modifiers.demo import weight_sparsity

    ffn = weight_sparsity(out / "model", r"bert\.encoder\.layer\.\d+\.(intermediate|output)\.dense\.weight$")
    assert ffn["encoder_linear"] == pytest.approx(0.4, abs=0.01)
