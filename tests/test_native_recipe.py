"""The native recipe engine (obert_modifiers/native/recipe.py) against SparseML's own evaluation.

SparseML's ``ScheduledModifierManager.from_yaml`` is the reference (no mocks): the same recipe gives
the same modifiers, parameters, order and epochs, and the recipe the engine writes into a saved
model folder is, byte for byte, what ``ScheduledModifierManager.save`` writes. The comparisons skip
where SparseML is not installed (``make test-modern``); the engine's own behaviour, its refusals
and its import hygiene are tested in both environments.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from obert_modifiers.native.recipe import (
    RECIPE_NAME,
    RecipeError,
    compose,
    load_recipe,
    lr_at,
    parse_recipe_args,
    restricted_eval,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def sparseml_manager():
    pytest.importorskip("sparseml", reason="SparseML is the reference; not in the modern venv")
    from sparseml.pytorch.optim import ScheduledModifierManager

    return ScheduledModifierManager


def _write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _assert_same(manager_cls, source, recipe_args=None):
    """The native plan of ``source`` equals SparseML's manager: text, order, epochs, stages."""
    manager = manager_cls.from_yaml(str(source), recipe_variables=recipe_args)
    plan = load_recipe(source, recipe_args)
    assert plan.to_yaml() == str(manager)
    assert plan.max_epochs == manager.max_epochs
    assert plan.min_epochs == manager.min_epochs
    ours = [(m.tag, m.start_epoch, m.end_epoch) for m in plan.modifiers]
    theirs = [(type(m).__name__, m.start_epoch, m.end_epoch) for m in manager.iter_modifiers()]
    assert ours == theirs
    if isinstance(manager.modifiers, dict):
        assert list(plan.stages) == list(manager.modifiers)
        expected = {stage: tuple(r) for stage, r in manager.get_start_end_epochs().items()}
        assert plan.stage_epochs() == expected
    return plan, manager


# --------------------------------------------------------------------------------------------
# the repo's recipes and crafted ones, against SparseML
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_repo_recipe_resolves_as_sparseml_resolves_it(sparseml_manager, path):
    plan, _ = _assert_same(sparseml_manager, path)
    assert plan.modifiers


def test_staged_recipe_args_override_global_and_stage_variables(sparseml_manager):
    path = ROOT / "recipes" / "minilm_3l_drop_prune_qat.yaml"
    args = {"drop_epochs": 1, "prune_epochs": 3, "qat_epochs": 1, "num_grads": 16, "mask_type": "block4"}
    plan, _ = _assert_same(sparseml_manager, path, json.dumps(args))
    assert plan.max_epochs == 1 + 3 + 2 + 1
    _assert_same(sparseml_manager, path, "keep_layers=2,final_sparsity=0.9")


VARIABLES = """\
version: 1.1.0
# used before it is defined: resolved to a fixed point
total: eval(warm + prune + cool)
warm: 1
prune: eval(max(2, round(steps / 3)))
cool: eval(int(1.5 * 2) // 2 + 0.5 ** 2 % 1)
steps: 7
lr: 5e-5
final_lr: 0
names: ['re:.*query.weight', 're:.*key.weight']
mask: block4
ratio: eval(abs(0 - 0.25) * 4 - min(0.1, float(1)))

training_modifiers:
  - !EpochRangeModifier
    start_epoch: 0
    end_epoch: eval(total)

  - !LearningRateFunctionModifier
    start_epoch: eval(warm)
    end_epoch: eval(total)
    lr_func: cosine
    init_lr: eval(lr)
    final_lr: eval(final_lr)
    param_groups: [0, 1]

  - !SetLearningRateModifier
    start_epoch: 0
    end_epoch: 1
    learning_rate: eval(lr)

pruning_modifiers:
  - !OBertPruningModifier
    params: eval(names)
    init_sparsity: eval(ratio / 10)
    final_sparsity: eval(ratio)
    start_epoch: eval(warm)
    end_epoch: eval(warm + prune)
    update_frequency: 1
    mask_type: eval(mask)
    fisher_block_size: 8
    num_grads: 4
    damp: 1e-7

  - !ConstantPruningModifier
    start_epoch: eval(warm + prune)
    end_epoch: eval(total)
    params: __ALL_PRUNABLE__

  - !OBertDistillationModifier
    hardness: 1
    temperature: eval(steps - 5)

  - !LayerDropModifier
    keep: 2
"""


