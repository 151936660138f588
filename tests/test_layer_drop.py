"""!LayerDropModifier: layer selection math, physical removal, reload with plain from_pretrained,
idempotence, importance ordering, and structure reload through SparseML's own manager."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _helpers import (
    BIN,
    EXPORT_SCRIPT,
    TRAIN_SCRIPT,
    offline_env,
    run,
    stock_export_args,
    stock_train_args,
)
from torch import nn

from obert_modifiers.algorithms import layer_drop as algo

RECIPE_UNIFORM = """
modifiers:
  - !LayerDropModifier
    keep: 2
    strategy: uniform
    start_epoch: 0.0
"""


def _manager(recipe: str):
    from sparseml.pytorch.optim import ScheduledModifierManager

    return ScheduledModifierManager.from_yaml(recipe)


def _load(folder):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(folder).eval()


def _inputs(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 5000, (3, 16), generator=generator)
    mask = torch.ones_like(ids)
    mask[2, 10:] = 0
    return {"input_ids": ids, "attention_mask": mask}


class PassThroughLayer(nn.Module):
    """An encoder layer that returns its input hidden states: skipping it changes nothing."""

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,)


# ---------------------------------------------------------------------------- pure algorithms
def test_uniform_keep_is_evenly_spaced_from_layer_zero():
    assert algo.uniform_keep(12, 6) == [0, 2, 4, 6, 8, 10]
    assert algo.uniform_keep(12, 3) == [0, 4, 8]
    assert algo.uniform_keep(6, 3) == [0, 2, 4]
    assert algo.uniform_keep(4, 4) == [0, 1, 2, 3]
    with pytest.raises(algo.LayerDropError, match="cannot keep 5 of 4"):
        algo.uniform_keep(4, 5)


def test_keep_from_drop_and_least_important():
    assert algo.keep_from_drop(6, [1, 3, 5]) == [0, 2, 4]
    with pytest.raises(algo.LayerDropError, match=r"out of range.*6 layers"):
        algo.keep_from_drop(6, [6])
    with pytest.raises(algo.LayerDropError, match="no layer"):
        algo.keep_from_drop(2, [0, 1])
    assert algo.least_important([0.5, 0.1, 0.9, 0.0], 2) == [1, 3]
    assert algo.least_important([0.2, 0.2, 0.3], 1) == [1]  # tie: the later layer goes first


def test_find_encoder_layers_bert_and_distilbert():
    from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertForSequenceClassification

    bert = BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
    )
    name, layers = algo.find_encoder_layers(bert)
    assert name == "encoder.layer" and len(layers) == 3
    distil = DistilBertForSequenceClassification(
        DistilBertConfig(dim=32, n_layers=4, n_heads=2, hidden_dim=64)
    )
    name, layers = algo.find_encoder_layers(distil)
    assert name == "distilbert.transformer.layer" and len(layers) == 4
    algo.drop_layers(distil, [0, 3])
    assert distil.config.n_layers == 2 and len(distil.distilbert.transformer.layer) == 2
    assert distil.config.obert_layer_map == [0, 3]


def test_distilbert_drop_saves_and_reloads(tmp_path):
    from transformers import (
        AutoModelForSequenceClassification,
        DistilBertConfig,
        DistilBertForSequenceClassification,
    )

    torch.manual_seed(0)
    model = DistilBertForSequenceClassification(
        DistilBertConfig(dim=32, n_layers=4, n_heads=2, hidden_dim=64, vocab_size=6000)
    ).eval()
    algo.drop_layers(model, [1, 2])
    with torch.no_grad():
        before = model(**_inputs()).logits
    model.save_pretrained(tmp_path, safe_serialization=False)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert len(reloaded.distilbert.transformer.layer) == 2
    with torch.no_grad():
        assert torch.equal(reloaded(**_inputs()).logits, before)


# ---------------------------------------------------------------------------- through SparseML
def test_drop_save_plain_reload_same_outputs(tiny_bert_dir, tmp_path):
    model = _load(tiny_bert_dir)
    original_layers = list(model.bert.encoder.layer)
    manager = _manager(RECIPE_UNIFORM)
    manager.apply_structure(model, epoch=0.0)

    assert len(model.bert.encoder.layer) == 2
    assert model.bert.encoder.layer[1] is original_layers[2]  # uniform 4 -> 2 keeps layers 0 and 2
    assert model.config.num_hidden_layers == 2
    assert model.config.obert_layer_map == [0, 2]
    assert not any(".layer.2." in k or ".layer.3." in k for k in model.state_dict())
    with torch.no_grad():
        before = model(**_inputs()).logits

    model.save_pretrained(tmp_path, safe_serialization=False)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["num_hidden_layers"] == 2 and saved["obert_layer_map"] == [0, 2]
    full_size = (tiny_bert_dir / "pytorch_model.bin").stat().st_size
    assert (tmp_path / "pytorch_model.bin").stat().st_size < full_size

    reloaded = _load(tmp_path)  # plain transformers, no recipe
    assert len(reloaded.bert.encoder.layer) == 2
    with torch.no_grad():
        assert torch.equal(reloaded(**_inputs()).logits, before)


def test_idempotent_on_saved_model_and_on_second_application(tiny_bert_dir, tmp_path):
    model = _load(tiny_bert_dir)
    manager = _manager(RECIPE_UNIFORM)
    manager.apply_structure(model, epoch=0.0)
    model.save_pretrained(tmp_path, safe_serialization=False)
    manager.save(str(tmp_path / "recipe.yaml"))
    saved_recipe = (tmp_path / "recipe.yaml").read_text()
    assert "layers: [1, 3]" in saved_recipe and "num_layers: 4" in saved_recipe

    for recipe in (saved_recipe, RECIPE_UNIFORM):  # the recorded recipe and the original one
        reloaded = _load(tmp_path)
        state = {k: v.clone() for k, v in reloaded.state_dict().items()}
        again = _manager(recipe)
        again.apply_structure(reloaded, epoch=math.inf)  # as SparseML does on reload / export
        assert len(reloaded.bert.encoder.layer) == 2
        assert reloaded.config.obert_layer_drops == [[4, [0, 2]]]
        after = reloaded.state_dict()
        assert set(after) == set(state) and all(torch.equal(after[k], state[k]) for k in state)


def test_chained_drops_compose_the_map_and_stay_idempotent(tiny_bert_dir, tmp_path):
    first = _manager(RECIPE_UNIFORM.replace("keep: 2", "keep: 3"))  # 4 -> 3 keeps 0, 1, 2
    second = _manager("modifiers:\n  - !LayerDropModifier\n    layers: [1]\n    num_layers: 3\n")
    model = _load(tiny_bert_dir)
    first.apply_structure(model, epoch=0.0)
    second.apply_structure(model, epoch=0.0)
    assert model.config.obert_layer_map == [0, 2]
    model.save_pretrained(tmp_path, safe_serialization=False)
    reloaded = _load(tmp_path)
    for recipe in (str(first), str(second)):
        _manager(recipe).apply_structure(reloaded, epoch=math.inf)
    assert len(reloaded.bert.encoder.layer) == 2 and reloaded.config.obert_layer_map == [0, 2]


def test_recipe_for_another_depth_is_refused(tiny_bert_dir):
    model = _load(tiny_bert_dir)
    manager = _manager(RECIPE_UNIFORM.replace("keep: 2", "keep: 3\n    num_layers: 6"))
    with pytest.raises(RuntimeError, match=r"has 4 layers.*num_layers=6"):
        manager.apply_structure(model, epoch=0.0)


def test_original_checkpoint_reloads_into_dropped_model(tiny_bert_dir):
    """SparseML's trainer reloads the pre-drop checkpoint after applying structure: its layers must
    land in the kept slots (original layer 2 -> student layer 1), not by position."""
    original = _load(tiny_bert_dir)
    model = _load(tiny_bert_dir)
    _manager(RECIPE_UNIFORM).apply_structure(model, epoch=0.0)
    for parameter in model.parameters():
        parameter.data.zero_()
    result = model.load_state_dict(original.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(
        model.bert.encoder.layer[1].output.dense.weight, original.bert.encoder.layer[2].output.dense.weight
    )
    assert torch.equal(
        model.bert.encoder.layer[0].output.dense.weight, original.bert.encoder.layer[0].output.dense.weight
    )


@pytest.mark.parametrize(
    ("snippet", "key"),
    [
        ("keep: 0", "keep"),
        ("keep: 2\n    strategy: random", "strategy"),
        ("layers: 3", "layers"),
        ("layers: [1]\n    keep: 2\n    num_layers: 4", "keep"),
        ("keep: 2\n    start_epoch: 2.0\n    end_epoch: 1.0", "end_epoch"),
        ("strategy: uniform", "layers"),
    ],
)
def test_bad_recipe_values_name_the_key(snippet, key):
    from obert_modifiers.modifiers._base import RecipeParameterError

    with pytest.raises(RecipeParameterError, match=f"LayerDropModifier: recipe key '{key}'"):
        _manager(f"modifiers:\n  - !LayerDropModifier\n    {snippet}\n")


def test_composed_recipe_of_a_dropped_model_loads_again():
    """Training on top of a layer-dropped model makes SparseML compose its saved recipe.yaml with the
    new one; compose_staged fills in end_epoch with the stage's last epoch, which must load again."""
    from sparseml.pytorch.optim import ScheduledModifierManager

    base = "modifiers:\n  - !EpochRangeModifier\n    start_epoch: 0.0\n    end_epoch: 2.0\n"
    base += "  - !LayerDropModifier\n    keep: 2\n    num_layers: 4\n"
    more = "modifiers:\n  - !EpochRangeModifier\n    start_epoch: 0.0\n    end_epoch: 1.0\n"
    composed = ScheduledModifierManager.compose_staged(base, more)
    reloaded = _manager(str(composed))
    drops = [
        m for stage in reloaded.modifiers.values() for m in stage if type(m).__name__ == "LayerDropModifier"
    ]
    assert len(drops) == 1 and drops[0].end_epoch == 2.0 and drops[0].keep == 2


