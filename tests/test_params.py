"""Recipe parameters declared once (obert_modifiers/params.py): one pydantic model per tag.

* the module imports neither SparseML nor torch;
* a misspelled key gives the same message, with "did you mean", through SparseML's own
  ``ScheduledModifierManager.from_yaml`` (the trainer's call) and ``obert recipe check``, for each
  of the four tags; and through the stock training command (one run, in a subprocess);
* bounds, choices and the rules between keys, with messages that name the key;
* YAML 1.1 coercion (``1e-7`` arrives as a string) and nothing looser;
* the SparseML adapters expose every key as a ``ModifierProp`` (recipe round trip), their setters
  validate, and the choices agree with the math in ``algorithms/``.
"""

from __future__ import annotations

import json

import pytest
import typer
from _helpers import offline_env, run, run_python, stock_train_command, subset_csv
from typer.testing import CliRunner

from obert_modifiers import commands
from obert_modifiers.modifiers._base import RecipeParameterError
from obert_modifiers.params import (
    PARAMS,
    LayerDropParams,
    OBertDistillationParams,
    OBertPruningParams,
    OBertQuantizationParams,
    RecipeKeyError,
    mask_group,
    validate_recipe,
)

PRUNING = {
    "params": ["re:bert.encoder.layer.*.output.dense.weight"],
    "init_sparsity": 0.5,
    "final_sparsity": 0.8,
    "start_epoch": 0.0,
    "end_epoch": 2.0,
    "update_frequency": 1.0,
}
# the smallest valid keys of each tag, and a misspelled key with the one it should have been
MINIMAL = {
    "OBertPruningModifier": (PRUNING, "dmap", "damp"),
    "LayerDropModifier": ({"keep": 2}, "importance_bathces", "importance_batches"),
    "OBertQuantizationModifier": ({"start_epoch": 1.0}, "weight_strategyy", "weight_strategy"),
    "OBertDistillationModifier": ({"hardness": 1.0}, "temprature", "temperature"),
    "ZipLMPruningModifier": ({"speedup_targets": [2.0]}, "latency_runtim", "latency_runtime"),
}