def test_variables_nested_eval_and_every_builtin_match_sparseml(sparseml_manager, tmp_path):
    plan, _ = _assert_same(sparseml_manager, _write(tmp_path, VARIABLES))
    by_tag = {m.tag: m for m in plan.modifiers}
    assert plan.variables["total"] == 1 + 2 + 1.25
    assert by_tag["OBertPruningModifier"].params.params == ["re:.*query.weight", "re:.*key.weight"]
    assert by_tag["OBertPruningModifier"].params.mask_type == "block4"
    assert by_tag["LearningRateFunctionModifier"].params.init_lr == 5e-5  # YAML 1.1 string, coerced
    assert by_tag["SetLearningRateModifier"].end_epoch == -1.0  # SparseML ignores its end_epoch


def test_recipe_args_as_sparseml_parses_them(sparseml_manager, tmp_path):
    path = _write(tmp_path, VARIABLES)
    for args in ("warm=2,mask=unstructured", '{"steps": 10, "lr": 0.001}', "prune: 3"):
        _assert_same(sparseml_manager, path, args)
    assert parse_recipe_args("warm=2, mask:block8") == {"warm": 2.0, "mask": "block8"}


STAGED = """\
num_epochs: 4
lr: 0.1
scale: 2
half: eval(num_epochs / scale)
stage_a:
  lr: 0.01
  # a stage variable naming a global reads the GLOBAL, even though this stage shadows it (SparseML)
  stage_lr: eval(lr)
  # ... and an expression over globals fails there (SparseML): `end: eval(num_epochs / scale)`
  end: eval(half)
  a_modifiers:
    - !EpochRangeModifier
      start_epoch: 0
      end_epoch: eval(end)
    - !LearningRateFunctionModifier
      start_epoch: 0
      end_epoch: eval(end)
      lr_func: linear
      init_lr: eval(lr)
      final_lr: eval(stage_lr)
stage_b:
  b_modifiers:
    - !LearningRateFunctionModifier
      start_epoch: eval(num_epochs / scale)
      end_epoch: eval(num_epochs)
      lr_func: cyclic_linear
      cycle_epochs: 0.5
      init_lr: eval(lr)
      final_lr: 0.0
    - !OBertQuantizationModifier
      start_epoch: eval(num_epochs - 1)
      freeze_observer_epoch: eval(num_epochs - 0.5)
"""


def test_stages_their_variables_and_epochs_match_sparseml(sparseml_manager, tmp_path):
    path = _write(tmp_path, STAGED)
    plan, _ = _assert_same(sparseml_manager, path)
    assert list(plan.stages) == ["stage_a", "stage_b"]
    lr_a = next(m for m in plan.stages["stage_a"] if m.tag == "LearningRateFunctionModifier")
    assert (lr_a.params.init_lr, lr_a.params.final_lr) == (0.01, 0.1)
    for args in ("lr=0.05", {"scale": 4, "num_epochs": 8}, "end=1"):
        _assert_same(sparseml_manager, path, args)


def test_stages_sort_by_their_epochs_not_their_file_order(sparseml_manager, tmp_path):
    text = STAGED.replace("stage_a:", "stage_z:").replace("a_modifiers", "z_modifiers")
    plan, _ = _assert_same(sparseml_manager, _write(tmp_path, text))
    assert list(plan.stages) == ["stage_z", "stage_b"]


def test_a_recipe_card_front_matter(sparseml_manager, tmp_path):
    card = f"---\n{VARIABLES}---\n\n# A recipe card\n\nProse that is not YAML: {{a: [b\n"
    plan, _ = _assert_same(sparseml_manager, _write(tmp_path, card, "card.md"))
    assert plan.source.endswith("card.md")


def test_the_text_of_a_recipe_loads_like_its_file(sparseml_manager):
    text = (ROOT / "recipes" / "demo.yaml").read_text()
    assert load_recipe(text).to_yaml() == str(sparseml_manager.from_yaml(text))


