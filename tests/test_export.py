"""Deployment folders: FP32 and INT8 parity with PyTorch, sparsity kept in the ONNX initializers,
tampered files caught, nothing half-written, clear errors, and the ``sparseml.export`` trap."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="needs torch (the [sparseml] or [modern] extra)")
onnx = pytest.importorskip("onnx", reason="export needs onnx (the [sparseml] or [modern] extra)")
np = pytest.importorskip(
    "numpy", reason="export needs numpy (the [sparseml] or [modern] extra)"
)

from test_quantization import shared_artifacts  # noqa: E402  (shared, built once per session)


@pytest.fixture(scope="module")
def artifacts(tiny_bert_dir, tmp_path_factory):
    return shared_artifacts(tiny_bert_dir, tmp_path_factory)


def _ops(onnx_path: Path) -> list:
    return [node.op_type for node in onnx.load(str(onnx_path)).graph.node]


def test_fp32_deployment_folder_contents_and_parity(artifacts):
    import onnxruntime as ort

    result = artifacts["fp32"]
    folder = result.path
    for name in (
        "model.onnx",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "special_tokens_map.json",
        "export.json",
    ):
        assert (folder / name).is_file(), name
    assert not result.quantized
    assert result.max_abs_diff <= 1e-4 and result.tolerance == 1e-4
    assert result.prediction_agreement == 1.0
    manifest = json.loads((folder / "export.json").read_text())
    assert manifest["format_version"] == 1 and manifest["task"] == "text-classification"
    assert manifest["quantized"] is False and manifest["opset"] >= 13
    assert manifest["num_layers"] == 4 and manifest["sequence_length"] == 64
    assert manifest["num_parameters"] == result.num_parameters > 0
    assert set(manifest["parity"]) >= {"max_abs_diff", "tolerance", "num_samples"}
    assert manifest["parity"]["num_samples"] >= 8
    assert set(manifest["sparsity"]) == {"overall", "per_layer"}
    assert len(manifest["sparsity"]["per_layer"]) == 6 * 4 + 1  # encoder linears + pooler
    assert manifest["source_model"] == str(Path(artifacts["source"]).resolve())
    assert "created" in manifest
    assert manifest["onnx_sha256"] == hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()
    assert "QuantizeLinear" not in _ops(folder / "model.onnx")
    # dynamic batch and sequence axes: any shape runs
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    for shape in [(1, 7), (5, 64), (2, 200)]:
        feed = {i.name: np.ones(shape, dtype=np.int64) for i in session.get_inputs()}
        assert session.run(None, feed)[0].shape == (shape[0], 5)
    config = json.loads((folder / "config.json").read_text())
    assert all(isinstance(v, str) for v in config["id2label"].values())


def test_int8_deployment_from_safetensors_keeps_quantization_and_sparsity(artifacts):
    result = artifacts["int8"]
    folder = result.path
    ops = _ops(folder / "model.onnx")
    assert result.quantized
    # the 6 linears of each layer store 8-bit weights (INT8 or UINT8, whatever the form)
    from onnx import numpy_helper

    stored = [numpy_helper.to_array(i) for i in onnx.load(str(folder / "model.onnx")).graph.initializer]
    assert sum(a.ndim == 2 and a.dtype in (np.int8, np.uint8) and a.shape[0] < 100 for a in stored) >= 6 * 4
    assert "QuantizeLinear" in ops
    assert result.max_abs_diff <= result.tolerance
    assert result.prediction_agreement == 1.0
    assert (folder / "recipe.yaml").is_file()
    assert "!OBertQuantizationModifier" in (folder / "recipe.yaml").read_text()
    manifest = json.loads((folder / "export.json").read_text())
    assert manifest["quantized"] is True
    # auto: the fastest form that passes parity with an exact integer kernel on this CPU
    assert manifest["int8_format"] == manifest["int8_choice"]["chosen"] == result.int8_format
    per_layer = manifest["sparsity"]["per_layer"]
    encoder = {k: v for k, v in per_layer.items() if ".encoder." in k}
    assert len(encoder) == 24 and all(v == pytest.approx(0.5, abs=1e-3) for v in encoder.values())
    assert per_layer["bert.pooler.dense.weight"] == 0.0  # not pruned
    # overall: weighted over encoder + pooler linears
    assert manifest["sparsity"]["overall"] == pytest.approx(result.sparsity, abs=1e-5)
    assert 0.45 < result.sparsity < 0.5
    # INT8 is smaller than FP32 on disk
    assert result.onnx_bytes < artifacts["fp32"].onnx_bytes / 2


def test_pruned_weights_are_exact_zeros_in_exported_int8_initializers(artifacts):
    """Every pruned weight exports as its zero point (dequantizes to exactly 0.0)."""
    from obert_modifiers.export import onnx_weight_sparsity

    sparsity = onnx_weight_sparsity(artifacts["int8"].path / "model.onnx")
    encoder_weights = [v for v in sparsity.values() if 0.3 < v < 0.7]
    assert len(encoder_weights) >= 6 * 4, sparsity
    assert min(encoder_weights) >= 0.5 - 1e-3


def _tamper(onnx_path: Path, out_path: Path, dtype, shape, change) -> str:
    """Change the first initializer of ``dtype`` and ``shape`` (an encoder FFN matrix)."""
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype == dtype and array.shape == shape:
            init.CopyFrom(numpy_helper.from_array(change(array.copy()), init.name))
            onnx.save(model, str(out_path))
            return init.name
    raise AssertionError(f"no {dtype} initializer of shape {shape} in {onnx_path}")


def _negate_first_row(array):
    array[0] = -array[0]
    return array


def _mirror_uint8(array):  # zero point 128: q -> 256 - q negates every weight of the matrix
    return np.clip(256 - array.astype(np.int32), 0, 255).astype(np.uint8)


def test_parity_check_catches_a_weight_changed_after_fp32_export(artifacts, tmp_path):
    from obert_modifiers.export import ParityError, check_parity, load_model

    model, tokenizer, _ = load_model(artifacts["source"])
    source = artifacts["fp32"].path / "model.onnx"
    report = check_parity(model, source, tokenizer, quantized=False, sequence_length=64)
    assert report.passed and report.max_abs_diff <= 1e-4

    tampered = tmp_path / "tampered.onnx"
    name = _tamper(source, tampered, np.float32, (64, 32), _negate_first_row)
    with pytest.raises(ParityError) as error:
        check_parity(model, tampered, tokenizer, quantized=False, sequence_length=64)
    message = str(error.value)
    assert "largest difference" in message and "output 'logits'" in message and "tolerance" in message, name
    assert error.value.report.max_abs_diff > 1e-4


def _negate_int8(array):
    return np.clip(-array.astype(np.int32), -128, 127).astype(np.int8)


def result_dtype(onnx_path: Path):
    """The dtype of the 8-bit (64, 32) weight matrices of an INT8 file."""
    from onnx import numpy_helper

    arrays = [numpy_helper.to_array(init) for init in onnx.load(str(onnx_path)).graph.initializer]
    return next(a.dtype for a in arrays if a.shape == (64, 32) and a.dtype in (np.int8, np.uint8))


def test_parity_check_catches_a_weight_changed_after_int8_export(artifacts, tmp_path):
    from obert_modifiers.export import ParityError, check_parity, load_model

    model, tokenizer, _ = load_model(artifacts["qat_dir"])
    source = artifacts["int8"].path / "model.onnx"
    assert check_parity(model, source, tokenizer, quantized=True, sequence_length=64).passed
    tampered = tmp_path / "tampered-int8.onnx"
    if result_dtype(source) == np.uint8:
        _tamper(source, tampered, np.uint8, (64, 32), _mirror_uint8)
    else:  # the ort form's INT8 weights (zero point 0): negate the matrix
        _tamper(source, tampered, np.int8, (64, 32), _negate_int8)
    with pytest.raises(ParityError, match="largest difference") as error:
        check_parity(model, tampered, tokenizer, quantized=True, sequence_length=64)
    assert error.value.report.max_abs_diff > error.value.report.tolerance


def test_failed_parity_leaves_no_folder(tiny_bert_dir, tmp_path):
    from obert_modifiers.export import ParityError, export_deployment

    target = tmp_path / "deployment"
    with pytest.raises(ParityError):
        # a negative tolerance can never be met: the export must stop before the rename
        export_deployment(tiny_bert_dir, target, sequence_length=32, tolerance=-1.0, progress=False)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no staging folder left behind either


def test_existing_folder_is_kept_without_overwrite(artifacts, tiny_bert_dir):
    from obert_modifiers.export import ExportError, export_deployment

    folder = artifacts["fp32"].path
    before = (folder / "export.json").read_text()
    with pytest.raises(ExportError, match="already exists"):
        export_deployment(tiny_bert_dir, folder, progress=False)
    assert (folder / "export.json").read_text() == before


@pytest.mark.parametrize(
    "setup,task,fragment",
    [
        ("missing", "text-classification", "does not exist"),
        ("no-config", "text-classification", "has no config.json"),
        ("no-weights", "text-classification", "has no weights"),
        ("ok", "image-generation", "unknown task 'image-generation'"),
    ],
)
def test_bad_inputs_name_the_problem(tiny_bert_dir, tmp_path, setup, task, fragment):
    from obert_modifiers.export import ExportError, export_deployment

    model_dir = tmp_path / "model"
    if setup == "no-config":
        model_dir.mkdir()
        (model_dir / "pytorch_model.bin").write_bytes(b"")
    elif setup == "no-weights":
        model_dir.mkdir()
        shutil.copyfile(tiny_bert_dir / "config.json", model_dir / "config.json")
    elif setup == "ok":
        model_dir = tiny_bert_dir
    with pytest.raises(ExportError) as error:
        export_deployment(model_dir, tmp_path / "out", task=task, progress=False)
    assert fragment in str(error.value)
    if setup != "ok":
        assert str(model_dir) in str(error.value)
    assert not (tmp_path / "out").exists()


def test_checkpoint_that_does_not_fit_its_structure_is_an_error(artifacts, tmp_path):
    """A QAT checkpoint without its recipe.yaml cannot be rebuilt: say so instead of exporting
    random weights (what SparseML 1.8 does silently with safetensors)."""
    from obert_modifiers.export import ExportError, load_model

    broken = tmp_path / "no-recipe"
    shutil.copytree(artifacts["qat_dir"], broken)
    (broken / "recipe.yaml").unlink()
    with pytest.raises(ExportError, match="the model does not have.*no recipe.yaml"):
        load_model(broken)


def test_cli_export_reports_errors_with_exit_code(tmp_path):
    from typer.testing import CliRunner

    from obert_modifiers.cli import _build

    runner = CliRunner()
    result = runner.invoke(_build(), ["export", str(tmp_path / "nope"), "--task", "text-classification"])
    assert result.exit_code == 1
    assert "does not exist" in result.output


@pytest.mark.integration
def test_sparseml_export_trap_vs_ours(artifacts, tmp_path):
    """SparseML's new exporter (``sparseml.export``) ignores the v1 recipe.yaml. Our modifier keeps
    parameter names, so it still loads the trained weights, but it silently drops the quantization:
    a float graph (no QuantizeLinear / MatMulInteger) that differs from the trained INT8 model by
    the full quantization error. Ours exports INT8 and matches PyTorch several times closer. (With
    SparseML's own QuantizationModifier the weights are renamed too, and it exports random
    weights: see docs/export.md.)"""
    from obert_modifiers.export import check_parity, load_model

    model_dir = tmp_path / "model"
    shutil.copytree(artifacts["qat_dir"], model_dir)
    from safetensors.torch import load_file

    # sparseml.export reads only pytorch_model.bin: give it one

    torch.save(load_file(str(model_dir / "model.safetensors")), model_dir / "pytorch_model.bin")
    (model_dir / "model.safetensors").unlink()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "NM_DISABLE_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    completed = subprocess.run(
        [
            str(Path(sys.executable).with_name("sparseml.export")),
            str(model_dir),
            "--task",
            "text-classification",
            "--integration",
            "transformers",
            "--sequence_length",
            "64",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    theirs = model_dir / "deployment" / "model.onnx"
    their_ops = _ops(theirs)
    assert "MatMulInteger" not in their_ops and "QuantizeLinear" not in their_ops
    assert "QuantizeLinear" in _ops(artifacts["int8"].path / "model.onnx")

    model, tokenizer, _ = load_model(artifacts["qat_dir"])
    ours = check_parity(
        model, artifacts["int8"].path / "model.onnx", tokenizer, quantized=True, sequence_length=64
    )
    their_report = check_parity(
        model, theirs, tokenizer, quantized=True, sequence_length=64, raise_on_failure=False
    )
    assert ours.passed
    assert their_report.max_abs_diff > 3 * ours.max_abs_diff


def test_fold_embedding_qdq_keeps_outputs_and_removes_the_pair(tmp_path):
    """The QDQ fallback folds fake-quantized embedding tables (DeepSparse 1.8 aborts on them)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from obert_modifiers.export import fold_embedding_qdq

    table = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    nodes = [
        helper.make_node("QuantizeLinear", ["table", "scale", "zero"], ["table_q"]),
        helper.make_node("DequantizeLinear", ["table_q", "scale", "zero"], ["table_dq"]),
        helper.make_node("Gather", ["table_dq", "ids"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 4])],
        initializer=[
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(np.array(0.02, dtype=np.float32), "scale"),
            numpy_helper.from_array(np.array(128, dtype=np.uint8), "zero"),
        ],
    )
    path = tmp_path / "embedding.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), str(path))
    ids = np.array([0, 3, 9, 3], dtype=np.int64)
    before = ort.InferenceSession(str(path)).run(None, {"ids": ids})[0]

    assert fold_embedding_qdq(path) == 1
    folded = onnx.load(str(path))
    assert [n.op_type for n in folded.graph.node] == ["Gather"]
    assert {i.name for i in folded.graph.initializer} == {"table_dq"}  # nothing unused left behind
    after = ort.InferenceSession(str(path)).run(None, {"ids": ids})[0]
    np.testing.assert_array_equal(after, before)
    assert np.abs(before - table[ids]).max() > 0  # it really was quantized: the fold kept that


