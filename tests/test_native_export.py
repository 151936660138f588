"""Export on the modern stack (no SparseML): a model trained by the native adapter becomes a deployment
folder with the same contract (``export.json`` read by ``obert_modifiers.deployment``), checked
against PyTorch in ONNX Runtime; TorchScript exporter, opset <= 18 and IR <= 9 (what DeepSparse 1.8
reads); INT8 in ORT's forms (SparseML's ``integer`` conversion is refused by name)."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers", reason="needs transformers (the [modern] extra)")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the native export path is for the modern venv", allow_module_level=True)

import onnx  # noqa: E402
import torch  # noqa: E402
from _native import TinyData, training_args  # noqa: E402

from obert_modifiers.deployment import DeploymentManifest  # noqa: E402
from obert_modifiers.export import export_deployment  # noqa: E402
from obert_modifiers.export.errors import ExportError  # noqa: E402
from obert_modifiers.export.graph import onnx_weight_sparsity  # noqa: E402
from obert_modifiers.models import save_tiny_bert  # noqa: E402
from obert_modifiers.native import RecipeTrainer  # noqa: E402

RECIPE = """
modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: 2.0
  - !OBertPruningModifier
    params: ["re:bert.encoder.layer.*.(attention.self.(query|key|value)|intermediate.dense).weight"]
    init_sparsity: 0.5
    final_sparsity: 0.5
    start_epoch: 0.0
    end_epoch: 0.0
    update_frequency: 1.0
    num_grads: 8
    fisher_block_size: 16
  - !OBertQuantizationModifier
    start_epoch: 1.0
    freeze_observer_epoch: 1.5
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("native-export")
    model_dir = save_tiny_bert(root / "model", num_labels=2, num_layers=2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir)
    data = TinyData(32)
    data.ids = data.ids % 1000 + 1000  # real vocabulary ids
    run = RecipeTrainer(recipe=RECIPE, model=model, args=training_args(root / "out"), train_dataset=data)
    run.train()
    run.save_model(root / "qat")
    tokenizer.save_pretrained(root / "qat")
    return model_dir, root / "qat", run.model.eval()


def _check_onnx(folder):
    graph = onnx.load(str(folder / "model.onnx"))
    assert (
        graph.ir_version <= 9
        and max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) <= 18
    )
    return graph


def test_fp32_export_keeps_the_contract(trained, tmp_path):
    model_dir, _, _ = trained
    result = export_deployment(model_dir, tmp_path / "fp32", progress=False)
    manifest = DeploymentManifest.read(tmp_path / "fp32")
    assert not manifest.quantized and manifest.parity.max_abs_diff == result.max_abs_diff < 1e-4
    _check_onnx(tmp_path / "fp32")


def test_qat_export_in_an_ort_int8_form_with_the_sparsity(trained, tmp_path):
    _, qat_dir, _ = trained
    result = export_deployment(qat_dir, tmp_path / "int8", progress=False)
    manifest = DeploymentManifest.read(tmp_path / "int8")
    assert manifest.quantized and manifest.int8_format in ("ort", "ort-u8", "qdq")
    assert manifest.parity.prediction_agreement == 1.0
    assert set(manifest.int8_choice["tried"]) <= {"ort", "ort-u8", "qdq"}  # no SparseML 'integer' here
    graph = _check_onnx(tmp_path / "int8")
    assert any(n.op_type in ("DequantizeLinear", "MatMulIntegerToFloat") for n in graph.graph.node)
    assert result.sparsity > 0.2
    # the pruned weights are still exact zeros in the INT8 initializers
    sparse = [s for s in onnx_weight_sparsity(tmp_path / "int8" / "model.onnx").values() if s > 0.4]
    assert len(sparse) >= 6


def test_integer_form_is_refused_without_sparseml(trained, tmp_path):
    _, qat_dir, _ = trained
    with pytest.raises(ExportError, match="'integer' is SparseML's MatMulInteger conversion"):
        export_deployment(qat_dir, tmp_path / "int", progress=False, int8_format="integer")
    assert not (tmp_path / "int").exists()


def test_export_loader_rebuilds_the_qat_structure(trained):
    """The export's loader (strict: every key of the file must find its place) rebuilds QAT with the
    native engine and answers exactly as the model that trained."""
    from obert_modifiers.export.loading import load_model

    _, qat_dir, trained_model = trained
    model, tokenizer, recipe = load_model(qat_dir)
    assert recipe is not None and model.config._attn_implementation == "obert_qat"
    batch = tokenizer(["a short text", "another one"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, trained_model(**batch).logits)
