"""The `obert` command: help, recipe check, data prepare, and train's argument handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from obert_modifiers import commands

ROOT = Path(__file__).resolve().parent.parent
OBERT = Path(sys.executable).parent / "obert"

GOOD_RECIPE = """\
num_epochs: 2.0
final: 0.5
modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: eval(num_epochs)
  - !GMPruningModifier
    init_sparsity: 0.05
    final_sparsity: eval(final)
    start_epoch: 0.0
    end_epoch: 1.0
    update_frequency: 0.5
    params: ["re:bert.encoder.layer.*.intermediate.dense.weight"]
"""


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()
    commands.register(app)
    return app


@pytest.fixture
def run(app):
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


def _recipe(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_obert_help_lists_the_commands():
    result = subprocess.run([str(OBERT), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for command in ("train", "recipe", "data", "demo"):
        assert command in result.stdout


def test_recipe_check_prints_every_modifier(run, tmp_path):
    result = run("recipe", "check", _recipe(tmp_path, GOOD_RECIPE))
    assert result.exit_code == 0, result.output
    assert "!GMPruningModifier" in result.output and "!EpochRangeModifier" in result.output
    assert "final_sparsity: 0.5" in result.output
    assert "inter_func: cubic" in result.output  # defaults are resolved too
    assert "training epochs: 2" in result.output


def test_recipe_check_applies_recipe_args(run, tmp_path):
    path = _recipe(tmp_path, GOOD_RECIPE)
    result = run("recipe", "check", path, "--recipe-args", "final=0.7", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    gmp = next(m for m in payload["modifiers"] if m["tag"] == "GMPruningModifier")
    assert gmp["params"]["final_sparsity"] == 0.7
    assert payload["max_epochs"] == 2
    result = run("recipe", "check", path, "--recipe-args", '{"fnal": 0.7}')
    assert result.exit_code == 2
    assert "'fnal' is not a variable" in result.output


def test_recipe_check_names_a_misspelled_key(run, tmp_path):
    path = _recipe(tmp_path, GOOD_RECIPE.replace("final_sparsity", "fianl_sparsity"))
    result = run("recipe", "check", path)
    assert result.exit_code == 2
    assert f"{path}:7" in result.output  # the line of the modifier's tag
    assert "!GMPruningModifier" in result.output
    assert "unknown recipe key 'fianl_sparsity'" in result.output
    assert "did you mean 'final_sparsity'" in result.output


@pytest.mark.parametrize(
    ("text", "name", "expected"),
    [
        (GOOD_RECIPE, "recipe.yml", "rename it to recipe.yaml"),
        (
            "modifiers:\n  - !EpochRangeModifier {start_epoch: 0.0, end_epoch: 1.0}\n",
            "recipe.yaml",
            "recipe.yaml:2: '!EpochRangeModifier' is followed by",
        ),
        (
            "modifiers:\n  - !GMPrunningModifier\n    start_epoch: 0\n",
            "recipe.yaml",
            "did you mean !GMPruningModifier",
        ),
        (
            "modifiers:\n  - !EpochRangeModifier\n    start_epoch: 0\n     end_epoch: 1\n",
            "recipe.yaml",
            "recipe.yaml:4: YAML syntax error",
        ),
        (
            "modifiers:\n  - !GMPruningModifier\n    start_epoch: 0\n",
            "recipe.yaml",
            "missing required recipe key(s): init_sparsity, final_sparsity",
        ),
        (
            "modifiers:\n  - !pytorch.EpochRangeModifier\n    end_epoch: 1\n",
            "recipe.yaml",
            "write '!EpochRangeModifier'",
        ),
        ("num_epochs: 1\n", "recipe.yaml", "no modifiers found"),
    ],
    ids=["yml", "flow-style", "unknown-tag", "yaml-error", "missing-keys", "namespaced-tag", "no-modifiers"],
)
def test_recipe_check_explains_bad_recipes(run, tmp_path, text, name, expected):
    result = run("recipe", "check", _recipe(tmp_path, text, name))
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split())


def test_recipe_check_missing_file(run, tmp_path):
    result = run("recipe", "check", tmp_path / "nope.yaml")
    assert result.exit_code == 2
    assert "recipe file not found" in result.output


def test_recipe_check_accepts_our_demo_recipe(run):
    result = run("recipe", "check", ROOT / "recipes" / "demo.yaml")
    assert result.exit_code == 0, result.output


@pytest.mark.integration
def test_recipe_check_console_script_names_the_key(tmp_path):
    """The installed `obert` entry point, in a fresh process (tags registered by the start-up hook)."""
    path = _recipe(tmp_path, GOOD_RECIPE.replace("final_sparsity", "fianl_sparsity"))
    result = subprocess.run(
        [str(OBERT), "recipe", "check", str(path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2
    assert "fianl_sparsity" in result.stderr and "final_sparsity" in result.stderr


def test_train_refuses_a_folder_with_optimizer_state(run, tmp_path):
    model = tmp_path / "previous-output"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "optimizer.pt").write_bytes(b"")
    result = run(
        "train", "text-classification", "--model_name_or_path", model, "--output_dir", tmp_path / "out"
    )
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "optimizer.pt" in text and "--allow-resume-state" in text and "resume" in text
    assert not (tmp_path / "out").exists()


def test_train_arguments():
    args = commands.prepare_train_args("text-classification", ["--model_name_or_path", "m", "--do_train"])
    assert args[-2:] == ["--save_safetensors", "False"]
    kept = commands.prepare_train_args("text-classification", ["--save_safetensors=True"])
    assert kept == ["--save_safetensors=True"]
    with pytest.raises(typer.BadParameter, match="unknown task 'text-generation'"):
        commands.prepare_train_args("text-generation", [])


def test_train_allows_resume_on_request(tmp_path):
    (tmp_path / "scheduler.pt").write_bytes(b"")
    args = commands.prepare_train_args(
        "text-classification", [f"--model_name_or_path={tmp_path}", commands.ALLOW_RESUME_FLAG]
    )
    assert commands.ALLOW_RESUME_FLAG not in args
    assert commands.resume_state_files(tmp_path) == ["scheduler.pt"]


def test_train_without_task_shows_help(run):
    result = run("train")
    assert result.exit_code == 2
    assert "text-classification" in result.output


def test_data_prepare(run, tmp_path):
    result = run("data", "prepare", "bbc", "--out", tmp_path / "bbc", "--max-train", "50", "--max-eval", "10")
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "bbc" / "data.json").read_text())
    assert info["counts"]["train"] == 50 and info["counts"]["validation"] == 10
    assert "business" in result.output
    result = run("data", "prepare", "sst2", "--out", tmp_path / "x")
    assert result.exit_code == 2


@pytest.mark.integration
def test_obert_train_runs_the_stock_entry_point(tiny_bert_dir, bbc_data_dir, tmp_path):
    """`obert train` forwards to SparseML's text-classification main() and saves pytorch_model.bin."""
    recipe = _recipe(
        tmp_path, "modifiers:\n  - !EpochRangeModifier\n    start_epoch: 0.0\n    end_epoch: 1.0\n"
    )
    out = tmp_path / "out"
    command = [
        str(OBERT), "train", "text-classification",
        "--model_name_or_path", str(tiny_bert_dir),
        "--train_file", str(bbc_data_dir / "train.csv"),
        "--validation_file", str(bbc_data_dir / "validation.csv"),
        "--do_train", "--do_eval", "--max_seq_length", "32",
        "--per_device_train_batch_size", "32", "--learning_rate", "1e-3",
        "--output_dir", str(out), "--overwrite_output_dir", "--report_to", "none",
        "--save_strategy", "no", "--recipe", str(recipe),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "HF_DATASETS_CACHE"}
    env["HF_DATASETS_CACHE"] = str(tmp_path / "datasets-cache")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "pytorch_model.bin").is_file()
    assert not (out / "model.safetensors").exists()  # the --save_safetensors False default
    metrics = json.loads((out / "eval_results.json").read_text())
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    config = json.loads((out / "config.json").read_text())
    assert set(config["id2label"].values()) == {"business", "entertainment", "politics", "sports", "tech"}