# --------------------------------------------------------------------------------------------
# writing recipe.yaml: round trips in both directions, composing as the trainer does
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [ROOT / "recipes" / "minilm_3l_drop_prune_qat.yaml", ROOT / "recipes" / "demo.yaml"],
    ids=lambda p: p.stem,
)
def test_the_written_recipe_reloads_on_both_stacks(sparseml_manager, tmp_path, path):
    plan = load_recipe(path)
    saved = plan.save(tmp_path / "native-model")
    assert saved.name == RECIPE_NAME and not list(saved.parent.glob(".*partial"))
    # SparseML reads what we wrote, and writes it back unchanged
    assert str(sparseml_manager.from_yaml(str(saved))) == saved.read_text()
    # we read what SparseML wrote in a model folder, and write it back unchanged
    theirs = tmp_path / "sparseml-model" / RECIPE_NAME
    sparseml_manager.from_yaml(str(path)).save(str(theirs))
    assert load_recipe(theirs).to_yaml() == theirs.read_text() == saved.read_text()


@pytest.mark.parametrize("name", ["qat.yaml", "minilm_3l_drop_prune_qat.yaml"])
def test_metadata_the_trainer_writes_is_carried_over(sparseml_manager, tmp_path, name):
    """SparseML's trainer saves ``__metadata__`` (training arguments, framework versions) with
    the recipe; reading that folder natively and writing it again keeps it, byte for byte."""
    theirs = tmp_path / "model" / RECIPE_NAME
    metadata = {"per_device_train_batch_size": 8, "fp16": False}
    manager = sparseml_manager.from_yaml(str(ROOT / "recipes" / name), metadata=metadata)
    manager.save(str(theirs))
    assert "framework_metadata" in theirs.read_text()
    plan = load_recipe(theirs)
    assert plan.to_yaml() == theirs.read_text()
    assert str(sparseml_manager.from_yaml(str(plan.save(tmp_path / "again")))) == theirs.read_text()


@pytest.mark.parametrize(
    ("base", "more"),
    [
        ("distill.yaml", "qat.yaml"),  # two plain recipes -> stage_0, stage_1
        ("minilm_3l_drop_prune_qat.yaml", "qat.yaml"),  # staged + plain
        ("qat.yaml", "minilm_3l_drop_prune_qat.yaml"),  # plain + staged
    ],
)
def test_compose_continues_training_as_sparseml_trainer_does(sparseml_manager, base, more):
    base_path, more_path = ROOT / "recipes" / base, ROOT / "recipes" / more
    expected = sparseml_manager.compose_staged(
        base_recipe=str(sparseml_manager.from_yaml(str(base_path))),
        additional_recipe=str(sparseml_manager.from_yaml(str(more_path))),
    )
    composed = compose(load_recipe(base_path), load_recipe(more_path))
    assert composed.to_yaml() == str(expected)
    assert composed.max_epochs == expected.max_epochs


def test_lr_functions_match_sparseml_bit_for_bit(sparseml_manager):
    from sparseml.pytorch.sparsification import LearningRateFunctionModifier

    keys = ("lr_func", "init_lr", "final_lr", "start_epoch", "end_epoch", "cycle_epochs")
    cases = [
        dict(zip(keys, values, strict=True))
        for values in [
            ("linear", 5e-5, 0.0, 0.0, 3.0, 1.0),
            ("linear", 1e-4, 1e-6, 1.5, 4.0, 1.0),
            ("cosine", 3e-5, 1e-6, 0.0, 2.0, 1.0),
            ("cosine", 1e-6, 3e-5, 1.0, 2.0, 1.0),
            ("cyclic_linear", 5e-5, 5e-6, 2.0, 5.0, 1.0),
            ("cyclic_linear", 5e-5, 0.0, 0.0, 2.5, 1.0),
        ]
    ]
    for case in cases:
        text = "modifiers:\n  - !LearningRateFunctionModifier\n" + "".join(
            f"    {k}: {v}\n" for k, v in case.items()
        )
        (ours,) = load_recipe(text).modifiers
        theirs = LearningRateFunctionModifier(**case)
        function = getattr(theirs, f"_{case['lr_func']}")
        for steps in (7, 10):
            first, last = int(case["start_epoch"] * steps), int(case["end_epoch"] * steps)
            for step in range(first, last):
                epoch = step / steps
                assert lr_at(ours.params, epoch, steps) == function(epoch, steps), (case, epoch)