def test_export_and_the_onnxruntime_benchmark_need_no_optional_extras(tiny_bert_dir, tmp_path):
    """Installed without [hub] or [deepsparse]: with httpx, fastapi and deepsparse unimportable,
    export_deployment writes a real deployment folder and run_benchmark times it on ONNX Runtime.
    (Export used to import the hub client for its sha256 helper: ModuleNotFoundError: httpx.)"""
    from _helpers import check, offline_env, run_python

    code = textwrap.dedent(f"""
        import json, sys
        for name in ("httpx", "deepsparse", "fastapi"):
            sys.modules[name] = None  # what a missing package looks like to `import`
        from obert_modifiers.bench import run_benchmark
        from obert_modifiers.export import export_deployment

        result = export_deployment({str(tiny_bert_dir)!r}, {str(tmp_path / "dep")!r}, sequence_length=32,
                                   progress=False)
        (timing,) = run_benchmark(result.path, engines=("onnxruntime",), sequence_length=16, num_cores=1,
                                  seconds=0.2, warmup_seconds=0.05)
        hub = sorted(m for m in sys.modules if m.startswith("obert_modifiers.zoo"))
        print(json.dumps({{"status": timing.status, "median_ms": timing.median_ms, "hub": hub}}))
    """)
    completed = run_python(code, env=offline_env())
    check(completed, "export + ORT benchmark without the extras")
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["status"] == "ok" and report["median_ms"] > 0
    assert report["hub"] == []  # export and bench never import the hub
    manifest = json.loads((tmp_path / "dep" / "export.json").read_text())
    assert manifest["sequence_length"] == 32
    onnx_bytes = (tmp_path / "dep" / "model.onnx").read_bytes()
    assert manifest["onnx_sha256"] == hashlib.sha256(onnx_bytes).hexdigest()


