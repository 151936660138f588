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


def _dense_parameters(config: dict) -> int:
    """Parameters of the dense BERT classifier ``config`` describes (before any shrink)."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    dense = {k: v for k, v in config.items() if not k.startswith("obert_") and k != "pruned_heads"}
    return AutoModelForSequenceClassification.from_config(BertConfig(**dense)).num_parameters()


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
    # recipes/demo.yaml: !ZipLMPruningModifier to 2x then 3x (ORT INT8 latency table), then QAT
    structure = summary["structure"]
    config = json.loads((out / "model" / "config.json").read_text())
    dense_heads = config["num_attention_heads"] * config["num_hidden_layers"]
    assert structure["heads"] == config["obert_structure"]["heads"] and sum(structure["heads"]) < dense_heads
    assert structure["target_speedup"] == 3.0 and structure["predicted_speedup"] >= 3.0 - 1e-9
    assert structure["latency_key"]["runtime"] == "onnxruntime"
    assert structure["latency_key"]["precision"] == "int8"
    assert summary["num_parameters"] < _dense_parameters(config)  # tiny BERT: mostly embeddings
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
    paired = summary["speedup_paired_onnxruntime"]  # dense and the model in alternating blocks
    assert len(paired["ratios"]) == 4 and paired["median"] > 0
    assert paired["baseline"] == "dense-deployment/model.onnx"
    assert paired["candidate"] == "deployment/model.onnx"
    assert "measured speed-up (ORT, paired)" in result.stdout
    # published to a loopback hub with a card, pulled back by stub (sha256 checked by the round trip)
    stub = summary["hub"]["stub"]
    assert stub.endswith("/rotten_tomatoes/structured3x_quant-none") and summary["hub"]["files"] > 5
    assert (out / summary["hub"]["pulled"] / "config.json").is_file()
    assert (out / "deployment" / "model.onnx").is_file()
    assert not (out / "model" / "optimizer.pt").exists()
    assert not any(p.name.startswith(".demo") for p in tmp_path.iterdir())  # staging folder renamed
    assert "latency: onnxruntime" in result.stdout and "test accuracy (PyTorch)" in result.stdout
    assert "hub round trip" in result.stdout
    assert "structure: heads kept" in result.stdout and "predicted speed-up" in result.stdout
    # the screen shows the steps, progress and the table; what the libraries log goes to demo.log
    screen = result.stdout + result.stderr
    for noise in ("Transformed", "temporary file", "newly initialized", " INFO "):
        assert noise not in screen, noise
    log = (out / "demo.log").read_text()
    assert " INFO sparseml." in log and "deepsparse.utils.onnx" in log


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


def test_the_demo_recipe_ships_in_the_package_and_matches_the_checkouts():
    """`obert demo` reads its recipe from the package (a wheel has no recipes/ folder); the copy under
    recipes/ that users read and edit is the same file."""
    import obert_modifiers
    from obert_modifiers.demo import DEFAULT_RECIPE

    package = Path(obert_modifiers.__file__).resolve().parent
    assert DEFAULT_RECIPE == package / "recipes" / "demo.yaml"
    assert DEFAULT_RECIPE.read_bytes() == (ROOT / "recipes" / "demo.yaml").read_bytes(), (
        "obert_modifiers/recipes/demo.yaml is the source of truth: copy it to recipes/demo.yaml"
    )
    setup_py = (ROOT / "setup.py").read_text()
    assert '"recipes/*.yaml"' in setup_py  # package_data ships it in the wheel


def test_library_logs_go_to_the_file_and_come_back_after(tmp_path, capsys):
    """Inside third_party_logs, a library's own console handler (SparseML's, also one installed
    while the block runs, as on a first import) and warnings write to the file; afterwards the
    handlers are as they were."""
    import logging
    import warnings

    from obert_modifiers.runs.logs import log_beside, third_party_logs

    library = logging.getLogger("pipeline_test_library")
    library.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    library.addHandler(console)
    log = log_beside(tmp_path / "deployment")
    assert log == tmp_path / "deployment.log"
    try:
        with third_party_logs(log):
            library.info("[ConstantsToInitializers] Transformed 137 matches")
            late = logging.getLogger("pipeline_test_late")
            late.setLevel(logging.INFO)
            late.addHandler(logging.StreamHandler(sys.stderr))  # imported inside the block
            late.info("Using temp file /tmp/x.onnx")
            warnings.warn("Some weights were newly initialized: You should probably TRAIN", UserWarning, 2)
            print("step 4/7 export")  # the run's own output stays on the screen
        library.info("after the block")
        assert library.handlers == [console] and library.propagate
    finally:
        library.removeHandler(console)
    captured = capsys.readouterr()
    text = log.read_text()
    assert "Transformed 137 matches" in text and "temp file" in text and "probably TRAIN" in text
    assert "step 4/7 export" in captured.out
    for line in ("Transformed 137", "temp file", "TRAIN"):
        assert line not in captured.out + captured.err
    assert "after the block" in captured.err and "after the block" not in text
    assert all(isinstance(h, logging.StreamHandler) for h in late.handlers) and late.handlers


def test_run_logged_logs_everything_reports_progress_and_names_the_failure(tmp_path):
    from obert_modifiers.runs.stock import StockRunError, run_logged

    script = (  # tqdm's bars as the stock script prints them; bars with a description are other work
        "import sys\n"
        "print('Running tokenizer on dataset:  50%|#    | 1/2 [00:00<00:00]', flush=True)\n"
        "for i in range(1, 4): print(f'\\r 33%|###   | {i}/3 [00:01]', end='', file=sys.stderr, flush=True)\n"
        "print('\\rCollecting gradients:  50%|##  | 1/64 [00:01<00:01]', end='', flush=True)\n"
        "print('\\n  50%|#####     | 1/2 [eval'); print('100%|##########| 2/2 [eval')\n"
        "print('boom: the tail'); sys.exit(3)\n"
    )
    seen = []
    log = tmp_path / "train.log"
    with pytest.raises(StockRunError, match=r"training failed \(exit 3\); log: .*train\.log") as error:
        run_logged([sys.executable, "-c", script], log, lambda *a: seen.append(a), what="training")
    assert "boom: the tail" in str(error.value)  # the log's last lines
    assert "1/3 [" in log.read_text() and "boom" in log.read_text()
    assert seen == [(1, 3, 0), (2, 3, 0), (3, 3, 0), (1, 2, 1), (2, 2, 1)]  # training, then evaluation


@pytest.mark.integration
def test_obert_export_keeps_sparseml_logs_off_the_screen(tiny_bert_dir, tmp_path):
    """`obert export` of an INT8 model to SparseML's integer graph: SparseML's ONNX transforms log ~20
    INFO lines; they go to <out>.log beside the deployment folder, and the screen shows the export's
    own lines."""
    from test_quantization import make_qat_model_dir

    model = make_qat_model_dir(tiny_bert_dir, tmp_path / "qat")
    out = tmp_path / "deployment"
    result = subprocess.run(
        [str(BIN / "obert"), "export", str(model), "--out", str(out), "--int8-format", "integer"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=_env(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    screen = result.stdout + result.stderr
    assert "wrote" in result.stdout and "INT8" in result.stdout
    assert "Transformed" not in screen and " INFO " not in screen and "UserWarning" not in screen
    log = (tmp_path / "deployment.log").read_text()
    assert "sparseml.exporters.transforms" in log and "Transformed" in log
    assert not (out / "deployment.log").exists()  # the folder holds the deployment contract only


def test_onnx_scoring_copes_with_static_shapes_and_inputs_the_tokenizer_lacks(tiny_bert_dir, tmp_path):
    """One padding rule for every reported accuracy: a graph with a static batch of 4 and sequence
    of 16, and an input the tokenizer does not produce (zeros), scores 5 texts (last batch padded)."""
    import shutil

    import onnx
    from onnx import TensorProto, helper

    from obert_modifiers.runs.evaluate import onnx_accuracy, onnx_predictions

    names = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, [4, 16]) for n in names]
    # logits = [number of real tokens, 6 + sum(position_ids)]: "long" when a text has > 6 tokens
    nodes = [
        helper.make_node("ReduceSum", ["attention_mask", "axes"], ["tokens"], keepdims=1),
        helper.make_node("ReduceSum", ["position_ids", "axes"], ["positions"], keepdims=1),
        helper.make_node("Add", ["positions", "six"], ["short"]),
        helper.make_node("Concat", ["tokens", "short"], ["both"], axis=1),
        helper.make_node("Cast", ["both"], ["logits"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes, "count", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [4, 2])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
                     helper.make_tensor("six", TensorProto.INT64, [1], [6])],
    )  # fmt: skip
    deployment = tmp_path / "deployment"
    shutil.copytree(tiny_bert_dir, deployment)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    onnx.save(model, deployment / "model.onnx")
    config = json.loads((deployment / "config.json").read_text())
    config["id2label"] = {"0": "long", "1": "short"}
    (deployment / "config.json").write_text(json.dumps(config))
    texts = ["a b c d e f g h i j", "a", "a b", "a b c d e f g h", "x"]
    labels = ["long", "short", "short", "long", "short"]
    assert onnx_predictions(deployment, texts) == labels
    test_csv = tmp_path / "test.csv"
    rows = "".join(f"{text},{label}\n" for text, label in zip(texts, labels, strict=True))
    test_csv.write_text("sentence,label\n" + rows.replace("x,short", "x,long"))  # one wrong label
    assert onnx_accuracy(deployment, test_csv) == 0.8
    assert onnx_accuracy(deployment, test_csv, max_rows=2) == 1.0


def test_demo_stub_names_the_structured_target_and_the_sparsity():
    from obert_modifiers.demo import demo_stub, structure_rows
    from obert_modifiers.zoo.stubs import parse_stub

    base = "zoo:nlp/text_classification/minilm-l6/pytorch/huggingface/rotten_tomatoes/"
    assert demo_stub("rt", 0.0, True, False, speedup=3.0) == base + "structured3x_quant-none"
    assert demo_stub("rt", 0.0, False, False, speedup=2.5) == base + "structured2.5x-none"
    assert demo_stub("rt", 0.8, True, False) == base + "pruned80_quant-none"
    assert demo_stub("rt", 0.0, False, False) == base + "base-none"
    for stub in (demo_stub("rt", 0.0, True, False, speedup=2.5), demo_stub("bbc", 0.5, True, True, 3.0)):
        parse_stub(stub)  # valid by the hub's grammar
    rows = structure_rows(
        {"heads": [5, 7], "ffn": [128, 0], "target_speedup": 3.0, "predicted_speedup": 3.01,
         "predicted_latency": 7.7, "dense_latency": 23.3, "unit": "ms",
         "latency_key": {"runtime": "onnxruntime", "precision": "int8", "threads": 2}},
        14_500_000,
    )  # fmt: skip
    assert rows[0][:2] == ("structure: heads kept", "12") and "5 7" in rows[0][2] and "14.5 M" in rows[0][2]
    assert rows[1][:2] == ("structure: FFN neurons kept", "128") and "128 0" in rows[1][2]
    assert rows[2][:2] == ("predicted speed-up", "3.01x") and "runtime onnxruntime" in rows[2][2]


def test_a_failed_demo_keeps_its_logs_where_the_error_says(tmp_path):
    from obert_modifiers.demo import _keep_logs

    out = tmp_path / "runs" / "demo"
    work = tmp_path / "runs" / ".demo.tmp-abc"
    work.mkdir(parents=True)
    (work / "train.log").write_text("Traceback: the stock script failed\n")
    (work / "demo.log").write_text("library lines\n")
    message = _keep_logs(f"training failed (exit 1); log: {work / 'train.log'}", work, out)
    kept = tmp_path / "runs" / "demo.failed-logs"
    assert message == f"training failed (exit 1); log: {kept / 'train.log'}"
    assert (kept / "train.log").read_text() == "Traceback: the stock script failed\n"
    assert (kept / "demo.log").is_file() and not out.exists()
    # an error that names no log still says where the logs went; no logs: the message as it was
    (work / "demo.log").write_text("again\n")
    assert _keep_logs("export failed", work, out) == f"export failed (logs: {kept})"
    assert sorted(p.name for p in kept.iterdir()) == ["demo.log"]  # the older folder was replaced
    assert _keep_logs("data failed", work, out) == "data failed"