# ---------------------------------------------------------------------------- importance
def _with_identity_layer(tiny_bert_dir, index: int):
    model = _load(tiny_bert_dir)
    model.bert.encoder.layer[index] = PassThroughLayer()
    return model


def _batches(count: int = 3):
    labels = torch.tensor([0, 3, 1])
    return [({**_inputs(seed), "labels": labels}, None) for seed in range(count)]


def test_importance_scores_identity_layer_lowest(tiny_bert_dir):
    model = _with_identity_layer(tiny_bert_dir, 2)
    scores = algo.layer_importance(model, _batches(), lambda outputs, _target: outputs.loss)
    assert len(scores) == 4
    assert scores[2] == 0.0
    assert all(score > 0.0 for i, score in enumerate(scores) if i != 2)
    assert algo.least_important(scores, 1) == [2]
    assert not model.training  # eval mode restored
    model.train()
    algo.layer_importance(model, _batches(1), lambda outputs, _target: outputs.loss)
    assert model.training


def test_greedy_order_rescores_with_earlier_choices_skipped(tiny_bert_dir):
    model = _with_identity_layer(tiny_bert_dir, 3)
    batches = _batches(2)
    order = algo.greedy_drop_order(model, batches, lambda outputs, _target: outputs.loss, 2)
    assert order[0] == (3, 0.0)  # the identity layer goes first
    second, score = order[1]
    alone = algo.layer_importance(model, batches, lambda outputs, _target: outputs.loss)
    with_three = algo.layer_importance(model, batches, lambda o, _t: o.loss, skipped=[3])
    assert with_three[3] == math.inf and second == algo.least_important(with_three, 1)[0]
    assert score == pytest.approx(with_three[second])
    # skipping an identity layer as well changes nothing
    assert with_three[second] == pytest.approx(alone[second], rel=1e-5)


