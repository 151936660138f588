"""``!ZipLMPruningModifier``: structured OBS to speed-up targets through SparseML's manager and the stock
training command, the optimizer after a shrink, reload (never onto random weights), export with
parity and pruned ONNX shapes, export.json / model card facts, the MiniLM recipes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from _helpers import BIN, TRAIN_SCRIPT, offline_env, run, stock_train_args

ROOT = Path(__file__).resolve().parents[1]
SEQ = 32


def _recipe(targets, runtime: str = "flops", extra: str = "", seq: int = SEQ) -> str:
    return f"""
version: 1.1.0
modifiers:
  - !ZipLMPruningModifier
    start_epoch: 0.0
    update_frequency: 1.0
    speedup_targets: {list(targets)}
    num_calibration_samples: 32
    calibration_batch_size: 8
    latency_runtime: {runtime}
    latency_threads: 1
    latency_sequence_length: {seq}
{extra}"""


def _batches(count: int = 6, seq: int = SEQ, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        mask = torch.ones(8, seq, dtype=torch.long)
        mask[:4, seq // 2 :] = 0  # padding: left out of the Hessians
        out.append({"input_ids": torch.randint(1000, 5000, (8, seq), generator=g), "attention_mask": mask})
    return out


def _sampler(batches):
    def builder(kwargs):
        while True:
            for batch in batches:
                yield [], batch, None

    return {"data_loader_builder": builder}


def _model(tmp_path: Path, heads: int = 4, name: str = "m"):
    from transformers import AutoModelForSequenceClassification

    from obert_modifiers.models import save_tiny_bert

    folder = save_tiny_bert(tmp_path / name, num_labels=3, heads=heads)
    return folder, AutoModelForSequenceClassification.from_pretrained(folder, attn_implementation="eager")


def _manager(text: str):
    import sparseml.pytorch.sparsification  # noqa: F401  (registers our tags)
    from sparseml.pytorch.optim import ScheduledModifierManager

    return ScheduledModifierManager.from_yaml(text)


def _train_steps(model, manager, optimizer, batches, steps: range, steps_per_epoch: int) -> None:
    labels = torch.zeros(8, dtype=torch.long)
    for step in steps:
        manager.update(model, optimizer, step / steps_per_epoch, steps_per_epoch)
        model.train()
        loss = model(**batches[step % len(batches)], labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


# ------------------------------------------------------------------------------ through the manager
def test_manager_steps_reach_each_target_and_the_optimizer_holds_the_new_parameters(tmp_path):
    from obert_modifiers.algorithms.shrink import read_structure
    from obert_modifiers.latency import latency_table

    _, model = _model(tmp_path)
    dense = read_structure(model)
    manager = _manager(_recipe([2.0, 3.0]))
    batches = _batches()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    manager.initialize(model, epoch=0.0, grad_sampler=_sampler(batches))
    (modifier,) = [m for m in manager.modifiers if type(m).__name__ == "ZipLMPruningModifier"]
    table = latency_table(model.config, runtime="flops", threads=1, sequence_length=SEQ)
    seen = []
    for epoch in range(2):  # one epoch each: the pruning step, then 2 more training steps
        _train_steps(model, manager, optimizer, batches, range(3 * epoch, 3 * epoch + 3), 3)
        structure = read_structure(model)
        seen.append(table.speedup(structure["heads"], structure["ffn"]))
        live = {id(p) for p in model.parameters()}
        in_optimizer = [p for g in optimizer.param_groups for p in g["params"]]
        assert {id(p) for p in in_optimizer} == live and len(in_optimizer) == len(live)
        for param in in_optimizer:  # Adam moments follow the shapes
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.dim():
                    assert value.shape == param.shape
    assert seen[0] >= 2.0 - 1e-9 and seen[1] >= 3.0 - 1e-9, seen
    assert modifier.steps_done == 2 and modifier.structure == read_structure(model)
    assert read_structure(model) != dense
    assert model.config.obert_ziplm["predicted_speedup"] == pytest.approx(seen[1], rel=1e-3)
    assert "steps_done: 2" in str(manager) and "structure:" in str(manager)


def test_move_optimizer_state_slices_adam_moments_by_the_kept_indices(tmp_path):
    from obert_modifiers.algorithms.shrink import shrink_model
    from obert_modifiers.modifiers.ziplm import move_optimizer_state

    _, model = _model(tmp_path)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(**_batches(1)[0], labels=torch.zeros(8, dtype=torch.long)).loss.backward()
    optimizer.step()
    layer = model.bert.encoder.layer[1]
    old_inter, old_out = layer.intermediate.dense.weight, layer.attention.output.dense.weight
    moments = (optimizer.state[old_inter]["exp_avg"].clone(), optimizer.state[old_out]["exp_avg_sq"].clone())
    keep_ffn, keep_heads = [1, 5, 7, 40], [0, 3]
    slices = shrink_model(model, heads={1: keep_heads}, ffn={1: keep_ffn})
    move_optimizer_state(optimizer, slices)
    new_inter, new_out = layer.intermediate.dense.weight, layer.attention.output.dense.weight
    assert old_inter not in optimizer.state and new_inter in optimizer.state
    assert torch.equal(optimizer.state[new_inter]["exp_avg"], moments[0][keep_ffn])
    cols = torch.tensor([h * 8 + j for h in keep_heads for j in range(8)])
    assert torch.equal(optimizer.state[new_out]["exp_avg_sq"], moments[1][:, cols])
    model(**_batches(1)[0], labels=torch.zeros(8, dtype=torch.long)).loss.backward()
    optimizer.step()  # trains on: shapes agree


def test_calibration_is_seeded_per_step_and_leaves_the_training_rng_alone(tmp_path):
    """Two runs from the same weights choose the same structure; the global RNG is not consumed."""
    structures = []
    for name in ("a", "b"):
        _, model = _model(tmp_path, name=name)
        manager = _manager(_recipe([2.5]))
        batches = _batches()
        torch.manual_seed(123)
        manager.initialize(model, epoch=0.0, grad_sampler=_sampler(batches))
        manager.update(model, None, 0.0, 1)
        after = torch.rand(1)
        torch.manual_seed(123)
        assert torch.equal(after, torch.rand(1))
        structures.append(dict(model.config.obert_structure))
    assert structures[0] == structures[1]


def test_a_misspelled_key_says_did_you_mean():
    from obert_modifiers.params import RecipeKeyError

    message = r"unknown recipe key 'latency_runtim'; did you mean 'latency_runtime'"
    with pytest.raises(RecipeKeyError, match=message):
        _manager(_recipe([2.0]).replace("latency_runtime:", "latency_runtim:"))


@pytest.mark.parametrize(
    "keys, key, expected",
    [
        ("speedup_targets: [3.0, 2.0]", "speedup_targets", "strictly increasing"),
        ("speedup_targets: 1.0", "speedup_targets", "> 1"),
        ("speedup_targets: [2.0, 3.0]\nend_epoch: 0.5", "end_epoch", ">= 1"),
        ("speedup_targets: 2.0\nstructures: [head]", "structures", "'heads'"),
        ("speedup_targets: 2.0\nlatency_runtime: tensorrt", "latency_runtime", "'deepsparse', 'flops'"),
    ],
)
def test_bad_values_name_the_key(keys, key, expected):
    import yaml

    from obert_modifiers.params import RecipeParameterError, ZipLMPruningParams, validate_recipe

    with pytest.raises(RecipeParameterError, match=f"'{key}'.*{expected}"):
        validate_recipe(ZipLMPruningParams, yaml.safe_load(keys))


def test_one_target_over_a_window_rises_step_by_step():
    from obert_modifiers.params import ZipLMPruningParams, validate_recipe

    params = validate_recipe(ZipLMPruningParams, {"speedup_targets": 3.0, "end_epoch": 2.0})
    assert params.step_targets == pytest.approx([5 / 3, 7 / 3, 3.0])


# ------------------------------------------------------------------------------ reload
def _prune_and_save(tmp_path: Path, targets=(2.0,), heads: int = 4):
    from transformers import AutoTokenizer

    from obert_modifiers.algorithms.shrink import save_shrunk_model

    folder, model = _model(tmp_path, heads=heads)
    manager = _manager(_recipe(list(targets)))
    manager.initialize(model, epoch=0.0, grad_sampler=_sampler(_batches()))
    for step in range(len(targets)):
        manager.update(model, None, float(step), 1)
    out = tmp_path / "pruned"
    save_shrunk_model(model, out, tokenizer=AutoTokenizer.from_pretrained(folder))
    manager.save(str(out / "recipe.yaml"))
    model.eval()
    return folder, out, model


def test_saved_model_reloads_with_the_same_outputs_and_never_onto_random_weights(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from obert_modifiers.algorithms.shrink import load_shrunk_model

    dense_dir, out, model = _prune_and_save(tmp_path)
    assert any(width < 64 for width in model.config.obert_structure["ffn"])  # FFN widths changed
    batch = _batches(1)[0]
    with torch.no_grad():
        expected = model(**batch).logits
        plain = AutoModelForSequenceClassification.from_pretrained(out, attn_implementation="eager").eval()
        assert torch.allclose(plain(**batch).logits, expected, atol=1e-5)
        assert torch.allclose(load_shrunk_model(out)(**batch).logits, expected, atol=1e-5)
    # SparseML's recipe reload re-checks the recorded structure: a no-op on the saved model ...
    _manager((out / "recipe.yaml").read_text()).apply_structure(plain, epoch=float("inf"))
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits, expected, atol=1e-5)
    # ... and refuses to re-shape another (dense) model, whose weights would not be the trained ones
    dense = AutoModelForSequenceClassification.from_pretrained(dense_dir)
    message = r"ZipLMPruningModifier: the recipe records heads .* random weights"
    with pytest.raises(RuntimeError, match=message):
        _manager((out / "recipe.yaml").read_text()).apply_structure(dense, epoch=float("inf"))


# ------------------------------------------------------------------------------ export
def _initializer_shapes(onnx_path: Path) -> dict[str, tuple]:
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    return {init.name: tuple(init.dims) for init in graph.initializer}


@pytest.mark.integration
def test_a_layer_with_every_head_removed_exports_and_matches_pytorch(tmp_path):
    from transformers import AutoTokenizer

    from obert_modifiers.algorithms.shrink import save_shrunk_model, shrink_model
    from obert_modifiers.deployment import DeploymentManifest
    from obert_modifiers.export import export_deployment

    folder, model = _model(tmp_path)
    shrink_model(model, heads={0: [], 2: [1, 2]}, ffn={1: list(range(10)), 3: []})
    out = save_shrunk_model(model, tmp_path / "shrunk", tokenizer=AutoTokenizer.from_pretrained(folder))
    result = export_deployment(out, tmp_path / "deployment", sequence_length=SEQ, progress=False)
    assert result.max_abs_diff <= result.tolerance
    manifest = DeploymentManifest.read(tmp_path / "deployment")
    assert manifest.structure.heads == [0, 4, 2, 4] and manifest.structure.ffn == [64, 10, 64, 0]
    shapes = _initializer_shapes(tmp_path / "deployment" / "model.onnx")
    assert (32, 10) in shapes.values() and (10, 32) in shapes.values()  # layer 1's FFN
    assert (16, 32) in shapes.values()  # layer 2's Q/K/V with 2 of 4 heads (head size 8)


@pytest.mark.integration
def test_ort_latency_table_drives_the_search_and_is_read_from_the_cache(tmp_path):
    from obert_modifiers.algorithms.shrink import read_structure
    from obert_modifiers.latency import latency_table, table_cache_path

    _, model = _model(tmp_path)
    cache = tmp_path / "latency"
    table = latency_table(
        model.config, threads=1, sequence_length=SEQ, cache_dir=cache, rounds=1, runs=3, warmup=1,
        progress=False,
    )  # fmt: skip
    path = table_cache_path(table.key, cache)
    stamp = path.stat().st_mtime_ns
    extra = f"    latency_cache_dir: {cache}\n"
    manager = _manager(_recipe([1.5], runtime="onnxruntime", extra=extra))
    manager.initialize(model, epoch=0.0, grad_sampler=_sampler(_batches()))
    manager.update(model, None, 0.0, 1)
    structure = read_structure(model)
    assert table.speedup(structure["heads"], structure["ffn"]) >= 1.5 - 1e-9
    assert model.config.obert_ziplm["unit"] == "ms"
    assert model.config.obert_ziplm["latency_key"]["runtime"] == "onnxruntime"
    assert path.stat().st_mtime_ns == stamp  # read back, not re-measured


def _table_file(path: Path, config, **over) -> Path:
    """A table from "the deployment machine" in the setting of :func:`_recipe`."""
    from obert_modifiers.testing.latency_fixtures import table_file

    return table_file(path, config, **{"threads": 1, "sequence_length": SEQ, **over})


def test_a_table_file_from_the_deployment_machine_drives_the_search_without_timing_here(tmp_path):
    """``latency_table_file``: the table measured where the model will run is used as it is (its CPU and
    runtime version are the deployment machine's); nothing is measured or cached here."""
    from obert_modifiers.algorithms.latency_search import LatencyTable
    from obert_modifiers.algorithms.shrink import read_structure

    _, model = _model(tmp_path)
    path = _table_file(tmp_path / "table.json", model.config)
    cache = tmp_path / "cache"
    extra = f"    latency_table_file: {path}\n    latency_cache_dir: {cache}\n"
    manager = _manager(_recipe([1.5], runtime="onnxruntime", extra=extra))
    manager.initialize(model, epoch=0.0, grad_sampler=_sampler(_batches()))
    manager.update(model, None, 0.0, 1)
    structure = read_structure(model)
    table = LatencyTable.from_json(path.read_text())
    assert table.speedup(structure["heads"], structure["ffn"]) >= 1.5 - 1e-9
    assert model.config.obert_ziplm["latency_key"]["cpu"] == "the deployment CPU"
    assert not cache.exists()  # nothing timed, nothing cached


@pytest.mark.parametrize(
    ("over", "text", "message"),
    [
        ({"threads": 4}, None, r"threads 4 where the recipe's latency_threads is 1"),
        ({"precision": "int8"}, None, r"precision 'int8' where the recipe's latency_precision is 'fp32'"),
        ({"hidden_size": 64, "num_attention_heads": 4}, None, r"hidden_size 64 where the model has 32"),
        ({}, "{not json", r"latency_table_file '.*bad.json': not JSON"),
        ({}, '{"format": "obert-latency-table/1", "key": {}}', r"missing fields \['base', 'attention'"),
    ],
)
def test_a_table_file_that_does_not_fit_is_refused_before_training(tmp_path, over, text, message):
    """A table file of another setting, another shape, or not a table at all is refused when the manager
    initializes, naming the file and what differs (the recipe key, or the model's field)."""
    _, model = _model(tmp_path)
    path = _table_file(tmp_path / "bad.json", model.config, **over)
    if text is not None:
        path.write_text(text)
    from obert_modifiers.latency import LatencyTableError

    manager = _manager(_recipe([1.5], runtime="onnxruntime", extra=f"    latency_table_file: {path}\n"))
    with pytest.raises(LatencyTableError, match=message):
        manager.initialize(model, epoch=0.0, grad_sampler=_sampler(_batches()))


def test_a_missing_table_file_is_named_and_the_depth_is_checked_at_the_step(tmp_path):
    """A missing file fails at initialize; a file for another depth passes initialize (a layer drop may
    come first) and is refused at the step, where the depth is known."""
    from obert_modifiers.latency import LatencyTableError

    _, model = _model(tmp_path)
    missing = tmp_path / "nowhere.json"
    manager = _manager(_recipe([1.5], runtime="onnxruntime", extra=f"    latency_table_file: {missing}\n"))
    with pytest.raises(LatencyTableError, match=r"latency_table_file '.*nowhere.json': no such file"):
        manager.initialize(model, epoch=0.0, grad_sampler=_sampler(_batches()))
    deeper = _table_file(tmp_path / "deep.json", model.config, num_hidden_layers=6)
    manager = _manager(_recipe([1.5], runtime="onnxruntime", extra=f"    latency_table_file: {deeper}\n"))
    manager.initialize(model, epoch=0.0, grad_sampler=_sampler(_batches()))
    with pytest.raises(LatencyTableError, match=r"num_hidden_layers 6 where the model has 4"):
        manager.update(model, None, 0.0, 1)


STOCK_RECIPE = """
version: 1.1.0
modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: 3.0
  - !ZipLMPruningModifier
    start_epoch: 0.0
    update_frequency: 1.0
    speedup_targets: [1.5, 2.0]
    num_calibration_samples: 32
    calibration_batch_size: 8
    latency_runtime: flops
    latency_threads: 1
    latency_sequence_length: 64
  - !OBertDistillationModifier
    hardness: 0.5
    temperature: 2.0
    hidden_weight: 1.0
    start_epoch: 0.0
    end_epoch: 3.0
"""


@pytest.mark.integration
def test_stock_command_prunes_to_the_targets_saves_the_family_reloads_and_exports(
    tiny_bert_dir, bbc_data_dir, tmp_path
):
    import pandas
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from obert_modifiers.algorithms.shrink import load_shrunk_model, read_state_dict
    from obert_modifiers.deployment import DeploymentManifest
    from obert_modifiers.export import export_deployment
    from obert_modifiers.latency import latency_table
    from obert_modifiers.zoo.card import card_facts

    data = tmp_path / "data"
    data.mkdir()
    pandas.read_csv(bbc_data_dir / "train.csv").head(64).to_csv(data / "train.csv", index=False)
    pandas.read_csv(bbc_data_dir / "validation.csv").head(16).to_csv(data / "validation.csv", index=False)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(STOCK_RECIPE)
    out = tmp_path / "model"
    args = stock_train_args(
        tiny_bert_dir, data, out, recipe,
        "--learning_rate", "1e-4", "--save_strategy", "no", "--save_safetensors", "False", "--seed", "1",
        "--distill_teacher", tiny_bert_dir,
        max_seq_length=64,
    )  # fmt: skip
    completed = run([BIN / TRAIN_SCRIPT, *args], env=offline_env(), cwd=tmp_path, timeout=600)
    assert completed.returncode == 0, (completed.stdout + completed.stderr)[-6000:]
    # what each step chose is in the stock command's output, as SparseML's own lines are
    logged = completed.stdout + completed.stderr
    assert "!ZipLMPruningModifier step 1: target 1.5x" in logged
    assert "!ZipLMPruningModifier step 2: target 2x" in logged

    config = json.loads((out / "config.json").read_text())
    structure = config["obert_structure"]
    table = latency_table(AutoConfig.from_pretrained(out), runtime="flops", threads=1, sequence_length=64)
    assert table.speedup(structure["heads"], structure["ffn"]) >= 2.0 - 1e-9
    assert config["obert_ziplm"]["target_speedup"] == 2.0
    assert "steps_done: 2" in (out / "recipe.yaml").read_text()

    # the family: one folder per target, complete (config, weights, tokenizer, recipe)
    for target, name in ((1.5, "ziplm-1.5x"), (2.0, "ziplm-2x")):
        member = out / name
        assert {"config.json", "pytorch_model.bin", "recipe.yaml", "vocab.txt"} <= set(os.listdir(member))
        assert json.loads((member / "config.json").read_text())["obert_ziplm"]["target_speedup"] == target
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left behind
    last, final = read_state_dict(out / "ziplm-2x"), read_state_dict(out)
    assert all(torch.equal(last[k], final[k]) for k in final)

    # reload: transformers (with the compat fix), our call, SparseML's recipe reload -> same outputs
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(["Shares rose.", "The band's album tops the charts."], padding="max_length",
                      max_length=64, truncation=True, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        plain = AutoModelForSequenceClassification.from_pretrained(out, attn_implementation="eager").eval()
        expected = plain(**batch).logits
        assert torch.allclose(load_shrunk_model(out)(**batch).logits, expected, atol=1e-5)

    # export with parity; the ONNX matrices have the pruned shapes; export.json and the card say so
    result = export_deployment(out, tmp_path / "deployment", sequence_length=64, progress=False)
    assert result.max_abs_diff <= result.tolerance
    shapes = _initializer_shapes(tmp_path / "deployment" / "model.onnx")
    onnx_shapes = set(shapes.values())
    for index, width in enumerate(structure["ffn"]):
        if 0 < width < 64:
            assert (32, width) in onnx_shapes or (width, 32) in onnx_shapes, (index, width)
    manifest = DeploymentManifest.read(tmp_path / "deployment")
    assert manifest.structure.heads == structure["heads"] and manifest.structure.ffn == structure["ffn"]
    assert manifest.structure.predicted_speedup >= 2.0 - 1e-3
    assert manifest.structure.latency_key["runtime"] == "flops"
    card = card_facts(tmp_path / "deployment")
    assert card.structure is not None and card.structure.ffn == structure["ffn"]
    from obert_modifiers.zoo.card.render import render_body

    body = render_body(card, {})
    assert "## Structure" in body and "Predicted speed-up" in body

    # a family member exports too (its own recipe re-checks its own structure)
    member = export_deployment(out / "ziplm-1.5x", tmp_path / "deployment-1.5x", sequence_length=64,
                               progress=False)  # fmt: skip
    assert member.max_abs_diff <= member.tolerance


@pytest.mark.parametrize(
    "structures, message",
    [
        ("[heads, ffn_neurons]", r"attention maps of pair \d differ in shape.*equal head counts"),
        ("[attention_blocks]", r"student layer\(s\) \[.*\] have no attention block left.*weight: 0"),
    ],
)
def test_attention_distillation_after_heads_changed_is_refused_naming_the_layer(
    tmp_path, structures, message
):
    """Logits + hidden states distil on; attention maps stop with a message naming the layer."""
    import copy

    _, model = _model(tmp_path)
    teacher = copy.deepcopy(model).eval()
    distil = (
        "  - !OBertDistillationModifier\n    hardness: 1.0\n    hidden_weight: 1.0\n"
        "    attention_weight: 1.0\n"
    )
    extra = f"    structures: {structures}\n" + distil
    manager = _manager(_recipe([2.0], extra=extra))
    batches = _batches()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    manager.initialize(model, epoch=0.0, grad_sampler=_sampler(batches), distillation_teacher=teacher)
    manager.update(model, optimizer, 0.0, 4)
    labels = torch.zeros(8, dtype=torch.long)
    model.train()
    with pytest.raises((RuntimeError, ValueError), match=message):
        for step in range(2):  # the layer hooks attach on the first step; maps are compared from the next
            inputs = batches[step]
            outputs = model(**inputs, labels=labels)
            manager.loss_update(
                outputs.loss, model, optimizer, step / 4, 4, student_outputs=outputs, student_inputs=inputs
            )


# ------------------------------------------------------------------------------ recipes
@pytest.mark.parametrize("name", ["minilm_ziplm.yaml", "minilm_ziplm_qat.yaml"])
def test_minilm_ziplm_recipes_pass_obert_recipe_check(name):
    import typer
    from typer.testing import CliRunner

    from obert_modifiers import commands

    app = typer.Typer()
    commands.register(app)
    result = CliRunner().invoke(app, ["recipe", "check", str(ROOT / "recipes" / name), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    tags = {m["tag"] for m in summary["modifiers"]}
    assert {"ZipLMPruningModifier", "OBertDistillationModifier"} <= tags
    assert ("OBertQuantizationModifier" in tags) == name.endswith("_qat.yaml")
    (ziplm,) = [m for m in summary["modifiers"] if m["tag"] == "ZipLMPruningModifier"]
    assert "speedup_targets" in json.dumps(ziplm)


@pytest.mark.integration
def test_layer_drop_before_and_qat_after_compose_and_the_int8_model_exports(tmp_path):
    """LayerDrop (4 -> 3 layers) first, ZipLM on the 3 layers left (the speed-up is over the 3-layer
    dense model), QAT after it; the saved recipe reloads the structure and the INT8 export matches."""
    from transformers import AutoTokenizer

    from obert_modifiers.algorithms.shrink import read_structure
    from obert_modifiers.export import export_deployment
    from obert_modifiers.latency import latency_table

    folder, model = _model(tmp_path)
    others = "  - !LayerDropModifier\n    keep: 3\n  - !OBertQuantizationModifier\n    start_epoch: 1.0\n"
    manager = _manager(_recipe([3.0]) + others)
    manager.apply_structure(model, epoch=0.0)
    batches = _batches()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    manager.initialize(model, epoch=0.0, grad_sampler=_sampler(batches))
    _train_steps(model, manager, optimizer, batches, range(6), 3)
    structure = read_structure(model)
    assert len(structure["heads"]) == 3 and model.config.obert_layer_map == [0, 1, 2]
    table = latency_table(model.config, runtime="flops", threads=1, sequence_length=SEQ)
    assert table.speedup(structure["heads"], structure["ffn"]) >= 3.0 - 1e-9
    assert any("Quant" in type(m).__name__ for m in model.modules())  # QAT is on
    out = tmp_path / "out"
    model.save_pretrained(out, safe_serialization=False)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    manager.save(str(out / "recipe.yaml"))
    result = export_deployment(out, tmp_path / "deployment", sequence_length=SEQ, progress=False)
    assert result.quantized and result.max_abs_diff <= result.tolerance


def test_the_ziplm_stage_is_the_same_in_both_recipes():
    import yaml

    fp32, qat = (
        yaml.load((ROOT / "recipes" / name).read_text(), Loader=yaml.BaseLoader)
        for name in ("minilm_ziplm.yaml", "minilm_ziplm_qat.yaml")
    )
    assert fp32["ziplm"] == qat["ziplm"] and "qat" in qat and "qat" not in fp32
    assert fp32["latency_precision"] == "fp32" and qat["latency_precision"] == "int8"


@pytest.mark.integration
def test_minilm_ziplm_qat_recipe_runs_with_the_stock_command_and_exports(
    tiny_bert_dir, bbc_data_dir, tmp_path
):
    """The shipped staged recipe (ziplm + qat) with tiny settings from --recipe_args: both targets
    saved, the stages recorded, the INT8 model exports with parity."""
    import pandas

    from obert_modifiers.export import export_deployment

    data = tmp_path / "data"
    data.mkdir()
    pandas.read_csv(bbc_data_dir / "train.csv").head(64).to_csv(data / "train.csv", index=False)
    pandas.read_csv(bbc_data_dir / "validation.csv").head(16).to_csv(data / "validation.csv", index=False)
    recipe_args = {
        "speedup_targets": [1.5, 2.0], "num_targets": 2, "update_frequency": 1.0, "recovery_epochs": 1.0,
        "qat_epochs": 1.0, "num_calibration_samples": 16, "calibration_batch_size": 8,
        "latency_runtime": "flops", "latency_sequence_length": 64,
    }  # fmt: skip
    out = tmp_path / "model"
    args = stock_train_args(
        tiny_bert_dir, data, out, ROOT / "recipes" / "minilm_ziplm_qat.yaml",
        "--recipe_args", json.dumps(recipe_args), "--save_strategy", "no", "--save_safetensors", "False",
        "--seed", "1", "--distill_teacher", tiny_bert_dir,
        max_seq_length=64,
    )  # fmt: skip
    completed = run([BIN / TRAIN_SCRIPT, *args], env=offline_env(), cwd=tmp_path, timeout=600)
    assert completed.returncode == 0, (completed.stdout + completed.stderr)[-6000:]
    assert (out / "ziplm-1.5x" / "pytorch_model.bin").is_file()
    assert (out / "ziplm-2x" / "recipe.yaml").is_file()
    saved = (out / "recipe.yaml").read_text()
    assert "!ZipLMPruningModifier" in saved and "steps_done: 2" in saved
    assert "!OBertQuantizationModifier" in saved
    result = export_deployment(out, tmp_path / "deployment", sequence_length=64, progress=False)
    assert result.quantized and result.max_abs_diff <= result.tolerance
    info = json.loads((tmp_path / "deployment" / "export.json").read_text())
    assert info["structure"]["target_speedup"] == 2.0 and info["structure"]["predicted_speedup"] >= 2.0 - 1e-3


# ------------------------------------------------------------------------------ the two ablations
def _one_step(tmp_path, extra: str, name: str):
    from obert_modifiers.algorithms.shrink import read_structure

    _, model = _model(tmp_path, name=name)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    manager = _manager(_recipe([2.0], extra=extra))
    manager.initialize(model, epoch=0.0, grad_sampler=_sampler(_batches()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    manager.update(model, optimizer, 0.0, 3)
    return model, before, read_structure(model)


def test_uniform_allocation_keeps_the_same_width_in_every_layer(tmp_path):
    from obert_modifiers.algorithms.shrink import read_structure

    dense = read_structure(_model(tmp_path, name="dense")[1])
    model, _, uniform = _one_step(tmp_path, "    allocation: uniform\n", "uniform")
    assert len(set(uniform["heads"])) == 1 and len(set(uniform["ffn"])) == 1, uniform
    assert uniform != dense  # it pruned, to the target
    assert model.config.obert_ziplm["predicted_speedup"] >= 2.0 - 1e-9


def test_without_the_weight_update_the_kept_weights_are_the_old_ones_sliced(tmp_path):
    """weight_update: false keeps every surviving weight as it was; the default changes the output
    projections (the OBS update compensates for what was removed)."""

    def unchanged_outputs(model, before) -> tuple[int, int]:
        same = changed = 0
        for name, param in model.named_parameters():
            if not name.endswith(("attention.output.dense.weight", ".output.dense.weight")):
                continue
            old = before[name]
            rows = old.shape[0]
            # the kept input columns of the projection: match each new column to an old one
            cols = [
                next((j for j in range(old.shape[1]) if torch.equal(old[:, j], param[:, i])), None)
                for i in range(param.shape[1])
            ]
            if param.shape[0] == rows and all(c is not None for c in cols):
                same += 1
            else:
                changed += 1
        return same, changed

    model, before, _ = _one_step(tmp_path, "    weight_update: false\n", "plain")
    same, changed = unchanged_outputs(model, before)
    assert changed == 0 and same > 0
    model, before, _ = _one_step(tmp_path, "", "updated")
    same, changed = unchanged_outputs(model, before)
    assert changed > 0