def test_export_json_is_written_through_the_deployment_contract(artifacts):
    """The folder export writes reads back through DeploymentManifest (the one schema), and the
    result carries the sequence length it was exported with."""
    from obert_modifiers.deployment import DeploymentManifest

    result = artifacts["int8"]
    manifest = DeploymentManifest.read(result.path)
    assert manifest.format_version == 1 and manifest.sequence_length == result.sequence_length == 64
    assert manifest.int8_format == result.int8_format == manifest.int8_choice["chosen"]
    assert manifest.parity.max_abs_diff == result.max_abs_diff
    assert manifest.sparsity.overall == pytest.approx(result.sparsity, abs=1e-6)


# --------------------------------------------------------------------------------------------
# INT8 forms: each exports, runs in ORT and matches PyTorch within its tolerance; auto's choice


@pytest.mark.parametrize("form", ["ort", "ort-u8", "integer", "qdq"])
def test_each_int8_form_exports_runs_and_matches_pytorch_within_its_tolerance(artifacts, tmp_path, form):
    from obert_modifiers.algorithms.quantization import bake_int32_biases
    from obert_modifiers.export import check_parity, load_model, onnx_weight_sparsity
    from obert_modifiers.export.graph import INT8_FORMATS, export_onnx_file
    from obert_modifiers.export.parity import INT8_TOLERANCES

    assert form in INT8_FORMATS
    model, tokenizer, _ = load_model(artifacts["qat_dir"])
    bake_int32_biases(model)
    path = tmp_path / f"{form}.onnx"
    export_onnx_file(model, tokenizer, path, 64, quantized=True, int8_format=form)
    report = check_parity(
        model, path, tokenizer, quantized=True, sequence_length=64, tolerance=INT8_TOLERANCES[form]
    )
    assert report.passed and report.max_abs_diff <= INT8_TOLERANCES[form] * 3  # logits are O(1)
    assert report.prediction_agreement == 1.0
    ops = _ops(path)
    if form in ("ort", "ort-u8"):
        from onnx import numpy_helper

        graph = onnx.load(str(path)).graph
        inits = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
        weights = [
            inits[n.input[0]] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
        ]
        weights = [w for w in weights if w.ndim == 2 and w.shape[0] < 100]  # not the embedding tables
        assert len(weights) == 6 * 4 and "Transpose" in ops  # stored [in, out], activations stay QDQ
        assert {w.dtype for w in weights} == {np.dtype(np.int8 if form == "ort" else np.uint8)}
        # shapes kept: [in, out] of every encoder linear (hidden 32, intermediate 64)
        assert sorted({w.shape for w in weights}) == [(32, 32), (32, 64), (64, 32)]
    # the masks survive as exact zero points
    sparsity = onnx_weight_sparsity(path)
    encoder = [v for v in sparsity.values() if 0.3 < v < 0.7]
    assert len(encoder) >= 24 and min(encoder) >= 0.5 - 1e-3, sparsity


