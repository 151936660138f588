"""Each fix in obert_modifiers.compat is needed: the same check passes with the fix and fails, with
the specific error SparseML 1.8 gives on this stack, when ``OBERT_COMPAT_DISABLE`` turns it off.

Every check runs in a fresh interpreter that imports nothing of ours by hand (the start-up hook
applies the fixes), through tests/plugins/compat_probe.py or the stock SparseML console scripts.
A stock training run (GMP + OBS + QAT, saved as safetensors) and a stock export show the fixes
working together end to end.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _helpers import (
    check,
    offline_env,
    run,
    run_python,
    stock_export_command,
    stock_train_command,
    subset_csv,
)

from obert_modifiers import compat

PROBE = Path(__file__).parent / "plugins" / "compat_probe.py"

RECIPE = textwrap.dedent(
    """
    modifiers:
      - !EpochRangeModifier
        start_epoch: 0.0
        end_epoch: 1.0
      - !GMPruningModifier
        params: ["re:bert.encoder.layer.*.(intermediate|output).dense.weight"]
        init_sparsity: 0.05
        final_sparsity: 0.5
        start_epoch: 0.0
        end_epoch: 0.5
        update_frequency: 0.25
      - !OBSPruningModifier
        params: ["re:bert.encoder.layer.*.attention.self.(query|key|value).weight"]
        init_sparsity: 0.1
        final_sparsity: 0.5
        start_epoch: 0.0
        end_epoch: 0.5
        update_frequency: 0.25
        num_grads: 8
        fisher_block_size: 8
        grad_sampler_kwargs:
          batch_size: 4
      - !QuantizationModifier
        start_epoch: 0.5
        freeze_bn_stats_epoch: 0.9
        ignore: [LayerNorm, GELUActivation, Tanh, classifier, Dropout]
        scheme_overrides:
          Embedding:
            input_activations: null
            weights:
              num_bits: 8
              symmetric: false
    """
)


def _env(tmp: Path, disable: str = "", **extra: str) -> dict:
    env = {**os.environ, compat.DISABLE_ENV: disable, **extra}
    # a fresh module cache: a metric script cached by an earlier run must not hide a missing fix
    env["HF_MODULES_CACHE"] = str(tmp / "hf-modules")
    env.pop("PYTHONPATH", None)
    return env


def _probe(tmp: Path, names: str, disable: str = "", **options: str) -> subprocess.CompletedProcess:
    args = [sys.executable, PROBE, names]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}"] + ([] if value is True else [value])
    return run(args, _env(tmp, disable), cwd=tmp)


def _results(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-4000:]
    found = {}
    for line in result.stdout.splitlines():
        if line.startswith("PROBE "):
            _, name, payload = line.split(" ", 2)
            found[name] = json.loads(payload)
    return found


def _failure(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, f"expected a failure with the fix disabled, got:\n{result.stdout[-2000:]}"
    return result.stderr


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, bbc_data_dir) -> Path:
    out = tmp_path_factory.mktemp("compat-data")
    subset_csv(bbc_data_dir / "train.csv", out / "train.csv", 96)
    subset_csv(bbc_data_dir / "validation.csv", out / "validation.csv", 16)
    return out


@pytest.fixture(scope="module")
def qat_model(tmp_path_factory, tiny_bert_dir, data_dir) -> Path:
    """GMP + OBS + QAT through the stock training script, saved the default way (model.safetensors)."""
    tmp = tmp_path_factory.mktemp("compat-train")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(RECIPE)
    model_dir = tmp / "run" / "model"
    command = stock_train_command(
        tiny_bert_dir, data_dir, model_dir, recipe, "--do_eval", "--save_strategy", "no"
    )  # saved the default way: model.safetensors
    check(run(command, _env(tmp), cwd=tmp), "stock training")
    return model_dir


@pytest.fixture(scope="module")
def qat_model_bin(tmp_path_factory, qat_model) -> Path:
    """The same trained weights saved as pytorch_model.bin, the format SparseML reloads natively."""
    import torch
    from safetensors.torch import load_file

    bin_dir = tmp_path_factory.mktemp("compat-bin") / "model"
    shutil.copytree(qat_model, bin_dir)
    torch.save(load_file(str(bin_dir / "model.safetensors")), bin_dir / "pytorch_model.bin")
    (bin_dir / "model.safetensors").unlink()
    return bin_dir


# --------------------------------------------------------------------------------------------
# all fixes together, through the stock scripts
# --------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_stock_training_with_gmp_obs_qat(qat_model):
    """Needs qconfig_slots (QAT), grad_sampler_loader (OBS) and offline_metrics (evaluation)."""
    from safetensors.torch import load_file

    assert not list(qat_model.glob("pytorch_model*.bin")), "expected the default safetensors checkpoint"
    weights = load_file(str(qat_model / "model.safetensors"))
    assert sum(k.endswith(".zero_point") for k in weights) > 20  # QAT observers were saved
    for name in ("attention.self.query", "intermediate.dense"):  # pruned by OBS and by GMP
        tensor = weights[f"bert.encoder.layer.0.{name}.module.weight"]
        assert 0.4 < float((tensor == 0).float().mean()) < 0.6, name
    results = json.loads((qat_model / "eval_results.json").read_text())
    assert 0.0 <= results["eval_accuracy"] <= 1.0


def _export(model_dir: Path, tmp: Path) -> Path:
    check(run(stock_export_command(model_dir), _env(tmp), cwd=model_dir.parent), "stock export")
    return model_dir.parent / "deployment" / "model.onnx"


@pytest.mark.integration
def test_stock_export_of_safetensors_qat_model_matches_bin_export(
    qat_model, qat_model_bin, data_dir, tmp_path
):
    """Needs onnx_dynamo_export (any export) and safetensors_reload (the weights are the trained ones):
    the safetensors checkpoint exports to the same graph as the same weights saved as .bin, the
    format SparseML reloads natively."""
    import numpy as np
    import onnx
    import onnxruntime
    from transformers import AutoTokenizer

    # the exporter writes next to the model folder: export copies, in folders of their own
    safetensors_dir = tmp_path / "st" / "model"
    bin_dir = tmp_path / "bin" / "model"
    shutil.copytree(qat_model, safetensors_dir)
    shutil.copytree(qat_model_bin, bin_dir)

    outputs = []
    tokenizer = AutoTokenizer.from_pretrained(qat_model)
    with open(data_dir / "validation.csv", newline="") as handle:
        sentences = [row["sentence"] for row in csv.DictReader(handle)][:6]
    for model_dir in (safetensors_dir, bin_dir):
        onnx_path = _export(model_dir, tmp_path)
        graph = onnx.load(str(onnx_path)).graph
        ops = {node.op_type for node in graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} & ops and "MatMulInteger" in ops, sorted(ops)
        session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        logits = []
        for sentence in sentences:
            encoded = tokenizer(
                sentence, padding="max_length", truncation=True, max_length=64, return_tensors="np"
            )
            logits.append(session.run(None, {n: encoded[n].astype(np.int64) for n in names})[0])
        outputs.append(np.concatenate(logits))
    assert np.isfinite(outputs[0]).all()
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-6)


# --------------------------------------------------------------------------------------------
# one fix at a time: with it the probe passes, without it SparseML fails as it does upstream
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def enabled_probes(tmp_path_factory, tiny_bert_dir, data_dir, qat_model, qat_model_bin) -> dict:
    """Every probe in one fresh process with all fixes on."""
    tmp = tmp_path_factory.mktemp("probes")
    return _results(
        _probe(
            tmp,
            "qconfig,metrics,onnx,grad_sampler,reload,reload_bin,rng_state",
            model=str(tiny_bert_dir),
            qat_model=str(qat_model),
            qat_model_bin=os.path.relpath(qat_model_bin, tmp),
            train_csv=str(data_dir / "train.csv"),
            out=str(tmp),
            all_metrics=True,
        )
    )


@pytest.mark.integration
def test_qconfig_slots(enabled_probes, tmp_path):
    assert enabled_probes["qconfig"] == {
        "is_qconfig": True,
        "scheme_kept": True,
        "weight_observer": "FakeQuantize",
        "pickles": True,  # QAT modules holding these qconfigs can still be pickled
    }
    stderr = _failure(_probe(tmp_path, "qconfig", disable="qconfig_slots"))
    assert "AttributeError: 'QConfig' object has no attribute 'quantization_scheme'" in stderr


@pytest.mark.integration
def test_grad_sampler_loader(enabled_probes, tiny_bert_dir, data_dir, tmp_path):
    result = enabled_probes["grad_sampler"]
    assert result["train_loader"] == "DataLoaderShard"  # accelerate's loader, what SparseML trips over
    assert result["batch_sizes"] == [3] * 9  # grad_sampler_kwargs.batch_size honoured, cycles forever
    assert result["keys"] == [
        "attention_mask",
        "input_ids",
        "labels",
        "token_type_ids",
    ]  # text column dropped
    stderr = _failure(
        _probe(
            tmp_path,
            "grad_sampler",
            disable="grad_sampler_loader",
            model=str(tiny_bert_dir),
            train_csv=str(data_dir / "train.csv"),
        )
    )
    assert "TypeError: DataLoader.__init__() got an unexpected keyword argument 'gradient_state'" in stderr


@pytest.mark.integration
def test_onnx_dynamo_export(enabled_probes, tmp_path):
    result = enabled_probes["onnx"]
    assert result["max_abs_diff"] < 1e-5
    # only SparseML's calls are redirected: a direct call keeps torch's default (dynamo -> onnxscript)
    assert "onnxscript" in result["direct_call"]
    stderr = _failure(_probe(tmp_path, "onnx", disable="onnx_dynamo_export", out=str(tmp_path)))
    assert "ModuleNotFoundError: No module named 'onnxscript'" in stderr


@pytest.mark.integration
def test_safetensors_reload(enabled_probes, qat_model, tmp_path):
    result = enabled_probes["reload"]
    assert result["keys_compared"] == result["keys_saved"] > 400 and result["qat_keys"] > 20
    assert result["keys_differing"] == 0
    disabled = _probe(tmp_path, "reload", disable="safetensors_reload", qat_model=str(qat_model))
    broken = _results(disabled)["reload"]  # SparseML carries on silently with wrong weights...
    assert "Model state was not reloaded for SparseML: could not find model weights" in disabled.stderr
    assert broken["keys_differing"] > 100, broken  # ...the restructured (QAT) parameters are random


@pytest.mark.integration
def test_reload_relative_path(enabled_probes, qat_model_bin, tmp_path):
    result = enabled_probes["reload_bin"]
    assert result["keys_compared"] == result["keys_saved"] > 400 and result["keys_differing"] == 0
    relative = os.path.relpath(qat_model_bin, tmp_path)
    stderr = _failure(_probe(tmp_path, "reload_bin", disable="reload_relative_path", qat_model_bin=relative))
    doubled = os.path.join(relative, relative, "pytorch_model.bin")
    assert f"FileNotFoundError: [Errno 2] No such file or directory: '{doubled}'" in stderr, stderr[-2000:]


@pytest.mark.integration
def test_safetensors_qat_detect(enabled_probes, qat_model, tmp_path):
    assert enabled_probes["reload"]["delayed_qat_load"] is True
    disabled = _results(
        _probe(tmp_path, "reload", disable="safetensors_qat_detect", qat_model=str(qat_model))
    )
    assert disabled["reload"]["delayed_qat_load"] is False


@pytest.mark.integration
def test_offline_metrics(enabled_probes, tmp_path):
    metrics = enabled_probes["metrics"]
    assert metrics["accuracy"] == {"accuracy": 0.75}
    assert metrics["seqeval"]["PER"]["f1"] == 1.0 and metrics["seqeval"]["overall_f1"] == 0.5
    assert metrics["seqeval"]["overall_accuracy"] == 0.75
    assert metrics["squad"] == {"exact_match": 50.0, "f1": 50.0}
    assert metrics["squad_v2"]["exact"] == 100.0 and metrics["squad_v2"]["NoAns_total"] == 1
    assert metrics["glue_mrpc"] == {"accuracy": 0.75, "f1": pytest.approx(0.8)}
    assert metrics["glue_cola"] == {"matthews_correlation": 1.0}
    stderr = _failure(_probe(tmp_path, "metrics", disable="offline_metrics"))
    assert re.search(r"OfflineModeIsEnabled: .*metrics/accuracy/accuracy\.py", stderr), stderr[-2000:]


@pytest.mark.integration
def test_rng_state_resume(enabled_probes, tiny_bert_dir, tmp_path):
    assert enabled_probes["rng_state"] == {"restored": True}
    stderr = _failure(
        _probe(tmp_path, "rng_state", disable="rng_state_resume", model=str(tiny_bert_dir), out=str(tmp_path))
    )
    assert "Weights only load failed" in stderr and "_reconstruct" in stderr, stderr[-2000:]


TRAIN_PROBE = Path(__file__).parent / "plugins" / "train_probe"
LR_RECIPE = """
modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: 1.0
"""
LR_MODIFIER = """
  - !LearningRateFunctionModifier
    lr_func: linear
    init_lr: 0.001
    final_lr: 0.0001
    start_epoch: 0.0
    end_epoch: 1.0