def _recipe_text(tag: str, keys: dict) -> str:
    lines = ["modifiers:", "  - !EpochRangeModifier", "    start_epoch: 0.0", "    end_epoch: 2.0"]
    lines += [f"  - !{tag}"] + [f"    {k}: {json.dumps(v)}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # SparseML's LoggerManager writes ./sparse_logs


def test_params_module_imports_neither_sparseml_nor_torch():
    code = (
        "import sys, json, obert_modifiers.params\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'sparseml'))))"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


# ------------------------------------------------------------------------ misspelled keys, everywhere
@pytest.mark.parametrize("tag", list(MINIMAL))
def test_a_misspelled_key_reads_the_same_in_the_manager_and_in_recipe_check(tag, tmp_path):
    from sparseml.pytorch.optim import ScheduledModifierManager

    from obert_modifiers.recipe_check import RecipeCheckError, check_recipe

    keys, wrong, right = MINIMAL[tag]
    path = tmp_path / "recipe.yaml"
    path.write_text(_recipe_text(tag, {**keys, wrong: 1}))

    with pytest.raises(RecipeParameterError) as loading:
        ScheduledModifierManager.from_yaml(str(path))
    message = str(loading.value)
    assert message.startswith(f"!{tag}: unknown recipe key '{wrong}'")
    assert f"did you mean '{right}'" in message and "Valid keys:" in message

    with pytest.raises(RecipeCheckError) as checking:
        check_recipe(path)
    assert str(checking.value) == f"{path}:5: modifier 2: {message}"  # the same text, with its place

    app = typer.Typer()
    commands.register(app)
    result = CliRunner().invoke(app, ["recipe", "check", str(path)])
    assert result.exit_code != 0
    assert f"recipe check failed: {path}:5: modifier 2: {message}" in " ".join(result.output.split())


@pytest.mark.integration
def test_a_misspelled_key_in_stock_training_says_did_you_mean(tiny_bert_dir, bbc_data_dir, tmp_path):
    """SparseML's unmodified training command (a fresh process, our tags registered by the start-up
    hook) stops at the recipe with our message, not ``TypeError: unexpected keyword argument``."""
    keys, wrong, right = MINIMAL["OBertPruningModifier"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(_recipe_text("OBertPruningModifier", {**keys, wrong: 1e-7}))
    data = tmp_path / "data"
    data.mkdir()
    subset_csv(bbc_data_dir / "train.csv", data / "train.csv", 16)
    subset_csv(bbc_data_dir / "validation.csv", data / "validation.csv", 8)
    command = stock_train_command(tiny_bert_dir, data, tmp_path / "out", recipe, "--save_strategy", "no")
    result = run(command, env=offline_env(), cwd=tmp_path, timeout=600)
    assert result.returncode != 0
    assert "unexpected keyword argument" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert f"unknown recipe key '{wrong}'; did you mean '{right}'?" in last, result.stderr[-3000:]
    assert last.startswith("obert_modifiers.") and "!OBertPruningModifier" in last


def test_a_missing_required_key_is_named_with_what_it_holds():
    recipe = {k: v for k, v in PRUNING.items() if k != "final_sparsity"}
    with pytest.raises(RecipeKeyError) as caught:
        validate_recipe(OBertPruningParams, recipe)
    assert str(caught.value) == (
        "!OBertPruningModifier: required recipe key 'final_sparsity' is missing: "
        "expected a number >= 0.0 and <= 1.0"
    )


def test_a_misspelled_key_is_reported_before_the_required_key_it_leaves_out():
    recipe = {k: v for k, v in PRUNING.items() if k != "final_sparsity"} | {"fianl_sparsity": 0.8}
    with pytest.raises(RecipeKeyError, match=r"unknown recipe key 'fianl_sparsity'; did you mean 'final"):
        validate_recipe(OBertPruningParams, recipe)


# ------------------------------------------------------------------------ bounds and rules between keys
CASES = [
    # (model, keys, key named, expected text)
    (OBertPruningParams, {"final_sparsity": 1.2}, "final_sparsity", "a number <= 1.0"),
    (OBertPruningParams, {"final_sparsity": 1.0}, "final_sparsity", "a number < 1"),
    (OBertPruningParams, {"final_sparsity": 0.3}, "final_sparsity", "a number >= init_sparsity (0.5)"),
    (OBertPruningParams, {"end_epoch": 0.0, "start_epoch": 1.0}, "end_epoch", "a number >= start_epoch"),
    (OBertPruningParams, {"update_frequency": 0}, "update_frequency", "a number > 0.0"),
    (OBertPruningParams, {"damp": 0.0}, "damp", "a number > 0.0"),
    (OBertPruningParams, {"num_grads": 0}, "num_grads", "a whole number >= 1"),
    (OBertPruningParams, {"mask_type": "block1"}, "mask_type", "'unstructured', 'block4' or 'blockN'"),
    (
        OBertPruningParams,
        {"mask_type": "block4", "fisher_block_size": 50},
        "fisher_block_size",
        "a multiple of 4 for mask_type block4",
    ),
    (OBertPruningParams, {"inter_func": "cubical"}, "inter_func", "one of 'linear', 'cubic'"),
    (OBertPruningParams, {"params": []}, "params", "at least one name or 're:' pattern"),
    (OBertPruningParams, {"grad_sampler_kwargs": [8]}, "grad_sampler_kwargs", "a mapping of DataLoader"),
    (OBertPruningParams, {"memory_budget_gb": -1}, "memory_budget_gb", "a number > 0.0"),
    (LayerDropParams, {}, "layers", "either 'layers' (indices to drop) or 'keep'"),
    (LayerDropParams, {"keep": 5, "num_layers": 4}, "keep", "at most num_layers (4)"),
    (LayerDropParams, {"layers": [1], "keep": 2, "num_layers": 4}, "keep", "num_layers - len(layers) = 3"),
    (LayerDropParams, {"layers": [4], "num_layers": 4}, "layers", "indices below num_layers (4)"),
    (
        LayerDropParams,
        {"layers": [0, 1], "num_layers": 2},
        "layers",
        "indices below num_layers (2) that leave at least one layer",
    ),
    (LayerDropParams, {"layers": [1, -2]}, "layers", "a whole number >= 0"),
    (LayerDropParams, {"keep": 2, "start_epoch": -0.5}, "start_epoch", "a number >= 0, or -1"),
    (LayerDropParams, {"keep": 2, "strategy": "random"}, "strategy", "one of 'uniform', 'importance'"),
    (OBertQuantizationParams, {"start_epoch": 2.0, "end_epoch": 1.0}, "end_epoch", "-1 (QAT stays on)"),
    (
        OBertQuantizationParams,
        {"start_epoch": 2.0, "freeze_observer_epoch": 1.0},
        "freeze_observer_epoch",
        "null or a number >= start_epoch (2.0)",
    ),
    (OBertQuantizationParams, {"exclude": [1]}, "exclude", "a list of names or 're:' patterns"),
    (OBertDistillationParams, {"hardness": 1.5}, "hardness", "a number <= 1.0"),
    (OBertDistillationParams, {"temperature": 0}, "temperature", "a number > 0.0"),
    (OBertDistillationParams, {"layer_map": []}, "layer_map", "a list: student layer i -> teacher layer"),
    (OBertDistillationParams, {"start_epoch": 2.0, "end_epoch": 1.0}, "end_epoch", "-1 or a number >="),
]


@pytest.mark.parametrize(("model", "keys", "key", "expected"), CASES, ids=lambda v: str(v)[:40])
def test_bounds_and_rules_between_keys_name_the_key(model, keys, key, expected):
    base = PRUNING if model is OBertPruningParams else {}
    with pytest.raises(RecipeParameterError) as caught:
        validate_recipe(model, {**base, **keys})
    error = caught.value
    assert (error.modifier, error.key) == (model.tag, key)
    assert f"!{model.tag}: recipe key '{key}' = " in str(error)
    assert f"is invalid: expected {expected}" in str(error)


def test_rules_between_keys_hold_for_good_values():
    drop = validate_recipe(LayerDropParams, {"layers": [3, 1, 3], "keep": 2, "num_layers": 4})
    assert drop.layers == [1, 3]  # a set of indices, sorted
    quant = validate_recipe(OBertQuantizationParams, {"start_epoch": -1, "freeze_observer_epoch": 0.0})
    assert quant.exclude == ["classifier"]
    block = validate_recipe(OBertPruningParams, {**PRUNING, "mask_type": "block4", "fisher_block_size": 32})
    assert block.fisher_block_size == 32 and block.damp == 1e-7


# ------------------------------------------------------------------------ YAML 1.1 coercion
def test_yaml_1_1_strings_become_numbers_and_flags():
    params = validate_recipe(
        OBertPruningParams,
        {
            **PRUNING,
            "damp": "1e-7",  # PyYAML reads exponent notation without a dot as a string
            "num_grads": "1024",
            "fisher_block_size": 8.0,  # eval() results come back as floats
            "init_sparsity": "5e-1",
            "leave_enabled": "False",
            "params": "__ALL_PRUNABLE__",
        },
    )
    assert params.damp == 1e-7 and isinstance(params.damp, float)
    assert params.num_grads == 1024 and isinstance(params.num_grads, int)
    assert params.fisher_block_size == 8 and isinstance(params.fisher_block_size, int)
    assert params.init_sparsity == 0.5 and params.leave_enabled is False
    assert params.params == ["__ALL_PRUNABLE__"]
    drop = validate_recipe(LayerDropParams, {"layers": ["3", 1.0]})
    assert drop.layers == [1, 3]


@pytest.mark.parametrize(
    ("model", "key", "value", "expected"),
    [
        (OBertPruningParams, "num_grads", 1.5, "a whole number"),
        (OBertPruningParams, "num_grads", True, "a whole number"),
        (OBertPruningParams, "damp", "lots", "a number"),
        (OBertPruningParams, "global_sparsity", "yes", "true or false"),
        (OBertPruningParams, "global_sparsity", 1, "true or false"),
        (OBertQuantizationParams, "quantize_matmuls", "maybe", "true or false"),
    ],
)
def test_coercion_goes_no_further_than_yaml_1_1(model, key, value, expected):
    base = PRUNING if model is OBertPruningParams else {}
    with pytest.raises(RecipeParameterError, match=f"'{key}' = {value!r} is invalid: expected {expected}$"):
        validate_recipe(model, {**base, key: value})


def test_numbers_written_as_yaml_strings_load_through_the_manager():
    from sparseml.pytorch.optim import ScheduledModifierManager

    text = _recipe_text("OBertPruningModifier", PRUNING)
    manager = ScheduledModifierManager.from_yaml(text + "    damp: 1e-7\n    num_grads: 8e0\n")
    modifier = manager.modifiers[-1]
    assert modifier.damp == 1e-7 and modifier.num_grads == 8 and isinstance(modifier.num_grads, int)


# ------------------------------------------------------------------------ the SparseML adapters
def _modifier_class(tag: str) -> type:
    import obert_modifiers

    return getattr(obert_modifiers, tag)


@pytest.mark.parametrize("tag", list(MINIMAL))
def test_every_key_is_a_modifier_prop_and_round_trips(tag):
    from sparseml.optim import ModifierProp
    from sparseml.pytorch.optim import ScheduledModifierManager

    cls = _modifier_class(tag)
    assert all(isinstance(getattr(cls, name), ModifierProp) for name in PARAMS[tag].model_fields)
    keys = MINIMAL[tag][0]
    manager = ScheduledModifierManager.from_yaml(_recipe_text(tag, keys))
    (ours,) = [m for m in manager.modifiers if type(m).__name__ == tag]
    serialised = ours.props(only_serializable=True)
    given = {name for name in PARAMS[tag].model_fields if getattr(ours, name) is not None}
    assert given <= set(serialised)  # SparseML leaves out keys whose value is None
    again = ScheduledModifierManager.from_yaml(str(manager))
    (reloaded,) = [m for m in again.modifiers if type(m).__name__ == tag]
    assert reloaded.props(only_serializable=True) == serialised


def test_setters_validate_against_the_other_keys():
    from sparseml.pytorch.optim import ScheduledModifierManager

    manager = ScheduledModifierManager.from_yaml(
        _recipe_text("LayerDropModifier", {"keep": 2, "num_layers": 4})
        + "  - !OBertQuantizationModifier\n    start_epoch: 1.0\n"
    )
    drop = next(m for m in manager.modifiers if type(m).__name__ == "LayerDropModifier")
    with pytest.raises(RecipeParameterError, match=r"'keep' = 5 is invalid: expected at most num_layers"):
        drop.keep = 5
    assert drop.keep == 2
    drop.keep = "3"  # coerced as in a recipe
    assert drop.keep == 3
    quant = next(m for m in manager.modifiers if type(m).__name__ == "OBertQuantizationModifier")
    with pytest.raises(RecipeParameterError, match=r"'freeze_observer_epoch' = 0.5 is invalid"):
        quant.freeze_observer_epoch = 0.5
    quant.freeze_observer_epoch = "2e0"
    assert quant.freeze_observer_epoch == 2.0
    with pytest.raises(AttributeError):  # keys without a setter stay read-only, as in SparseML
        quant.weight_strategy = "channel"


def test_signature_lists_the_recipe_keys():
    import inspect

    parameters = inspect.signature(_modifier_class("OBertPruningModifier").__init__).parameters
    assert list(parameters)[1:] == list(OBertPruningParams.model_fields)
    assert parameters["damp"].default == 1e-7
    assert parameters["final_sparsity"].default is inspect.Parameter.empty


def test_choices_agree_with_the_math():
    from obert_modifiers.algorithms import quantization, sparsity
    from obert_modifiers.algorithms.obs import parse_mask_type
    from obert_modifiers.params import INTERPOLATIONS, WEIGHT_STRATEGIES

    assert INTERPOLATIONS == sparsity.INTERPOLATIONS
    assert WEIGHT_STRATEGIES == quantization.WEIGHT_STRATEGIES
    for mask_type in ("unstructured", "block4", "block16", "block1", "block", "blockx", "4block", ""):
        try:
            expected = parse_mask_type(mask_type)
        except ValueError:
            with pytest.raises(ValueError):
                mask_group(mask_type)
        else:
            assert mask_group(mask_type) == expected


def test_recipe_check_reports_our_tags_without_parsing_type_errors(tmp_path):
    """Every bad value of our tags reaches `obert recipe check` as the adapter's own message."""
    from obert_modifiers.recipe_check import RecipeCheckError, check_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(_recipe_text("OBertQuantizationModifier", {"start_epoch": 1.0, "exclude": [1]}))
    with pytest.raises(RecipeCheckError) as caught:
        check_recipe(path)
    assert str(caught.value).endswith(
        "!OBertQuantizationModifier: recipe key 'exclude' = [1] is invalid: "
        "expected a list of names or 're:' patterns"
    )


def test_params_models_cover_every_tag():
    assert set(PARAMS) == set(MINIMAL)
    for tag, model in PARAMS.items():
        assert model.model_config["extra"] == "forbid" and model.tag == tag
        for name, field in model.model_fields.items():
            assert field.description, f"{tag}.{name} has no documentation line"


def test_docs_list_every_key_of_every_tag():
    """docs/recipes.md's reference lists exactly the keys each parameter model declares."""
    import re
    from pathlib import Path

    docs = (Path(__file__).parents[1] / "docs" / "recipes.md").read_text()
    for tag, model in PARAMS.items():
        start = docs.index(f"### `!{tag}` (`{model.__name__}`)")
        end = docs.index("\n#", start + 1)
        listed = re.findall(r"^\| `([a-z_]+)` \|", docs[start:end], flags=re.M)
        assert listed == list(model.model_fields), tag
