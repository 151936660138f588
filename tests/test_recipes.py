"""The pipeline recipes of docs/recipes.md (recipes/minilm_*.yaml): they load with `obert recipe check`,
their variables move the stage windows as documented, a bad key inside a stage is reported with its
place, and the staged recipes run end to end with SparseML's STOCK training script on a tiny 6-layer
BERT (teacher fine-tuned by recipes/minilm_teacher.yaml), reach the target sparsity, end quantized
(and 3-layer for the drop recipe), and export with a passing parity check."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from obert_modifiers import commands

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
TEACHER = RECIPES / "minilm_teacher.yaml"
PRUNE = RECIPES / "minilm_6l_prune.yaml"
PRUNE_QAT = RECIPES / "minilm_6l_prune_qat.yaml"
DROP_PRUNE_QAT = RECIPES / "minilm_3l_drop_prune_qat.yaml"
ENCODER_LINEARS = (
    "attention.self.query.weight",
    "attention.self.key.weight",
    "attention.self.value.weight",
    "attention.output.dense.weight",
    "intermediate.dense.weight",
    "output.dense.weight",
)
# tiny schedules: one epoch per window, two pruning steps per epoch, a handful of gradients
TINY_ARGS = {
    "prune_epochs": 1.0,
    "recovery_epochs": 1.0,
    "qat_epochs": 1.0,
    "update_frequency": 0.5,
    "num_grads": 8,
    "grad_batch_size": 4,
    "fisher_block_size": 8,
    "damp": 1e-5,
}


# ------------------------------------------------------------------------------ recipe check
@pytest.fixture(scope="module")
def check():
    app = typer.Typer()
    commands.register(app)
    runner = CliRunner()

    def invoke(path: Path, recipe_args: dict | None = None) -> dict:
        args = ["recipe", "check", str(path), "--json"]
        if recipe_args:
            args += ["--recipe-args", json.dumps(recipe_args)]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    return invoke


def _by_tag(summary: dict, tag: str, stage: str | None = None) -> dict:
    found = [m for m in summary["modifiers"] if m["tag"] == tag and (stage is None or m["stage"] == stage)]
    assert len(found) == 1, (tag, stage, summary["modifiers"])
    return found[0]


@pytest.mark.parametrize(
    "path, stages, tags",
    [
        (TEACHER, {None}, {"EpochRangeModifier", "LearningRateFunctionModifier"}),
        (PRUNE, {"prune"}, {"OBertPruningModifier", "OBertDistillationModifier"}),
        (PRUNE_QAT, {"prune", "qat"}, {"OBertPruningModifier", "OBertQuantizationModifier"}),
        (DROP_PRUNE_QAT, {"drop", "prune", "qat"}, {"LayerDropModifier", "OBertQuantizationModifier"}),
    ],
    ids=lambda v: v.name if isinstance(v, Path) else None,
)
def test_obert_recipe_check_accepts_each_pipeline_recipe(check, path, stages, tags):
    summary = check(path)
    assert {m["stage"] for m in summary["modifiers"]} == stages
    assert tags <= {m["tag"] for m in summary["modifiers"]}


def test_recipe_args_move_the_stage_windows(check):
    """Windows are derived from the *_epochs variables; stages follow each other in absolute epochs."""
    summary = check(
        PRUNE_QAT,
        {
            "prune_epochs": 2,
            "recovery_epochs": 1,
            "qat_epochs": 3,
            "final_sparsity": 0.9,
            "mask_type": "block4",
        },
    )
    pruning = _by_tag(summary, "OBertPruningModifier")
    assert (pruning["start_epoch"], pruning["end_epoch"]) == (0.0, 2.0)
    assert pruning["params"]["final_sparsity"] == 0.9 and pruning["params"]["mask_type"] == "block4"
    quant = _by_tag(summary, "OBertQuantizationModifier")
    assert quant["start_epoch"] == 3.0 and quant["params"]["freeze_observer_epoch"] == 4.5
    distill_qat = _by_tag(summary, "OBertDistillationModifier", "qat")
    assert (distill_qat["start_epoch"], distill_qat["end_epoch"]) == (3.0, 6.0)
    assert summary["max_epochs"] == 6

    summary = check(
        DROP_PRUNE_QAT, {"drop_epochs": 1, "prune_epochs": 2, "recovery_epochs": 1, "qat_epochs": 1}
    )
    drop = _by_tag(summary, "LayerDropModifier")
    assert drop["params"]["keep"] == 3 and drop["params"]["num_layers"] == 6
    assert _by_tag(summary, "OBertPruningModifier")["start_epoch"] == 1.0
    assert _by_tag(summary, "OBertQuantizationModifier")["start_epoch"] == 4.0
    assert summary["max_epochs"] == 5
    assert summary["warnings"] == []


def test_recipe_check_warns_when_sparseml_rounds_the_schedule_up(check):
    """SparseML trains ceil(last epoch): a 4.5-epoch schedule trains 5, half an epoch outside every
    window. The check says so, naming the epoch, the rounding and the modifier that ends last."""
    summary = check(PRUNE_QAT, {"prune_epochs": 1.5, "recovery_epochs": 1.0, "qat_epochs": 2.0})
    assert summary["max_epochs"] == 5
    (warning,) = summary["warnings"]
    assert "ends at epoch 4.5" in warning and "5 epochs" in warning and "!Epoch" in warning
    whole = {"prune_epochs": 1.5, "recovery_epochs": 1.5, "qat_epochs": 1.0}
    assert check(PRUNE_QAT, whole)["warnings"] == []


def test_the_prune_stage_is_the_same_in_every_recipe():
    """The FP32 recipe, the 6-layer and the 3-layer compound recipes share one prune stage (text and
    defaults), so rows of the results table differ only by what the table says."""
    import yaml

    def load(path: Path) -> dict:
        return yaml.load(path.read_text(), Loader=yaml.BaseLoader)  # tags kept as text

    recipes = [load(p) for p in (PRUNE, PRUNE_QAT, DROP_PRUNE_QAT)]
    assert recipes[0]["prune"] == recipes[1]["prune"] == recipes[2]["prune"]
    assert recipes[1]["qat"] == recipes[2]["qat"]
    shared = set(recipes[0]) - {"prune", "prune_start"}
    for key in shared:
        assert recipes[0][key] == recipes[1][key] == recipes[2][key], key


def test_qat_cannot_be_switched_off_by_variable_and_the_error_names_the_place():
    from obert_modifiers.recipe_check import RecipeCheckError, check_recipe

    with pytest.raises(RecipeCheckError) as caught:
        check_recipe(PRUNE_QAT, {"qat_epochs": 0})
    message = str(caught.value)
    assert "stage 'qat'" in message and "LearningRateFunctionModifier" in message
    line = int(message.split(":")[1])
    assert PRUNE_QAT.read_text().splitlines()[line - 1].strip() == "- !LearningRateFunctionModifier"


def test_a_bad_key_inside_a_stage_is_reported_with_modifier_key_and_line(tmp_path):
    from obert_modifiers.recipe_check import RecipeCheckError, check_recipe

    text = PRUNE_QAT.read_text().replace(
        "      quantize_matmuls: true\n", "      quantize_matmuls: true\n      quantise_embeddings: true\n"
    )
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeCheckError) as caught:
        check_recipe(path)
    message = str(caught.value)
    assert "stage 'qat'" in message and "!OBertQuantizationModifier" in message
    assert "quantise_embeddings" in message and "quantize_embeddings" in message
    line = int(message.split(":")[1])
    assert text.splitlines()[line - 1].strip() == "- !OBertQuantizationModifier"
    # the quantization modifier is the 7th modifier in file order (4 in prune, then 3rd in qat)
    assert "modifier 7 in stage 'qat'" in message

    bad_value = DROP_PRUNE_QAT.read_text().replace("drop_strategy: uniform", "drop_strategy: best")
    path.write_text(bad_value)
    with pytest.raises(RecipeCheckError, match=r"stage 'drop': !LayerDropModifier: recipe key 'strategy'"):
        check_recipe(path)


# ------------------------------------------------------------------------------ stock CLI
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "NM_DISABLE_ANALYTICS": "1",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def _stock_train(model: Path, data: Path, out: Path, recipe: Path, recipe_args: dict, teacher: Path | None):
    """SparseML's unmodified training console script, in a fresh process."""
    script = Path(sys.executable).parent / "sparseml.transformers.train.text_classification"
    command = [
        str(script), "--model_name_or_path", str(model), "--train_file", str(data / "train.csv"),
        "--validation_file", str(data / "validation.csv"), "--do_train", "--do_eval",
        "--max_seq_length", "64", "--per_device_train_batch_size", "16", "--output_dir", str(out),
        "--overwrite_output_dir", "--report_to", "none", "--save_strategy", "no",
        "--save_safetensors", "False", "--seed", "1",
        "--recipe", str(recipe), "--recipe_args", json.dumps(recipe_args),
    ]  # fmt: skip
    if teacher is not None:
        command += ["--distill_teacher", str(teacher)]
    completed = subprocess.run(
        command, cwd=out.parent, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, (completed.stdout + completed.stderr)[-6000:]
    return out


@pytest.fixture(scope="module")
def small_data(bbc_data_dir, tmp_path_factory) -> Path:
    import pandas

    out = tmp_path_factory.mktemp("recipes-data")
    pandas.read_csv(bbc_data_dir / "train.csv").head(96).to_csv(out / "train.csv", index=False)
    pandas.read_csv(bbc_data_dir / "validation.csv").head(32).to_csv(out / "validation.csv", index=False)
    return out


@pytest.fixture(scope="module")
def teacher_dir(small_data, tmp_path_factory) -> Path:
    """Stage (1): a tiny random 6-layer BERT fine-tuned by recipes/minilm_teacher.yaml (stock CLI).
    Its optimizer/scheduler state is removed, as the pipeline does: SparseML's trainer would
    otherwise resume it in the next stage (and crash once layers are dropped)."""
    from obert_modifiers.models import save_tiny_bert

    work = tmp_path_factory.mktemp("recipes-teacher")
    start = save_tiny_bert(work / "random", num_labels=5, num_layers=6)
    out = _stock_train(
        start, small_data, work / "teacher", TEACHER, {"num_epochs": 1.0, "init_lr": 1e-3}, None
    )
    assert "!LearningRateFunctionModifier" in (out / "recipe.yaml").read_text()
    for name in ("optimizer.pt", "scheduler.pt"):
        (out / name).unlink()
    return out


def _encoder_weights(folder: Path) -> dict[str, torch.Tensor]:
    state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    return {
        name: value
        for name, value in state.items()
        if ".encoder.layer." in name and name.endswith(ENCODER_LINEARS)
    }


def _sparsity(weights: dict[str, torch.Tensor]) -> float:
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    return zeros / sum(w.numel() for w in weights.values())


def _assert_quantized(folder: Path) -> None:
    """QAT ran and its observers were frozen (freeze_epoch lies inside the qat stage)."""
    state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    assert any(name.endswith("weight_fake_quant.scale") for name in state), "no QAT state was saved"
    observers = [int(v) for name, v in state.items() if name.endswith("observer_enabled")]
    assert observers and set(observers) == {0}, "observers were not frozen"


def _saved_stages(folder: Path) -> list[str]:
    import yaml

    recipe = yaml.load((folder / "recipe.yaml").read_text(), Loader=yaml.BaseLoader)
    return [key for key, value in recipe.items() if isinstance(value, dict)]


def _export(folder: Path, out: Path):
    from obert_modifiers.export import export_deployment

    result = export_deployment(folder, out, sequence_length=64, progress=False)
    assert result.max_abs_diff <= result.tolerance, (result.max_abs_diff, result.tolerance)
    return result, json.loads((result.path / "export.json").read_text())


@pytest.mark.integration
def test_6l_prune_qat_staged_recipe_with_stock_cli_then_export(teacher_dir, small_data, tmp_path):
    """Stages prune (block4, 80 %) + qat of one staged recipe, variables from --recipe_args."""
    args = {**TINY_ARGS, "final_sparsity": 0.8, "mask_type": "block4"}
    out = _stock_train(teacher_dir, small_data, tmp_path / "model", PRUNE_QAT, args, teacher_dir)

    # the saved recipe keeps the history: the teacher's recipe, then our two stages, shifted by it
    assert _saved_stages(out) == ["pre_prune", "prune", "qat"]
    weights = _encoder_weights(out)
    assert len(weights) == 6 * 6
    assert abs(_sparsity(weights) - 0.8) < 0.01  # global target, masks kept through QAT
    for name, weight in weights.items():  # block4: runs of 4 inputs are all zero or all kept
        zeros_per_block = (weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1)
        assert bool(((zeros_per_block == 0) | (zeros_per_block == 4)).all()), name
    _assert_quantized(out)

    result, info = _export(out, tmp_path / "deployment")
    assert result.quantized and info["quantized"] is True
    assert info["num_layers"] == 6
    assert (result.path / "recipe.yaml").is_file()


@pytest.mark.integration
def test_3l_drop_prune_qat_staged_recipe_with_stock_cli_then_export(teacher_dir, small_data, tmp_path):
    """Stages drop (keep 3 of 6, uniform) + prune (unstructured 90 %) + qat of one staged recipe;
    the export rebuilds both structures (dropped layers, QAT) from the saved recipe.yaml."""
    args = {**TINY_ARGS, "drop_epochs": 1.0, "final_sparsity": 0.9, "mask_type": "unstructured"}
    out = _stock_train(teacher_dir, small_data, tmp_path / "model", DROP_PRUNE_QAT, args, teacher_dir)

    assert _saved_stages(out) == ["pre_drop", "drop", "prune", "qat"]
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["obert_layer_map"] == [0, 2, 4]
    weights = _encoder_weights(out)
    assert len(weights) == 3 * 6 and not any(".layer.3." in name for name in weights)
    assert abs(_sparsity(weights) - 0.9) < 0.01
    _assert_quantized(out)

    result, info = _export(out, tmp_path / "deployment")
    assert result.quantized and info["num_layers"] == 3
    assert info["sparsity"]["overall"] > 0.5


@pytest.mark.integration
def test_6l_prune_fp32_recipe_with_stock_cli(teacher_dir, small_data, tmp_path):
    """The FP32 row: the same prune stage without a qat stage leaves no quantization state."""
    args = {k: v for k, v in TINY_ARGS.items() if k != "qat_epochs"}
    args["final_sparsity"] = 0.9
    out = _stock_train(teacher_dir, small_data, tmp_path / "model", PRUNE, args, teacher_dir)
    assert _saved_stages(out) == ["pre_prune", "prune"]
    assert abs(_sparsity(_encoder_weights(out)) - 0.9) < 0.01
    state = torch.load(out / "pytorch_model.bin", map_location="cpu", weights_only=True)
    assert not any("fake_quant" in name or "observer" in name for name in state)


def test_recipe_check_accepts_stage_variables_in_recipe_args(tmp_path):
    """SparseML's --recipe_args also sets a variable defined inside a stage; the check agrees."""
    from obert_modifiers.recipe_check import RecipeCheckError, check_recipe

    path = tmp_path / "staged.yaml"
    path.write_text(
        "length: 1.0\n"
        "warm:\n"
        "  warm_end: 2.0\n"
        "  modifiers:\n"
        "    - !EpochRangeModifier\n"
        "      start_epoch: 0.0\n"
        "      end_epoch: eval(warm_end)\n"
    )
    summary = check_recipe(path, {"warm_end": 3.0})
    assert summary.modifiers[0].stage == "warm" and summary.modifiers[0].end_epoch == 3.0
    with pytest.raises(RecipeCheckError, match=r"'cool_end' is not a variable .*length, warm_end"):
        check_recipe(path, {"cool_end": 3.0})


# ------------------------------------------------------------------------------ recipe mistakes
DUPLICATE = (
    "modifiers:\n"
    "  - !EpochRangeModifier\n"
    "    start_epoch: 0.0\n"
    "    end_epoch: 2.0\n"
    "  - !OBertDistillationModifier\n"
    "    hardness: 1.0\n"
    "    temperature: 2.0\n"
    "    hardness: 0.5\n"
)
SHAPES = {
    "empty": ("", "the recipe is empty; a recipe is a YAML mapping with a 'modifiers:' list"),
    "comments only": ("# nothing yet\n\n", "the recipe is empty"),
    "top-level list": (
        "- !EpochRangeModifier\n  start_epoch: 0.0\n  end_epoch: 1.0\n",
        ":1: the recipe's top level is a list; a recipe is a YAML mapping",
    ),
    "a key twice": (
        DUPLICATE,
        ":8: modifier !OBertDistillationModifier gives 'hardness' twice (lines 6 and 8)",
    ),
    "a variable twice": (
        "epochs: 1.0\nepochs: 2.0\nmodifiers: []\n",
        ":2: the recipe's top level gives 'epochs' twice (lines 1 and 2)",
    ),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_recipe_check_refuses_an_empty_recipe_a_list_and_a_key_given_twice(name, tmp_path):
    from obert_modifiers.recipe_check import RecipeCheckError, check_recipe

    text, expected = SHAPES[name]
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(RecipeCheckError) as caught:
        check_recipe(path)
    assert str(caught.value).startswith(str(path)) and expected in str(caught.value)


@pytest.mark.parametrize("name", list(SHAPES))
def test_sparseml_loader_refuses_them_too(name, tmp_path, monkeypatch):
    """The trainer's own call (ScheduledModifierManager.from_yaml): the same message as the check,
    instead of TypeError / AttributeError from SparseML's loader or a silently dropped value."""
    from sparseml.pytorch.optim import ScheduledModifierManager

    from obert_modifiers.recipe_check import RecipeCheckError

    monkeypatch.chdir(tmp_path)
    text, expected = SHAPES[name]
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(RecipeCheckError) as caught:
        ScheduledModifierManager.from_yaml(str(path))
    assert str(caught.value).startswith(str(path)) and expected in str(caught.value)
    if text.strip() and not text.startswith("#"):  # a YAML string (no file) is named 'recipe'
        with pytest.raises(RecipeCheckError, match=f"^recipe{re.escape(expected)}"):
            ScheduledModifierManager.from_yaml(text)


def test_a_key_twice_in_a_recipe_card_names_the_lines_of_the_card(tmp_path, monkeypatch):
    from sparseml.pytorch.optim import ScheduledModifierManager

    from obert_modifiers.recipe_check import RecipeCheckError, check_recipe

    monkeypatch.chdir(tmp_path)
    card = tmp_path / "recipe.md"
    card.write_text(f"---\n{DUPLICATE}---\n\n# a recipe card\n")
    for load in (check_recipe, lambda p: ScheduledModifierManager.from_yaml(str(p))):
        with pytest.raises(RecipeCheckError, match=r"recipe\.md:9: .* twice \(lines 7 and 9\)"):
            load(card)


def test_distinct_keys_in_different_modifiers_are_fine(tmp_path):
    from obert_modifiers.recipe_check import check_recipe

    path = tmp_path / "recipe.yaml"
    other = "  - !OBertQuantizationModifier\n    start_epoch: 1.0\n"
    path.write_text(DUPLICATE.replace("    hardness: 0.5\n", other))
    summary = check_recipe(path)
    assert [m.tag for m in summary.modifiers] == [
        "EpochRangeModifier",
        "OBertDistillationModifier",
        "OBertQuantizationModifier",
    ]


def test_teacher_self_from_a_base_checkpoint_names_the_missing_head(tiny_bert_dir, tmp_path, monkeypatch):
    """`--distill_teacher self` on a checkpoint with no task head (MiniLM-L6 as shipped) would distill
    from random logits: refused, saying what is missing and what to do instead."""
    from sparseml.pytorch.optim import ScheduledModifierManager
    from transformers import AutoModelForSequenceClassification

    monkeypatch.chdir(tmp_path)
    base = tmp_path / "base"
    AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).bert.save_pretrained(base)
    student = AutoModelForSequenceClassification.from_pretrained(base, num_labels=5)
    manager = ScheduledModifierManager.from_yaml(
        "modifiers:\n  - !OBertDistillationModifier\n    hardness: 1.0\n"
    )
    with pytest.raises(RuntimeError) as caught:
        manager.initialize(student, epoch=0.0, distillation_teacher="self")
    message = str(caught.value)
    assert "no task head" in message and "classifier.weight" in message
    assert "logits would be random" in message and "--distill_teacher PATH" in message
    assert "only loads with its recipe" not in message