def test_importance_strategy_drops_identity_layer_first_via_manager(tiny_bert_dir):
    model = _with_identity_layer(tiny_bert_dir, 1)
    manager = _manager(
        "modifiers:\n  - !LayerDropModifier\n    keep: 3\n    strategy: importance\n"
        "    importance_batches: 2\n    start_epoch: 0.0\n"
    )
    manager.apply_structure(model, epoch=0.0)  # no data here: the choice waits for initialize
    assert len(model.bert.encoder.layer) == 4

    batches = _batches(2)

    def data_loader_builder(_kwargs=None):
        while True:
            for inputs, target in batches:
                yield [], inputs, target

    manager.initialize(
        model,
        epoch=0.0,
        grad_sampler={
            "data_loader_builder": data_loader_builder,
            "loss_function": lambda outputs, _target: outputs["loss"],
        },
    )
    assert len(model.bert.encoder.layer) == 3
    assert model.config.obert_layer_map == [0, 2, 3]
    assert "layers: [1]" in str(manager)  # recorded for reload/export without data

    manager.finalize(model)


def test_drop_at_start_epoch_removes_dropped_parameters_from_optimizer(tiny_bert_dir):
    model = _load(tiny_bert_dir)
    manager = _manager(RECIPE_UNIFORM.replace("start_epoch: 0.0", "start_epoch: 1.0"))
    manager.apply_structure(model, epoch=0.0)
    assert len(model.bert.encoder.layer) == 4  # not yet: starts at epoch 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    manager.initialize(model, epoch=0.0)
    manager.update(model, optimizer, epoch=0.5, steps_per_epoch=4)
    assert len(model.bert.encoder.layer) == 4
    count = sum(len(g["params"]) for g in optimizer.param_groups)
    manager.update(model, optimizer, epoch=1.0, steps_per_epoch=4)
    assert len(model.bert.encoder.layer) == 2
    live = {id(p) for p in model.parameters()}
    assert all(id(p) in live for g in optimizer.param_groups for p in g["params"])
    assert sum(len(g["params"]) for g in optimizer.param_groups) == count - 2 * 16  # 16 tensors per layer
    manager.finalize(model)