def test_int8_kernel_probe_matches_the_cpu_flags():
    from obert_modifiers.export.parity import int8_kernels_exact
    from obert_modifiers.latency import cpu_flags

    exact = int8_kernels_exact()
    assert exact["u8u8"] and exact["s8s8"]  # 16-bit products: exact on every x86 CPU
    flags = cpu_flags()
    if not (flags["avx512_vnni"] or flags["avx_vnni"]):
        assert not exact["u8s8"]  # AVX2 vpmaddubsw saturates pairs of products


def test_auto_int8_choice_passes_parity_and_records_why(artifacts):
    from obert_modifiers.export.graph import INT8_FORMATS
    from obert_modifiers.export.parity import INT8_KERNELS, int8_kernels_exact

    manifest = json.loads((artifacts["int8"].path / "export.json").read_text())
    choice = manifest["int8_choice"]
    chosen = choice["chosen"]
    assert choice["requested"] == "auto" and manifest["int8_format"] == chosen
    tried = choice["tried"]
    # every form before the chosen one was tried and recorded with its max difference
    assert list(tried) == list(INT8_FORMATS[: INT8_FORMATS.index(chosen) + 1])
    assert tried[chosen]["passed"] and tried[chosen]["kernel_exact"]
    assert tried[chosen]["max_abs_diff"] == manifest["parity"]["max_abs_diff"]
    assert tried[chosen]["tolerance"] == manifest["parity"]["tolerance"]
    exact = int8_kernels_exact()
    assert choice["kernels_exact"] == exact
    if not exact["u8s8"]:  # no VNNI: ORT's U8S8 form is not exact here, auto moves on
        assert chosen != "ort" and tried["ort"]["kernel_exact"] is False
        assert "ort:" in choice["reason"] and f"{tried['ort']['max_abs_diff']:.3g}" in choice["reason"]
    assert INT8_KERNELS[chosen] in choice["reason"]
    assert set(choice["cpu"]["flags"]) >= {"avx2", "avx512_vnni", "avx_vnni"} and choice["cpu"]["model"]