# --------------------------------------------------------------------------------------------
# refusals: one line naming the file, the line, the modifier and the key
# --------------------------------------------------------------------------------------------

EPOCH_RANGE = "modifiers:\n  - !EpochRangeModifier\n    start_epoch: 0\n    end_epoch: 1\n"
BAD = {
    "sparseml-builtin": (
        "modifiers:\n  - !EpochRangeModifier\n    start_epoch: 0\n    end_epoch: 1\n"
        "  - !GMPruningModifier\n    start_epoch: 0\n",
        "recipe.yaml:5: modifier 2: '!GMPruningModifier' is a SparseML built-in the native engine "
        "does not run",
    ),
    "unknown-tag": (
        "modifiers:\n  - !EpochRangeModifer\n    start_epoch: 0\n",
        "recipe.yaml:2: modifier 1: unknown tag '!EpochRangeModifer'; did you mean !EpochRangeModifier",
    ),
    "misspelled-key": (
        "modifiers:\n  - !EpochRangeModifier\n    start_epoch: 0\n    end_epohc: 1\n",
        "recipe.yaml:2: modifier 1: !EpochRangeModifier: unknown recipe key 'end_epohc'; "
        "did you mean 'end_epoch'",
    ),
    "bad-value": (
        "modifiers:\n  - !LearningRateFunctionModifier\n    lr_func: exponential\n    init_lr: 0.1\n"
        "    final_lr: 0.0\n    start_epoch: 0\n    end_epoch: 1\n",
        "!LearningRateFunctionModifier: recipe key 'lr_func' = 'exponential' is invalid: expected one of "
        "'linear', 'cosine', 'cyclic_linear'",
    ),
    "missing-variable-in-modifier": (
        "modifiers:\n  - !EpochRangeModifier\n    start_epoch: 0\n    end_epoch: eval(epochs)\n",
        "recipe.yaml:2: !EpochRangeModifier key 'end_epoch': eval(epochs) names 'epochs', "
        "which is not a variable",
    ),
    "missing-variable": (
        "total: eval(epochs + 1)\n" + EPOCH_RANGE,
        "recipe.yaml:1: variable 'total' = 'eval(epochs + 1)' cannot be evaluated: 'epochs' is not a numeric "
        "variable of the recipe",
    ),
    "cycle": (
        "a: eval(b)\nb: eval(a + 1)\n" + EPOCH_RANGE,
        "cannot be evaluated",
    ),
    "bad-eval": (
        "modifiers:\n  - !EpochRangeModifier\n    start_epoch: 0\n    end_epoch: eval(__import__('os'))\n",
        "recipe.yaml:2: !EpochRangeModifier key 'end_epoch': eval(__import__('os')):",
    ),
    "complex-result": (
        "modifiers:\n  - !EpochRangeModifier\n    start_epoch: 0\n    end_epoch: eval((0 - 1) ** 0.5)\n",
        "eval() must give a number",
    ),
    "unary-minus": (
        "x: 1\nmodifiers:\n  - !EpochRangeModifier\n    start_epoch: 0\n    end_epoch: eval(-x + 2)\n",
        "SparseML's eval() cannot negate",
    ),
    "bad-recipe-args": (VARIABLES, "recipe_args: 'wram' is not a variable of the recipe"),
    "not-a-modifier": (
        "modifiers:\n  - start_epoch: 0\n",
        "list 'modifiers' holds {'start_epoch': 0}, which is not a '- !Tag' modifier",
    ),
    "no-modifiers": ("num_epochs: 1\n", "no modifiers found"),
    "namespaced": (
        "modifiers:\n  - !pytorch.EpochRangeModifier\n    start_epoch: 0\n",
        "write '!EpochRangeModifier'",
    ),
    "mixed": (
        "modifiers:\n  - !EpochRangeModifier\n    start_epoch: 0\n    end_epoch: 1\n" + STAGED,
        "SparseML would silently drop the stages",
    ),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_refusals_name_the_place(tmp_path, case):
    text, expected = BAD[case]
    path = _write(tmp_path, text)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, "wram=2" if case == "bad-recipe-args" else None)
    message = str(caught.value)
    assert "\n" not in message
    assert expected.replace("recipe.yaml", str(path)) in message, message