def test_importance_without_data_on_reload_is_a_clear_error(tiny_bert_dir):
    model = _load(tiny_bert_dir)
    manager = _manager("modifiers:\n  - !LayerDropModifier\n    keep: 2\n    strategy: importance\n")
    with pytest.raises(RuntimeError, match="no recorded 'layers' and no data"):
        manager.apply_structure(model, epoch=math.inf)


# ---------------------------------------------------------------------------- stock CLI, end to end
COMBINED_RECIPE = """
prune_params: ["re:bert.encoder.layer.*.(query|key|value|dense).weight"]  # the 6 encoder linears
modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: 2.0
  - !LayerDropModifier
    keep: 2
    strategy: uniform
    num_layers: 4
    start_epoch: 0.0
  - !OBertDistillationModifier
    hardness: 0.8
    temperature: 2.0
    hidden_weight: 1.0
    distill_output_keys: [logits]
    start_epoch: 0.0
  - !OBertPruningModifier
    params: eval(prune_params)
    init_sparsity: 0.3
    final_sparsity: 0.6
    start_epoch: 0.5
    end_epoch: 1.5
    update_frequency: 0.5
    num_grads: 8
    fisher_block_size: 8
    damp: 1e-5
    grad_sampler_kwargs:
      batch_size: 4
"""


def run_stock_script(script: str, args: list, cwd) -> str:
    """Run one of SparseML's console scripts, unmodified, in a fresh process; return its output."""
    completed = run([BIN / script, *args], env=offline_env(), cwd=cwd, timeout=600)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, f"{script} failed:\n{output[-6000:]}"
    return output


def small_data(data_dir, out_dir, train_rows: int = 96):
    """The first ``train_rows`` training rows of ``data_dir`` (a few SparseML steps per epoch)."""
    import pandas

    out_dir.mkdir(parents=True, exist_ok=True)
    pandas.read_csv(data_dir / "train.csv").head(train_rows).to_csv(out_dir / "train.csv", index=False)
    pandas.read_csv(data_dir / "validation.csv").head(32).to_csv(out_dir / "validation.csv", index=False)
    return out_dir


def train_args(model_dir, data_dir, out_dir, recipe, teacher) -> list:
    """The stock training script's arguments in the end-to-end tests (distilling from ``teacher``)."""
    return stock_train_args(
        model_dir, data_dir, out_dir, recipe,
        "--do_eval", "--learning_rate", "1e-4", "--save_strategy", "no", "--save_safetensors", "False",
        "--seed", "1", "--distill_teacher", teacher,
    )  # fmt: skip


@pytest.mark.integration
def test_drop_distil_prune_with_stock_cli_then_export(tiny_bert_dir, bbc_data_dir, tmp_path):
    """Layer drop + distillation (teacher from a path) + oBERT pruning through SparseML's unmodified
    training script; the output folder exports with the stock exporter (which re-applies its
    recipe.yaml) and with export_deployment, and both ONNX files match PyTorch."""
    import onnxruntime
    from transformers import AutoTokenizer

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(COMBINED_RECIPE)
    out = tmp_path / "stock" / "model"
    run_stock_script(
        TRAIN_SCRIPT,
        train_args(tiny_bert_dir, small_data(bbc_data_dir, tmp_path / "data"), out, recipe, tiny_bert_dir),
        cwd=tmp_path,
    )
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["obert_layer_map"] == [0, 2]
    weights = torch.load(out / "pytorch_model.bin", map_location="cpu")
    assert not any(".layer.2." in k or ".layer.3." in k for k in weights)
    query = weights["bert.encoder.layer.1.attention.self.query.weight"]
    assert 0.5 < float((query == 0).float().mean()) < 0.7  # pruned to ~60 %, global
    saved_recipe = (out / "recipe.yaml").read_text()
    assert "!LayerDropModifier" in saved_recipe and "layers: [1, 3]" in saved_recipe

    model = _load(out)  # plain transformers
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(
        ["Shares rose after record profits.", "The band's new album tops the charts."],
        padding="max_length",
        max_length=64,
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        expected = model(**batch).logits.numpy()

    for name in ("optimizer.pt", "scheduler.pt"):
        (out / name).unlink(missing_ok=True)
    run_stock_script(EXPORT_SCRIPT, stock_export_args(out), cwd=tmp_path)
    session = onnxruntime.InferenceSession(str(tmp_path / "stock" / "deployment" / "model.onnx"))
    feeds = {i.name: batch[i.name].numpy() for i in session.get_inputs()}
    assert abs(session.run(None, feeds)[0] - expected).max() < 1e-4

    from obert_modifiers.export import export_deployment

    result = export_deployment(out, tmp_path / "deployment", sequence_length=64, progress=False)
    assert result.max_abs_diff <= result.tolerance
    info = json.loads((result.path / "export.json").read_text())
    assert info["num_layers"] == 2 and info["sparsity"]["overall"] > 0.3