def test_forced_int8_form_that_fails_parity_is_refused_naming_the_form_that_passes(
    artifacts, tmp_path, monkeypatch
):
    from obert_modifiers.export import ParityError, export_deployment
    from obert_modifiers.export.parity import INT8_TOLERANCES

    # a negative tolerance is never met: qdq fails here whatever the CPU
    monkeypatch.setitem(INT8_TOLERANCES, "qdq", -1.0)
    target = tmp_path / "forced"
    with pytest.raises(ParityError) as error:
        export_deployment(artifacts["qat_dir"], target, sequence_length=64, progress=False, int8_format="qdq")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("--int8-format qdq fails the parity check on this CPU: max |diff| ")
    # the suggestion: the fastest form that passes, on a kernel exact here (ort-u8 without VNNI)
    from obert_modifiers.export.parity import int8_kernels_exact

    expected = "ort" if int8_kernels_exact()["u8s8"] else "ort-u8"
    assert f"; {expected} passes (max |diff| " in message and f"--int8-format {expected} or auto" in message
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_unknown_int8_format_is_refused_before_loading(artifacts, tmp_path):
    from obert_modifiers.export import ExportError, export_deployment

    with pytest.raises(ExportError, match=r"unknown INT8 format 'int4': expected auto or one of ort, "):
        export_deployment(artifacts["qat_dir"], tmp_path / "x", progress=False, int8_format="int4")