"""


def _train_with_probe(tmp: Path, data_dir: Path, model_dir: Path, recipe: str, disable: str = "") -> dict:
    """A stock training run (6 steps, checkpoint-3) watched by tests/plugins/train_probe: the learning
    rate each real optimizer step used, and at each trainer log the logged rate and the one the
    stepping optimizer holds."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "recipe.yaml").write_text(recipe)
    log = tmp / "probe.jsonl"
    env = _env(tmp, disable, OBERT_TRAIN_PROBE_LOG=str(log))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TRAIN_PROBE), os.environ.get("PYTHONPATH")) if p)
    out = tmp / "out"
    flags = ("--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "3", "--save_safetensors")
    command = stock_train_command(model_dir, data_dir, out, tmp / "recipe.yaml", *flags, "False")
    check(run(command, env, cwd=tmp), "training")
    events = [json.loads(line) for line in log.read_text().splitlines()]
    return {
        "used": [e["lr"] for e in events if e["event"] == "step"],
        "logs": [e for e in events if e["event"] == "log"],
        "optimizer": {name: _load(out / name / "optimizer.pt") for name in ("checkpoint-3", ".")},
    }


def _load(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.integration
def test_scheduled_optimizer_state(tiny_bert_dir, data_dir, tmp_path):
    """With a recipe the trainer's AdamW sits inside SparseML's ScheduledOptimizer inside accelerate's
    AcceleratedOptimizer: the rate AdamW steps with is the logged one, with an LR modifier (here) and
    without (the HF linear decay: tests/test_resume.py), and checkpoints hold Adam's moments. Without
    the fix the scheduler drives a detached copy: a constant rate, a decay in the log, ``state: {}``."""
    with_modifier = _train_with_probe(tmp_path / "lr", data_dir, tiny_bert_dir, LR_RECIPE + LR_MODIFIER)
    assert len(with_modifier["used"]) == 6 and len(with_modifier["logs"]) == 6
    for entry in with_modifier["logs"]:
        assert entry["held"] == pytest.approx(entry["logged"], rel=1e-12), entry
    used = with_modifier["used"]
    assert used[0] == pytest.approx(1e-3) and all(a > b for a, b in zip(used, used[1:], strict=False))
    for name, saved in with_modifier["optimizer"].items():
        indices = [i for group in saved["param_groups"] for i in group["params"]]
        assert len(indices) > 50 and sorted(saved["state"]) == sorted(indices), name
        assert all({"exp_avg", "exp_avg_sq"} <= set(saved["state"][i]) for i in indices), name

    broken = _train_with_probe(
        tmp_path / "broken", data_dir, tiny_bert_dir, LR_RECIPE, disable="scheduled_optimizer_state"
    )
    assert broken["used"] == [5e-05] * 6  # AdamW never sees the schedule
    assert [e["logged"] for e in broken["logs"]] == pytest.approx([5e-05 * (1 - s / 6) for s in range(1, 7)])
    assert broken["logs"][0]["held"] != broken["logs"][0]["logged"]
    assert all(saved["state"] == {} for saved in broken["optimizer"].values())


def _probe_with_and_without(probe: str, fix: str, tmp_path: Path) -> tuple[dict, dict]:
    """Run ``probe`` on a fresh tiny deployment folder with every fix, and on a copy with ``fix``
    disabled; return the JSON each printed last."""
    pytest.importorskip("deepsparse", reason="DeepSparse is the optional [deepsparse] extra")
    from obert_modifiers.testing.hub_fixtures import make_tiny_bert_folders

    deployment, _ = make_tiny_bert_folders(tmp_path / "model", sequence_length=32)
    second = tmp_path / "second"
    shutil.copytree(deployment, second)
    reports = []
    for folder, env, label in (
        (deployment, None, "with"),
        (second, offline_env(OBERT_COMPAT_DISABLE=fix), "without"),
    ):
        result = run_python(probe, folder, env=env)
        check(result, f"{fix} probe {label} the fix")
        reports.append(json.loads(result.stdout.strip().splitlines()[-1]))
    return reports[0], reports[1]


_DEEPSPARSE_PROBE = """
import hashlib, json, sys
from pathlib import Path
import onnx
from deepsparse import Pipeline
folder = Path(sys.argv[1])
before = hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()
pipeline = Pipeline.create(task="text-classification", model_path=str(folder), sequence_length=16)
labels = pipeline(sequences=["the central bank raised interest rates"]).labels
after = hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()
graph_input = onnx.load(str(folder / "model.onnx")).graph.input[0]
dims = [d.dim_value or d.dim_param for d in graph_input.type.tensor_type.shape.dim]
result = {"unchanged": before == after, "dims": dims, "labels": labels}
print(json.dumps({**result, "sparseml": "sparseml" in sys.modules}))
"""


@pytest.mark.integration
def test_deepsparse_pipeline_inplace(tmp_path):
    """A DeepSparse pipeline leaves the deployment folder's model.onnx untouched (dynamic axes kept);
    without the fix it rewrites it with static [1, sequence_length] inputs. The fix reaches a process
    that imports DeepSparse only."""
    result, broken = _probe_with_and_without(_DEEPSPARSE_PROBE, "deepsparse_pipeline_inplace", tmp_path)
    assert result["unchanged"] and result["dims"] == ["batch", "sequence"], result
    assert result["sparseml"] is False and len(result["labels"]) == 1
    assert not broken["unchanged"] and broken["dims"] == [1, 16], broken


_DEEPSPARSE_SHAPES_PROBE = """
import hashlib, json, sys
from pathlib import Path
import numpy as np
import onnx
from deepsparse import Engine
onnx_path = Path(sys.argv[1]) / "model.onnx"
before = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
engine = Engine(model=str(onnx_path), batch_size=1, input_shapes=[[1, 16]] * 3)
outputs = engine.run([np.ones((1, 16), dtype="int64")] * 3)
after = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
graph_input = onnx.load(str(onnx_path)).graph.input[0]
dims = [d.dim_value or d.dim_param for d in graph_input.type.tensor_type.shape.dim]
print(json.dumps({"unchanged": before == after, "dims": dims, "shape": list(outputs[0].shape)}))
"""


@pytest.mark.integration
def test_deepsparse_shape_override_inplace(tmp_path):
    """``deepsparse.Engine(..., input_shapes=...)`` (the path of ``deepsparse.benchmark --input_shapes``
    and ``deepsparse.debug_analysis -shapes``) compiles the static shapes from a temporary copy and
    leaves the deployment's model.onnx dynamic; without the fix it rewrites it as ``[1, 16]``."""
    result, broken = _probe_with_and_without(
        _DEEPSPARSE_SHAPES_PROBE, "deepsparse_shape_override_inplace", tmp_path
    )
    assert result["unchanged"] and result["dims"] == ["batch", "sequence"], result
    assert result["shape"][0] == 1, result
    assert not broken["unchanged"] and broken["dims"] == [1, 16], broken


@pytest.mark.integration
def test_recipe_structure(tiny_bert_dir, data_dir, tmp_path):
    """An empty recipe stops the stock training command with a message that says so; without the
    fix SparseML's loader fails with TypeError / AttributeError, and a key given twice is taken."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    command = stock_train_command(tiny_bert_dir, data_dir, tmp_path / "out", empty, "--save_strategy", "no")
    trained = run(command, offline_env(), cwd=tmp_path)
    assert trained.returncode != 0
    assert f"RecipeCheckError: {empty}: the recipe is empty" in trained.stderr.strip().splitlines()[-1]

    listed = tmp_path / "list.yaml"
    listed.write_text("- !EpochRangeModifier\n  start_epoch: 0.0\n  end_epoch: 1.0\n")
    twice = tmp_path / "twice.yaml"
    twice.write_text("modifiers:\n  - !EpochRangeModifier\n    start_epoch: 0.0\n    end_epoch: 1.0\n")
    twice.write_text(twice.read_text() + "    end_epoch: 2.0\n")
    code = (
        "import sys\n"
        "from sparseml.pytorch.optim import ScheduledModifierManager\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        manager = ScheduledModifierManager.from_yaml(path)\n"
        "        print('LOADED', manager.modifiers[0].end_epoch)\n"
        "    except Exception as error:\n"
        "        print('FAILED', type(error).__name__, error)\n"
    )
    for disable, expected in (
        ("", ["RecipeCheckError", "RecipeCheckError", "RecipeCheckError"]),
        ("recipe_structure", ["TypeError", "AttributeError", "LOADED 2.0"]),
    ):
        env = offline_env(**{compat.DISABLE_ENV: disable})
        result = run_python(code, empty, listed, twice, env=env, cwd=tmp_path)
        check(result, "loading the recipes")
        lines = [line for line in result.stdout.splitlines() if line.startswith(("LOADED", "FAILED"))]
        assert len(lines) == 3 and all(e in line for e, line in zip(expected, lines, strict=True)), lines
    assert "'NoneType' object is not iterable" in lines[0]
    assert "'list' object has no attribute 'items'" in lines[1]


@pytest.mark.integration
def test_structure_config(tmp_path):
    """A model whose FFN widths were shrunk per layer (config.obert_structure) is built with those
    shapes by from_pretrained; without the fix transformers refuses it (size mismatch), so a shrunk
    model never loads onto random weights either way."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from obert_modifiers.algorithms.shrink import save_shrunk_model, shrink_model
    from obert_modifiers.models import save_tiny_bert

    folder = save_tiny_bert(tmp_path / "tiny", num_labels=2)
    model = BertForSequenceClassification.from_pretrained(folder).eval()
    shrink_model(model, heads={0: []}, ffn={1: list(range(7)), 2: []})
    out = save_shrunk_model(model, tmp_path / "shrunk", tokenizer=AutoTokenizer.from_pretrained(folder))
    ids = torch.arange(1000, 1016).reshape(2, 8)
    with torch.no_grad():
        expected = model(input_ids=ids).logits.tolist()
    code = (
        "import json, sys, torch\nfrom transformers import AutoModelForSequenceClassification as M\n"
        "try:\n    model = M.from_pretrained(sys.argv[1]).eval()\n"
        "except Exception as e:\n    print('REFUSED', str(e)[:300])\n"
        "else:\n    ids = torch.arange(1000, 1016).reshape(2, 8)\n"
        "    print('LOADED', json.dumps(model(input_ids=ids).logits.tolist()))\n"
    )
    without = run_python(code, out, env=offline_env(**{compat.DISABLE_ENV: "structure_config"}))
    assert "REFUSED" in without.stdout and "size mismatch" in without.stdout, without.stdout + without.stderr
    with_fix = run_python(code, out, env=offline_env(**{compat.DISABLE_ENV: ""}))
    assert "LOADED" in with_fix.stdout, with_fix.stdout + with_fix.stderr
    logits = json.loads(with_fix.stdout.split("LOADED", 1)[1])
    assert max(abs(a - b) for row, ref in zip(logits, expected, strict=True)
               for a, b in zip(row, ref, strict=True)) < 1e-5  # fmt: skip


def test_every_fix_has_a_test_and_docs():
    tested = {name[len("test_") :] for name in globals() if name.startswith("test_")}
    assert set(compat.FIXES) <= tested, set(compat.FIXES) - tested
    docs = (Path(__file__).parents[1] / "docs" / "compat.md").read_text()
    for name, fix in compat.FIXES.items():
        assert f"`{name}`" in docs, f"docs/compat.md does not describe {name}"
        assert fix.function.__doc__ and "Without it" in fix.function.__doc__, name


@pytest.mark.integration
def test_every_fix_reaches_the_stock_entry_points(tmp_path):
    """The lazy scheduling misses nothing: after importing the stock training and export modules
    and DeepSparse's transformers pipelines, each fix has been applied to each of its modules that
    is loaded."""
    code = (
        "import sys, json, sparseml.transformers.text_classification, sparseml.transformers.export\n"
        "import deepsparse.transformers.pipelines.text_classification\n"
        "from obert_modifiers import compat\n"
        "loaded = sorted((f.name, m) for f in compat.FIXES.values() for m in f.modules if m in sys.modules)\n"
        "print(json.dumps({'loaded': loaded, 'applied': compat.applied_fixes()}))\n"
    )
    result = run_python(code, env=_env(tmp_path))
    check(result, "importing the stock entry points", tail=3000)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert {name for name, _ in report["loaded"]} == set(compat.FIXES)  # every fix has a loaded target
    assert report["applied"] == report["loaded"]


def test_unknown_fix_name_warns(monkeypatch):
    monkeypatch.setenv(compat.DISABLE_ENV, "qconfig_slots, no_such_fix")
    with pytest.warns(RuntimeWarning, match="no_such_fix"):
        assert compat.disabled_fixes() == {"qconfig_slots"}
    monkeypatch.setenv(compat.DISABLE_ENV, "all")
    assert compat.disabled_fixes() == set(compat.FIXES)


# --------------------------------------------------------------------------------------------
# analytics are off by default
# --------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_analytics_disabled_by_default_in_every_process():
    env = {k: v for k, v in os.environ.items() if k not in ("NM_DISABLE_ANALYTICS", "OBERT_ALLOW_ANALYTICS")}
    code = (
        "import os; print(os.environ.get('NM_DISABLE_ANALYTICS'));"
        "import sparsezoo.analytics as a;"
        "print(bool(a.sparsezoo_analytics._disabled), a.analytics_disabled())"
    )
    result = run_python(code, env=env)
    check(result, "python -c", tail=2000)
    # set by the .pth hook before anything else runs, and honoured by sparsezoo's own check
    assert result.stdout.split() == ["1", "True", "1"]

    opted_in = run_python(
        "import os; print(os.environ.get('NM_DISABLE_ANALYTICS'))", env={**env, "OBERT_ALLOW_ANALYTICS": "1"}
    )
    assert opted_in.stdout.strip() == "None"


@pytest.mark.integration
def test_empty_weight_sparsity(tmp_path):
    """SparseML's end-of-training sparsity report on a model with a removed block (zero-width
    linears kept for their names): NaN -> ValueError without the fix, a number with it."""
    from obert_modifiers.algorithms.shrink import save_shrunk_model, shrink_model
    from obert_modifiers.models import save_tiny_bert

    folder = save_tiny_bert(tmp_path / "tiny", num_labels=2)
    from transformers import AutoTokenizer, BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(folder)
    shrink_model(model, heads={0: []}, ffn={1: []})
    out = save_shrunk_model(model, tmp_path / "shrunk", tokenizer=AutoTokenizer.from_pretrained(folder))
    code = (
        "import sys\nimport sparseml.pytorch.sparsification  # noqa: F401\n"
        "from sparseml.pytorch.utils.sparsification import ModuleSparsificationInfo\n"
        "from transformers import AutoModelForSequenceClassification as M\n"
        "info = ModuleSparsificationInfo(M.from_pretrained(sys.argv[1]))\n"
        "try:\n    print('PERCENT', info.params_prunable_sparse_percent, info.params_sparse_percent)\n"
        "except Exception as e:\n    print('FAILED', type(e).__name__, e)\n"
    )
    without = run_python(code, out, env=offline_env(**{compat.DISABLE_ENV: "empty_weight_sparsity"}))
    assert "FAILED ValueError cannot convert float NaN to integer" in without.stdout, (
        without.stdout + without.stderr
    )
    with_fix = run_python(code, out, env=offline_env(**{compat.DISABLE_ENV: ""}))
    assert "PERCENT" in with_fix.stdout, with_fix.stdout + with_fix.stderr
    percent, overall = map(float, with_fix.stdout.split("PERCENT", 1)[1].split())
    assert 0.0 <= percent < 1.0 and 0.0 <= overall < 1.0  # a dense (shrunk) model: ~0 % zeros


@pytest.mark.integration
def test_ziplm_resume(tmp_path, tiny_bert_dir, bbc_data_dir):
    """--resume_from_checkpoint after a !ZipLMPruningModifier step: without the fix the stock command
    builds the dense model and cannot load the shrunk checkpoint (size mismatch); with it the run
    resumes (tests/test_resume.py shows it then ends as the uninterrupted run, weight for weight)."""
    data = tmp_path / "data"
    data.mkdir()
    subset_csv(bbc_data_dir / "train.csv", data / "train.csv", 64)
    subset_csv(bbc_data_dir / "validation.csv", data / "validation.csv", 16)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "modifiers:\n  - !EpochRangeModifier\n    start_epoch: 0.0\n    end_epoch: 1.5\n"
        "  - !ZipLMPruningModifier\n    start_epoch: 0.5\n    update_frequency: 0.5\n"
        "    speedup_targets: [1.5, 2.0]\n    num_calibration_samples: 16\n    calibration_batch_size: 8\n"
        "    latency_runtime: flops\n    latency_sequence_length: 32\n"
    )
    flags = ("--save_safetensors", "False", "--seed", "7", "--save_strategy", "steps", "--save_steps", "4")

    def train(out: Path, *extra: str) -> list[str]:
        return stock_train_command(tiny_bert_dir, data, out, recipe, *flags, *extra, max_seq_length=32)

    check(run(train(tmp_path / "full"), _env(tmp_path), cwd=tmp_path), "training to checkpoint-4")
    checkpoint = tmp_path / "full" / "checkpoint-4"  # after the first ZipLM step (epoch 0.5, step 3)
    assert json.loads((checkpoint / "config.json").read_text())["obert_ziplm"]["target_speedup"] == 1.5
    resume = ("--resume_from_checkpoint", str(checkpoint))
    without = run(train(tmp_path / "without", *resume), _env(tmp_path, "ziplm_resume"), cwd=tmp_path)
    assert without.returncode != 0 and "size mismatch" in without.stdout + without.stderr
    with_fix = run(train(tmp_path / "with", *resume), _env(tmp_path), cwd=tmp_path)
    check(with_fix, "resumed run")
    config = json.loads((tmp_path / "with" / "config.json").read_text())
    assert config["obert_ziplm"]["target_speedup"] == 2.0  # the second step came after the resume
