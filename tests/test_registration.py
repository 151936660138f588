"""Registration that needs no user action (issue 2, item 4).

* The start-up hook is cheap: a plain interpreter, and ``import obert_modifiers``, import neither
  torch nor SparseML.
* A third-party modifier plugin, installed as a distribution advertising the entry-point group
  ``obert_modifiers.modifiers``, is found by the STOCK SparseML console scripts: training with a recipe
  that uses its tag, and exporting the result (which re-reads the saved ``recipe.yaml``), each in a
  fresh process where nobody imports anything by hand. The exported ONNX runs in ONNX Runtime and
  matches the PyTorch model.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from _helpers import check, run, run_python, stock_export_command, stock_train_command, subset_csv

PLUGINS = Path(__file__).parent / "plugins"
HEAVY = ("torch", "sparseml", "transformers", "datasets", "sparsezoo", "yaml", "numpy")


def _install_dist(site: Path, dist_name: str, entry_points: dict, modules: tuple = ()) -> None:
    """Make ``site`` hold a distribution as importlib.metadata sees an installed one."""
    site.mkdir(parents=True, exist_ok=True)
    info = site / f"{dist_name.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 0.1.0\n")
    lines = ["[obert_modifiers.modifiers]"] + [f"{name} = {value}" for name, value in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for module in modules:
        shutil.copy(module, site / Path(module).name)


# --------------------------------------------------------------------------------------------
# the hook is cheap
# --------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_plain_interpreter_and_package_import_stay_light():
    # `pass`: the .pth hook runs (obert_modifiers._hook is imported) but nothing heavy is
    plain = run([sys.executable, "-X", "importtime", "-c", "pass"])
    check(plain, "python -c pass")
    imported = {
        line.split("|")[-1].strip() for line in plain.stderr.splitlines() if line.startswith("import time:")
    }
    assert "obert_modifiers._hook" in imported, "the start-up hook (.pth) did not run"
    assert not {m for m in imported if m.split(".")[0] in HEAVY}, sorted(imported)

    code = (
        "import sys, json, obert_modifiers; "
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))"
    )
    package = run_python(code)
    check(package, "import obert_modifiers")
    assert json.loads(package.stdout.strip().splitlines()[-1]) == []


def test_entry_point_plugins_are_loaded_and_broken_ones_reported(tmp_path, monkeypatch):
    from obert_modifiers import registration

    module = tmp_path / "obert_light_plugin.py"
    module.write_text("import os\nLOADED = os.getpid()\n")
    site = tmp_path / "site"
    _install_dist(site, "obert-light-plugin", {"light": "obert_light_plugin"}, modules=(module,))
    _install_dist(site, "obert-broken-plugin", {"broken": "obert_no_such_module_xyz"})
    monkeypatch.syspath_prepend(str(site))

    names = {ep.value for ep in registration.plugin_entry_points()}
    assert {"obert_light_plugin", "obert_no_such_module_xyz"} <= names
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = registration.load_plugins()
    assert "obert_light_plugin" in loaded and "obert_no_such_module_xyz" not in loaded
    assert sys.modules["obert_light_plugin"].LOADED == os.getpid()
    messages = [str(w.message) for w in caught if issubclass(w.category, registration.PluginLoadWarning)]
    assert any("obert_no_such_module_xyz" in m and "obert-broken-plugin" in m for m in messages), messages


# --------------------------------------------------------------------------------------------
# a plugin tag through the stock console scripts
# --------------------------------------------------------------------------------------------

CLIP = 0.01
RECIPE = textwrap.dedent(
    f"""
    modifiers:
      - !EpochRangeModifier
        start_epoch: 0.0
        end_epoch: 1.0
      - !ObertTestClipModifier
        params: [classifier.weight]
        clip: {CLIP}
        start_epoch: 0.0
        end_epoch: 1.0
    """
)


@pytest.mark.integration
def test_stock_scripts_train_and_export_with_a_plugin_tag(tmp_path, tiny_bert_dir, bbc_data_dir):
    import numpy as np
    import onnxruntime
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    site = tmp_path / "site"
    _install_dist(
        site, "obert-test-plugin", {"clip": "obert_test_plugin"}, modules=(PLUGINS / "obert_test_plugin.py",)
    )
    log = tmp_path / "plugin.log"
    env = {**os.environ, "PYTHONPATH": str(site), "OBERT_TEST_PLUGIN_LOG": str(log)}
    subset_csv(bbc_data_dir / "train.csv", tmp_path / "train.csv", 96)
    validation_csv = subset_csv(bbc_data_dir / "validation.csv", tmp_path / "validation.csv", 16)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    start = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    assert start.classifier.weight.abs().max() > 2 * CLIP  # so the clamp has something to do

    run_dir = tmp_path / "run"
    model_dir = run_dir / "model"

    def train_command(output_dir: Path) -> list:
        flags = ("--do_eval", "--learning_rate", "1e-3", "--save_strategy", "no")
        return stock_train_command(tiny_bert_dir, tmp_path, output_dir, recipe, *flags)

    # control: the same module importable but not advertised as a plugin -> SparseML cannot resolve the tag
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(PLUGINS / "obert_test_plugin.py", bare)
    control = run(train_command(tmp_path / "control"), env={**env, "PYTHONPATH": str(bare)}, cwd=tmp_path)
    assert control.returncode != 0
    assert "could not determine a constructor for the tag '!pytorch.ObertTestClipModifier'" in control.stderr

    train = run(train_command(model_dir), env=env, cwd=tmp_path)
    check(train, "stock text-classification training")

    events = [json.loads(line) for line in log.read_text().splitlines()]
    finalized = [e for e in events if e["event"] == "finalized"]
    assert finalized and finalized[0]["steps"] == 6, events  # 96 rows / 16 per step, every step clamped
    weights = {}
    for path in model_dir.glob("*.safetensors"):
        weights.update(load_file(str(path)))
    if not weights:
        weights = torch.load(model_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    classifier = weights["classifier.weight"]
    assert float(classifier.abs().max()) <= CLIP + 1e-7
    assert float((classifier.abs() >= CLIP - 1e-7).float().mean()) > 0.2  # many weights sit on the bound
    assert "ObertTestClipModifier" in (model_dir / "recipe.yaml").read_text()

    # export in a fresh process: the saved recipe.yaml holds the plugin tag and must resolve again
    train_pids = {e["pid"] for e in events}
    export = run(stock_export_command(model_dir), env=env, cwd=run_dir)
    check(export, "stock sparseml.transformers.export_onnx")
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert {e["pid"] for e in events if e["event"] == "constructed"} - train_pids, (
        "export never built the plugin"
    )
    onnx_path = run_dir / "deployment" / "model.onnx"
    assert onnx_path.is_file()

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with open(validation_csv, newline="") as handle:
        sentences = [row["sentence"] for row in csv.DictReader(handle)][:8]
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    input_names = [i.name for i in session.get_inputs()]
    worst = 0.0
    for sentence in sentences:
        encoded = tokenizer(
            sentence, padding="max_length", truncation=True, max_length=64, return_tensors="np"
        )
        feeds = {name: encoded[name].astype(np.int64) for name in input_names}
        (onnx_logits,) = session.run(None, feeds)
        with torch.no_grad():
            torch_logits = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
        worst = max(worst, float(np.abs(onnx_logits - torch_logits).max()))
    assert worst < 1e-4, f"ONNX and PyTorch logits differ by {worst}"