@pytest.mark.parametrize(
    "case", ["unknown-tag", "misspelled-key", "missing-variable-in-modifier", "missing-variable", "cycle",
             "bad-eval", "unary-minus", "complex-result", "bad-recipe-args", "no-modifiers"]
)  # fmt: skip
def test_what_the_engine_refuses_sparseml_refuses_too(sparseml_manager, tmp_path, case):
    path = _write(tmp_path, BAD[case][0])
    with pytest.raises(Exception):  # noqa: B017 - SparseML's errors are of many kinds
        args = "wram=2" if case == "bad-recipe-args" else None
        sparseml_manager.from_yaml(str(path), recipe_variables=args)


def test_sources_sparseml_would_not_read_are_refused(tmp_path):
    with pytest.raises(RecipeError, match="SparseZoo stubs are not read"):
        load_recipe("zoo:nlp/sentiment_analysis/obert-base/pytorch/huggingface/sst2/pruned90_quant-none")
    with pytest.raises(RecipeError, match=r"rejects '\.yml'"):
        load_recipe(_write(tmp_path, VARIABLES, "recipe.yml"))
    with pytest.raises(RecipeError, match="no YAML front matter"):
        load_recipe(_write(tmp_path, "# just prose\n", "card.md"))
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_restricted_eval_is_restricted():
    assert restricted_eval("2 ** 3 // 3 % 2 + round(2.6) - abs(0 - 1)", {}) == 2
    for expression in ("x.real", "[1]", "'a'", "1 if 1 else 2", "open('f')", "2 < 3"):
        with pytest.raises(RecipeError, match="not allowed|not an expression"):
            restricted_eval(expression, {"x": 1})
    with pytest.raises(RecipeError, match="ZeroDivisionError"):
        restricted_eval("1 / 0", {})


# --------------------------------------------------------------------------------------------
# import hygiene and `obert recipe check` without SparseML
# --------------------------------------------------------------------------------------------


def test_the_native_engine_imports_neither_sparseml_nor_torch():
    code = (
        "import json, sys; import obert_modifiers.native.recipe as r; "
        f"r.load_recipe({str(ROOT / 'recipes' / 'minilm_3l_drop_prune_qat.yaml')!r}).to_yaml(); "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'sparseml'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


BLOCK_SPARSEML = "import sys; sys.modules['sparseml'] = None; "


def _recipe_check(*args: str, block: bool) -> subprocess.CompletedProcess:
    code = (BLOCK_SPARSEML if block else "") + (
        "import sys; from obert_modifiers.cli import main; "
        "sys.argv = ['obert', 'recipe', 'check', *sys.argv[1:]]; main()"
    )
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def test_recipe_check_runs_on_the_native_engine_without_sparseml(tmp_path):
    path = ROOT / "recipes" / "minilm_3l_drop_prune_qat.yaml"
    result = _recipe_check(str(path), "--json", block=True)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    plan = load_recipe(path)
    assert payload["max_epochs"] == plan.max_epochs
    assert [m["tag"] for m in payload["modifiers"]] == [m.tag for m in plan.modifiers]
    assert "sparseml" not in result.stderr.lower()
    result = _recipe_check(str(path), block=True)
    assert result.returncode == 0, result.stderr
    assert "recipe OK: the native engine resolves it; training epochs: 12" in " ".join(result.stdout.split())
    bad = _write(tmp_path, BAD["sparseml-builtin"][0])
    result = _recipe_check(str(bad), block=True)
    assert result.returncode == 2
    assert f"{bad}:5" in result.stderr and "!GMPruningModifier" in result.stderr


def test_recipe_check_gives_the_same_answer_on_both_engines(sparseml_manager, tmp_path):
    path = _write(tmp_path, STAGED)
    native = _recipe_check(str(path), "--json", "--recipe-args", "lr=0.05", block=True)
    legacy = _recipe_check(str(path), "--json", "--recipe-args", "lr=0.05", block=False)
    assert native.returncode == legacy.returncode == 0, native.stderr + legacy.stderr
    ours, theirs = json.loads(native.stdout), json.loads(legacy.stdout)
    assert ours["modifiers"] == theirs["modifiers"]
    assert ours["max_epochs"] == theirs["max_epochs"]