def test_per_channel_qat_model_exports_in_the_ort_form(tiny_bert_dir, tmp_path):
    from test_quantization import make_qat_model_dir

    from obert_modifiers.algorithms.quantization import bake_int32_biases
    from obert_modifiers.export import check_parity, load_model
    from obert_modifiers.export.graph import export_onnx_file
    from obert_modifiers.export.parity import INT8_TOLERANCES

    qat_dir = make_qat_model_dir(tiny_bert_dir, tmp_path / "qat-channel", strategy="channel", steps=2)
    model, tokenizer, _ = load_model(qat_dir)
    bake_int32_biases(model)
    path = tmp_path / "channel.onnx"
    export_onnx_file(model, tokenizer, path, 32, quantized=True, int8_format="ort-u8")
    graph = onnx.load(str(path)).graph
    from onnx import numpy_helper

    inits = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    scales = [array for name, array in inits.items() if name.endswith("_int8_weight_scale")]
    assert len(scales) == 24 and all(s.shape in ((32,), (64,)) for s in scales)  # one per output column
    report = check_parity(
        model, path, tokenizer, quantized=True, sequence_length=32, tolerance=INT8_TOLERANCES["ort-u8"]
    )
    assert report.passed


def test_cli_export_int8_format_option(artifacts, tmp_path):
    """``obert export --int8-format``: an unknown form is one line naming the choices; a named form
    that passes is written and printed."""
    from typer.testing import CliRunner

    from obert_modifiers.cli import _build

    runner = CliRunner()
    bad = runner.invoke(
        _build(), ["export", str(artifacts["qat_dir"]), "--int8-format", "int4", "--out", str(tmp_path / "a")]
    )
    assert bad.exit_code == 1 and "unknown INT8 format 'int4'" in bad.output
    assert not (tmp_path / "a").exists()
    args = ["export", str(artifacts["qat_dir"]), "-s", "32", "--int8-format", "ort-u8"]
    good = runner.invoke(_build(), [*args, "--out", str(tmp_path / "b")])
    assert good.exit_code == 0, good.output
    assert "(INT8 ort-u8," in good.output
    manifest = json.loads((tmp_path / "b" / "export.json").read_text())
    assert manifest["int8_format"] == "ort-u8" and manifest["int8_choice"]["requested"] == "ort-u8"
    assert list(manifest["int8_choice"]["tried"]) == ["ort-u8"]
