"""``!ZipLMPruningModifier`` on the native adapter (transformers 5): the structured step at its epoch
(FLOP-counted latency table, so no runtime is measured), the speed-up predicted, the optimizer holding
the shrunk parameters, the structure recorded, exact reload, exact resume, and QAT after it."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers", reason="needs transformers (the [modern] extra)")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the native adapter targets transformers 5 (the modern venv)", allow_module_level=True)

import torch  # noqa: E402
from _native import StepRecorder, TinyData, trainer  # noqa: E402

from obert_modifiers.algorithms.quantization import observers_frozen  # noqa: E402
from obert_modifiers.native import load_model, load_recipe  # noqa: E402

RECIPE = """
modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: 3.0
  - !ZipLMPruningModifier
    start_epoch: 1.0
    speedup_targets: 1.6
    num_calibration_samples: 16
    calibration_batch_size: 8
    latency_runtime: flops
    latency_sequence_length: 12
"""
QAT = """
  - !OBertQuantizationModifier
    start_epoch: 2.0
    freeze_observer_epoch: 2.5
"""


def four_head_bert(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=2,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def _batch():
    data = TinyData(6, seed=3)
    return {"input_ids": data.ids, "attention_mask": data.mask}


def test_ziplm_step_shrinks_to_the_target_and_training_goes_on(tmp_path):
    run = trainer(RECIPE, tmp_path, model=four_head_bert())
    before = sum(p.numel() for p in run.model.parameters())
    counts = StepRecorder(lambda: sum(p.numel() for p in run.model.parameters()))
    run.add_callback(counts)
    run.train()
    (ziplm,) = [m for m in run.recipe_runner.modifiers if m.tag == "ZipLMPruningModifier"]
    (step,) = ziplm.history
    assert (step["step"], step["epoch"]) == (4, 1.0)
    assert step["predicted"] >= 1.6
    structure = step["structure"]
    assert sum(structure["heads"]) < 16 or sum(structure["ffn"]) < 4 * 64
    assert run.model.config.obert_structure == structure
    sizes = dict(counts.values)
    assert sizes[4] == before > sizes[5] == sizes[12]  # shrunk in the 5th optimizer step, then trained
    optimized = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in run.model.parameters()}
    run.save_model(tmp_path / "saved")
    (saved,) = [
        m for m in load_recipe(tmp_path / "saved" / "recipe.yaml").modifiers if m.tag.startswith("ZipLM")
    ]
    assert saved.params.structure == structure and saved.params.steps_done == 1
    reloaded = load_model(tmp_path / "saved")
    run.model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**_batch()).logits, run.model(**_batch()).logits)


def test_ziplm_then_qat_reloads_exactly(tmp_path):
    run = trainer(RECIPE + QAT, tmp_path, model=four_head_bert())
    run.train()
    assert observers_frozen(run.model)
    run.save_model(tmp_path / "saved")
    reloaded = load_model(tmp_path / "saved")
    run.model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**_batch()).logits, run.model(**_batch()).logits)


def test_resume_after_the_ziplm_step_ends_as_the_uninterrupted_run(tmp_path):
    args = {"save_strategy": "steps", "save_steps": 6}
    full = trainer(RECIPE, tmp_path / "full", model=four_head_bert(), **args)
    full.train()
    resumed = trainer(RECIPE, tmp_path / "resumed", model=four_head_bert(seed=9), **args)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-6"))
    assert resumed.model.config.obert_structure == full.model.config.obert_structure
    final, again = full.model.state_dict(), resumed.model.state_dict()
    assert final.keys() == again.keys()
    assert [k for k in final if not torch.equal(final[k], again[k])] == []


def test_ziplm_model_exports_on_the_modern_stack(tmp_path):
    """The shrunk model (BERT with the MiniLM tokenizer) becomes a deployment folder: the export's
    loader rebuilds the recorded shapes, the ONNX graph matches PyTorch, export.json records them."""
    from obert_modifiers.deployment import DeploymentManifest
    from obert_modifiers.export import export_deployment
    from obert_modifiers.models import save_tiny_bert

    model_dir = save_tiny_bert(tmp_path / "model", num_labels=2, num_layers=2, heads=4)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir)
    data = TinyData(32)
    data.ids = data.ids % 1000 + 1000  # ids of the real vocabulary
    run = trainer(RECIPE, tmp_path / "out", model=model, data=data)
    run.train()
    run.save_model(tmp_path / "shrunk")
    transformers.AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp_path / "shrunk")
    result = export_deployment(tmp_path / "shrunk", tmp_path / "deploy", progress=False)
    manifest = DeploymentManifest.read(tmp_path / "deploy")
    structure = run.model.config.obert_structure
    assert manifest.structure is not None and manifest.structure.heads == structure["heads"]
    assert result.max_abs_diff < 1e-4 and manifest.num_parameters == sum(
        p.numel() for p in run.model.parameters()
    )


def test_a_list_of_targets_saves_each_family_member(tmp_path):
    """Targets [1.3, 1.6]: steps at epochs 1 and 2; before the second step and at the end, the model at
    each target goes to <output_dir>/ziplm-<t>x with a recipe that rebuilds exactly its structure."""
    recipe = RECIPE.replace("speedup_targets: 1.6", "speedup_targets: [1.3, 1.6]")
    run = trainer(recipe, tmp_path / "out", model=four_head_bert())
    run.train()
    (ziplm,) = [m for m in run.recipe_runner.modifiers if m.tag == "ZipLMPruningModifier"]
    assert [(h["epoch"], h["target"]) for h in ziplm.history] == [(1.0, 1.3), (2.0, 1.6)]
    assert ziplm.members == [tmp_path / "out" / "ziplm-1.3x", tmp_path / "out" / "ziplm-1.6x"]
    small, smaller = (load_model(folder) for folder in ziplm.members)
    assert small.config.obert_structure == ziplm.history[0]["structure"]
    assert smaller.config.obert_structure == ziplm.history[1]["structure"]
    assert sum(p.numel() for p in smaller.parameters()) < sum(p.numel() for p in small.parameters())
    (member,) = load_recipe(ziplm.members[0] / "recipe.yaml").modifiers
    assert member.params.speedup_targets == [1.3] and member.params.steps_done == 1
    run.model.eval()
    with torch.no_grad():  # the last member is the trained model
        assert torch.equal(smaller(**_batch()).logits, run.model(**_batch()).logits)


def test_a_deepsparse_latency_table_without_deepsparse_fails_before_training(tmp_path):
    """The modern venv has no DeepSparse: ``latency_runtime: deepsparse`` is refused by name when the
    modifier binds to the trainer (building it), not at the pruning step an epoch into training."""
    from obert_modifiers.native import RecipeRunError

    recipe = RECIPE.replace("latency_runtime: flops", "latency_runtime: deepsparse")
    with pytest.raises(RecipeRunError, match=r"ZipLMPruningModifier: .*'deepsparse' is not installed"):
        trainer(recipe, tmp_path, model=four_head_bert())


def _table_file(path, config, **over):
    """A DeepSparse table from "the deployment machine" in the setting of ``RECIPE``."""
    from obert_modifiers.testing.latency_fixtures import table_file

    return table_file(path, config, **{"runtime": "deepsparse", "sequence_length": 12, **over})


def test_a_table_file_from_the_deployment_machine_needs_no_runtime_here(tmp_path):
    """``latency_table_file``: a DeepSparse table measured elsewhere drives the step in this venv, which
    has no DeepSparse; a file of another setting is refused when the modifier binds, naming the key."""
    from obert_modifiers.native import RecipeRunError

    model = four_head_bert()
    table = _table_file(tmp_path / "table.json", model.config)
    recipe = RECIPE.replace(
        "latency_runtime: flops", f"latency_runtime: deepsparse\n    latency_table_file: {table}"
    )
    run = trainer(recipe, tmp_path / "run", model=model)
    run.train()
    (ziplm,) = [m for m in run.recipe_runner.modifiers if m.tag == "ZipLMPruningModifier"]
    assert ziplm.history[0]["predicted"] >= 1.6 and ziplm.table.key.cpu == "the deployment CPU"
    other = _table_file(tmp_path / "other.json", model.config, threads=4)
    with pytest.raises(RecipeRunError, match=r"threads 4 where the recipe's latency_threads is 2"):
        trainer(recipe.replace(str(table), str(other)), tmp_path / "other", model=four_head_bert())
