"""Encoder families on the native adapter: BERT, RoBERTa, DistilBERT and ModernBERT prune, drop
layers, distil and quantize (attention matmuls included) with one recipe; DeBERTa-v2 prunes and
quantizes its linears (its attention does not go through transformers' registry)."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers", reason="needs transformers (the [modern] extra)")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the native adapter targets transformers 5 (the modern venv)", allow_module_level=True)

import torch  # noqa: E402
from _native import TinyData, sparsity, tiny_model, trainer  # noqa: E402

from obert_modifiers.algorithms.quantization import QuantizedLinear, observers_frozen  # noqa: E402
from obert_modifiers.native import load_model  # noqa: E402
from obert_modifiers.native.families import DEFAULT_PRUNE_PARAMS, default_prune_params  # noqa: E402
from obert_modifiers.native.lifecycle import find_params  # noqa: E402

RECIPE = """
prune_params: ["re:none"]
drop:
  training_modifiers:
    - !EpochRangeModifier
      start_epoch: 0.0
      end_epoch: 1.0
  structure_modifiers:
    - !LayerDropModifier
      keep: 2
      num_layers: 4
  distillation_modifiers:
    - !OBertDistillationModifier
      hardness: 0.5
      hidden_weight: 0.5
      start_epoch: 0.0
      end_epoch: 1.0
prune_qat:
  training_modifiers:
    - !EpochRangeModifier
      start_epoch: 1.0
      end_epoch: 3.0
  pruning_modifiers:
    - !OBertPruningModifier
      params: eval(prune_params)
      init_sparsity: 0.5
      final_sparsity: 0.5
      start_epoch: 1.0
      end_epoch: 1.0
      update_frequency: 1.0
      num_grads: 8
      fisher_block_size: 16
  quantization_modifiers:
    - !OBertQuantizationModifier
      start_epoch: 2.0
      freeze_observer_epoch: 2.5
"""


def _batch():
    data = TinyData(6, seed=4)
    return {"input_ids": data.ids, "attention_mask": data.mask}


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "modernbert"])
def test_family_drops_prunes_distils_and_quantizes(family, tmp_path):
    model = tiny_model(family, layers=4)
    run = trainer(
        RECIPE,
        tmp_path,
        model=model,
        teacher="self",
        recipe_args={"prune_params": default_prune_params(model)},
    )
    assert run.model.config.num_hidden_layers == 2
    run.train()
    runner = run.recipe_runner
    pruning = next(m for m in runner.modifiers if m.tag == "OBertPruningModifier")
    assert [h["epoch"] for h in pruning.history] == [1.0]
    assert len(pruning.weights) == (12 if family != "modernbert" else 8)  # the 2 kept layers
    assert sparsity(pruning.weights) == pytest.approx(0.5, abs=1e-3)
    kd = next(m for m in runner.modifiers if m.tag == "OBertDistillationModifier")
    assert kd.pairs == [(0, 0), (1, 2)]  # the kept layers meet their teacher layers
    quant = next(m for m in runner.modifiers if m.tag == "OBertQuantizationModifier")
    assert len(quant.plan.matmuls) == 4 and observers_frozen(run.model)
    assert run.model.config._attn_implementation == "obert_qat"
    run.save_model(tmp_path / "saved")
    reloaded = load_model(tmp_path / "saved")
    run.model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**_batch()).logits, run.model(**_batch()).logits)


def test_deberta_prunes_and_quantizes_its_linears(tmp_path):
    model = tiny_model("deberta-v2", layers=2)
    recipe = """
prune_params: ["re:none"]
modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: 2.0
  - !OBertPruningModifier
    params: eval(prune_params)
    init_sparsity: 0.5
    final_sparsity: 0.5
    start_epoch: 0.0
    end_epoch: 0.0
    update_frequency: 1.0
    num_grads: 8
    fisher_block_size: 16
  - !OBertQuantizationModifier
    start_epoch: 1.0
"""
    run = trainer(recipe, tmp_path, model=model, recipe_args={"prune_params": default_prune_params(model)})
    run.train()
    pruning = next(m for m in run.recipe_runner.modifiers if m.tag == "OBertPruningModifier")
    assert sparsity(pruning.weights) == pytest.approx(0.5, abs=1e-3)
    quant = next(m for m in run.recipe_runner.modifiers if m.tag == "OBertQuantizationModifier")
    assert quant.plan.matmuls == [] and len(quant.plan.linears) >= 12
    assert isinstance(run.model.deberta.encoder.layer[0].attention.self.query_proj, QuantizedLinear)


@pytest.mark.parametrize("family", sorted(DEFAULT_PRUNE_PARAMS))
def test_default_patterns_match_every_encoder_linear_and_nothing_else(family):
    model = tiny_model(family, layers=2)
    found = [name for name, _ in find_params(model, default_prune_params(model), "OBertPruningModifier")]
    expected = 4 if family == "modernbert" else 6
    assert len(found) == 2 * expected
    assert not any(
        k in name for name in found for k in ("embed", "classifier", "pooler", "pre_classifier", "head")
    )


def test_obert_train_fills_in_the_familys_prune_params(tmp_path):
    """The repo's recipes read their oBERT params from the variable prune_params (BERT names): for
    another family obert train sets it to that family's default, unless recipe_args set it."""
    from obert_modifiers.native import load_recipe
    from obert_modifiers.native.families import with_family_defaults

    variables = load_recipe("recipes/minilm_6l_prune.yaml").variables
    modern = tiny_model("modernbert")
    assert with_family_defaults(variables, {}, modern) == {"prune_params": DEFAULT_PRUNE_PARAMS["modernbert"]}
    assert with_family_defaults(variables, {"prune_params": ["x"]}, modern) == {"prune_params": ["x"]}
    assert with_family_defaults(variables, {"num_grads": 8}, tiny_model("bert")) == {"num_grads": 8}
    args = with_family_defaults(variables, {}, modern)
    plan = load_recipe("recipes/minilm_6l_prune.yaml", args)
    (pruning,) = [m for m in plan.modifiers if m.tag == "OBertPruningModifier"]
    assert len(find_params(modern, pruning.params.params, pruning.tag)) == 4 * 4
