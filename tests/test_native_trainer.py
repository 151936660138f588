"""The native Trainer adapter (``obert_modifiers.native.RecipeTrainer``) on transformers 5, no SparseML.

Tiny random encoders (hidden 32) on 32-64 random sequences: each training takes about a second.
Epoch arithmetic of every test: 32 samples at batch 8 -> SparseML's steps_per_epoch = 4.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

transformers = pytest.importorskip("transformers", reason="needs transformers (the [modern] extra)")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the native adapter targets transformers 5 (the modern venv)", allow_module_level=True)

import torch  # noqa: E402
from _native import StepRecorder, TinyData, encoder_weights, sparsity, tiny_model, trainer  # noqa: E402

from obert_modifiers.algorithms.quantization import QuantizedLinear, is_quantized, observers_frozen  # noqa: E402
from obert_modifiers.native import RecipeRunError, load_model, load_recipe, lr_at  # noqa: E402
from obert_modifiers.native.lifecycle import sparseml_steps_per_epoch  # noqa: E402

PRUNE_PARAMS = (
    "re:bert.encoder.layer.*.(attention.self.(query|key|value)|attention.output.dense|intermediate.dense|"
    "output.dense).weight"
)

PRUNE = f"""
modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: 4.0
  - !OBertPruningModifier
    params: ["{PRUNE_PARAMS}"]
    init_sparsity: 0.3
    final_sparsity: 0.8
    start_epoch: 1.0
    end_epoch: 3.0
    update_frequency: 1.0
    num_grads: 8
    fisher_block_size: 16
    grad_sampler_kwargs:
      batch_size: 4
"""


def test_import_stays_light():
    """``import obert_modifiers.native`` (what ``obert recipe check`` uses) does not import torch."""
    code = "import sys, obert_modifiers.native as n; n.load_recipe; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_steps_per_epoch_is_sparsemls():
    assert sparseml_steps_per_epoch(32, 8, 1, 1) == 4
    assert sparseml_steps_per_epoch(33, 8, 1, 1) == 5
    assert sparseml_steps_per_epoch(32, 4, 2, 2) == 2  # 2 ranks, 2 accumulation steps
    assert sparseml_steps_per_epoch(3, 8, 1, 1) == 1


def test_obert_prunes_to_the_scheduled_targets_at_the_scheduled_steps(tmp_path):
    run = trainer(PRUNE, tmp_path, weight_decay=0.1, learning_rate=1e-3)
    weights = encoder_weights(run.model)
    recorder = StepRecorder(lambda: sparsity(weights.values()))
    run.add_callback(recorder)
    assert run.args.num_train_epochs == 4  # from the recipe's last epoch
    run.train()
    (pruning,) = [m for m in run.recipe_runner.modifiers if m.tag == "OBertPruningModifier"]
    # cubic 0.3 -> 0.8 over epochs [1, 3]: epoch 2 -> 0.3 + 0.5 * (1 - 0.5 ** 3) = 0.7375
    assert [(h["step"], h["epoch"]) for h in pruning.history] == [(4, 1.0), (8, 2.0), (12, 3.0)]
    assert [h["target"] for h in pruning.history] == pytest.approx([0.3, 0.7375, 0.8])
    total = sum(w.numel() for w in weights.values())
    for h in pruning.history:
        assert abs(h["achieved"] - h["target"]) <= 1 / total
    # after every optimizer step the zeros are still there (AdamW with weight decay and a large rate
    # would move them otherwise): sparsity never drops below the last target reached
    # (global_step n is after n optimizer steps: the step at epoch 1.0 is the 5th)
    by_step = dict(recorder.values)
    assert len(by_step) == 16 and by_step[4] == 0.0
    assert by_step[5] == pytest.approx(0.3, abs=1e-3) and by_step[8] == by_step[6] == by_step[5]
    assert by_step[9] == pytest.approx(0.7375, abs=1e-3) and by_step[12] == by_step[9]
    assert all(by_step[s] == pytest.approx(0.8, abs=1e-3) for s in range(13, 17))
    # the masks are the zeros
    for name, mask in pruning.masks_by_name().items():
        assert torch.equal(mask, weights[name] != 0), name
    # and the trainer's log shows the recipe's epoch and the latest pruning step
    logged = [e for e in run.state.log_history if "loss" in e]
    assert [e["recipe_epoch"] for e in logged][:5] == [0.25, 0.5, 0.75, 1.0, 1.25]
    assert "obert_target_sparsity" not in logged[3] and logged[4]["obert_target_sparsity"] == 0.3
    assert logged[-1]["obert_achieved_sparsity"] == pytest.approx(0.8, abs=1e-3)


def test_masks_are_needed_after_optimizer_steps(tmp_path):
    """The control for the test above: without the mask step AdamW moves pruned weights off zero."""
    run = trainer(PRUNE, tmp_path, weight_decay=0.1, learning_rate=1e-3)
    (pruning,) = [m for m in run.recipe_runner.modifiers if m.tag == "OBertPruningModifier"]
    pruning.post_step = lambda ctx: None
    pruning.pre_step = lambda ctx: None
    weights = encoder_weights(run.model)
    recorder = StepRecorder(lambda: sparsity(weights.values()))
    run.add_callback(recorder)
    run.train()
    by_step = dict(recorder.values)
    # the optimizer step right after each pruning step already moves the pruned weights off zero
    assert max(by_step[9], by_step[13], by_step[16]) < 0.1


def test_a_pattern_matching_nothing_fails_naming_it(tmp_path):
    recipe = PRUNE.replace(PRUNE_PARAMS, "re:encoder.layer.*.nothing.weight")
    with pytest.raises(
        RecipeRunError, match=r"'params': 're:encoder.layer.\*.nothing.weight' matches no parameter"
    ):
        trainer(recipe, tmp_path)


def test_gradient_accumulation_counts_optimizer_steps_as_sparseml(tmp_path):
    """32 samples, batch 4, 2 accumulation steps: 4 optimizer steps per epoch, as SparseML computes."""
    run = trainer(PRUNE, tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    run.train()
    assert run.recipe_runner.steps_per_epoch == 4
    (pruning,) = [m for m in run.recipe_runner.modifiers if m.tag == "OBertPruningModifier"]
    assert [h["step"] for h in pruning.history] == [4, 8, 12]
    assert run.state.global_step == 16


QAT = """
modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: 3.0
  - !OBertQuantizationModifier
    start_epoch: 1.0
    freeze_observer_epoch: 2.0
"""


def test_qat_starts_and_freezes_observers_at_the_recipe_epochs(tmp_path):
    run = trainer(QAT, tmp_path)
    recorder = StepRecorder(lambda: (is_quantized(run.model), observers_frozen(run.model)))
    run.add_callback(recorder)
    assert not is_quantized(run.model)
    run.train()
    states = dict(recorder.values)
    # QAT starts in the update of optimizer step 4 (epoch 1.0); observers freeze at step 8 (epoch 2.0)
    assert states[4] == (False, False) and states[5] == (True, False)
    assert states[8] == (True, False) and states[9] == (True, True)
    assert states[12] == (True, True)
    layer = run.model.bert.encoder.layer[0]
    assert isinstance(layer.attention.self.query, QuantizedLinear)
    assert hasattr(layer.attention.self, "attention_scores_matmul")  # attention matmuls through the registry
    assert run.model.config._attn_implementation == "obert_qat"
    assert not isinstance(run.model.classifier, QuantizedLinear)  # exclude: [classifier]


def test_qat_at_epoch_0_keeps_pruned_weights_at_zero(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        for weight in encoder_weights(model).values():
            weight[:, ::2] = 0.0
    run = trainer(
        QAT.replace("start_epoch: 1.0", "start_epoch: 0.0"), tmp_path, model=model, learning_rate=1e-3
    )
    assert is_quantized(run.model)  # applied before the optimizer exists
    run.train()
    assert sparsity(encoder_weights(run.model).values()) == pytest.approx(0.5)


DROP = """
modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: 1.0
  - !LayerDropModifier
    keep: 2
    num_layers: 4
"""


def test_layer_drop_cuts_layers_before_the_optimizer_exists(tmp_path):
    run = trainer(DROP, tmp_path)
    assert run.model.config.num_hidden_layers == 2 and len(run.model.bert.encoder.layer) == 2
    assert run.model.config.obert_layer_map == [0, 2]
    run.train()
    optimized = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in run.model.parameters()}
    run.save_model(tmp_path / "saved")
    plan = load_recipe(tmp_path / "saved" / "recipe.yaml")
    (drop,) = [m for m in plan.modifiers if m.tag == "LayerDropModifier"]
    assert (
        drop.params.layers == [1, 3] and drop.params.num_layers == 4
    )  # recorded, as SparseML's adapter does
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")
    assert len(reloaded.bert.encoder.layer) == 2


DISTIL = """
modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: 2.0
  - !OBertDistillationModifier
    hardness: 1.0
    temperature: 2.0
    start_epoch: 0.0
    end_epoch: 1.0
"""


def test_distillation_loss_replaces_the_task_loss_while_active(tmp_path):
    """hardness 1.0 and teacher 'self' (no dropout): the first step's loss is KL(student || itself) = 0;
    after end_epoch the task loss (about ln 2) is back."""
    run = trainer(DISTIL, tmp_path, model=tiny_model(dropout=0.0), teacher="self")
    run.train()
    losses = [entry["loss"] for entry in run.state.log_history if "loss" in entry]
    assert len(losses) == 8
    assert losses[0] == pytest.approx(0.0, abs=1e-6)
    assert all(loss < 0.05 for loss in losses[:4])
    assert all(loss > 0.3 for loss in losses[4:])


def test_distillation_with_a_teacher_folder_and_hidden_states(tmp_path):
    teacher = tiny_model(layers=4, seed=1)
    teacher.save_pretrained(tmp_path / "teacher")
    recipe = DISTIL.replace("hardness: 1.0", "hardness: 0.5\n    hidden_weight: 1.0")
    run = trainer(recipe, tmp_path / "out", teacher=str(tmp_path / "teacher"))
    (kd,) = [m for m in run.recipe_runner.modifiers if m.tag == "OBertDistillationModifier"]
    run.train()
    assert kd.pairs == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert all(not p.requires_grad for p in run.teacher.parameters())
    assert not any("teacher" in k for k in run.model.state_dict())


LR = """
modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: 4.0
  - !LearningRateFunctionModifier
    lr_func: linear
    init_lr: 1.0e-3
    final_lr: 1.0e-4
    start_epoch: 0.0
    end_epoch: 1.0
  - !LearningRateFunctionModifier
    lr_func: cyclic_linear
    cycle_epochs: 1.0
    init_lr: 5.0e-4
    final_lr: 5.0e-5
    start_epoch: 2.0
    end_epoch: 4.0
"""


def test_the_recipes_learning_rate_is_the_rate_of_every_step(tmp_path):
    run = trainer(LR, tmp_path, learning_rate=7e-5)
    run.train()
    plan = run.recipe_plan
    first, second = [m.params for m in plan.modifiers if m.tag == "LearningRateFunctionModifier"]
    trace = run.recipe_runner.lr_trace
    assert len(trace) == 16
    for step, epoch, rate in trace:
        assert epoch == step / 4
        if epoch <= 1.0:
            expected = lr_at(first, epoch, 4)
        elif epoch < 2.0:
            expected = lr_at(first, 1.0, 4)  # the rate the first modifier left at its end
        else:
            expected = lr_at(second, epoch, 4)
        assert rate == expected, (step, epoch)
    # the trainer's own scheduler (linear decay from 7e-5) did not touch it
    assert trace[5][2] == lr_at(first, 1.0, 4) == pytest.approx(1e-4)
    logged = [e["learning_rate"] for e in run.state.log_history if "learning_rate" in e]
    assert logged == [r for _, _, r in trace]  # the trainer logs the rate each step used


STAGED = "recipes/minilm_3l_drop_prune_qat.yaml"
STAGED_ARGS = {
    "num_layers": 6,
    "keep_layers": 3,
    "drop_epochs": 1,
    "prune_epochs": 2,
    "recovery_epochs": 1,
    "qat_epochs": 1,
    "num_grads": 8,
    "fisher_block_size": 16,
    "grad_batch_size": 4,
}


def test_staged_recipe_end_to_end_then_save_and_reload(tmp_path):
    """The repo's drop -> prune -> recovery -> QAT recipe with distillation from the starting model."""
    run = trainer(STAGED, tmp_path, model=tiny_model(layers=6), recipe_args=STAGED_ARGS, teacher="self")
    assert run.model.config.num_hidden_layers == 3
    run.train()
    runner = run.recipe_runner
    (pruning,) = [m for m in runner.modifiers if m.tag == "OBertPruningModifier"]
    assert [(h["epoch"], round(h["target"], 4)) for h in pruning.history] == [
        (1.0, 0.3),
        (2.0, 0.7375),
        (3.0, 0.8),
    ]
    weights = encoder_weights(run.model)
    assert sparsity(weights.values()) == pytest.approx(0.8, abs=1e-3)
    assert is_quantized(run.model) and observers_frozen(run.model)
    run.save_model(tmp_path / "saved")
    saved = load_recipe(tmp_path / "saved" / "recipe.yaml")
    assert [m.tag for m in saved.modifiers] == [m.tag for m in run.recipe_plan.modifiers]
    reloaded = load_model(tmp_path / "saved")
    data = TinyData(8, seed=3)
    batch = {"input_ids": data.ids, "attention_mask": data.mask}
    run.model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, run.model(**batch).logits)
    assert reloaded.config.num_hidden_layers == 3 and observers_frozen(reloaded)


def test_resume_from_a_checkpoint_ends_as_the_uninterrupted_run(tmp_path):
    """A checkpoint after two pruning steps (step 10 of 20, epoch 2.5 of 5); the resumed run rebuilds
    the dropped layers and masks, prunes at epoch 3, starts QAT at 4, and ends bit-identical."""
    args = {"save_strategy": "steps", "save_steps": 10}
    full = trainer(
        STAGED,
        tmp_path / "full",
        model=tiny_model(layers=6),
        recipe_args=STAGED_ARGS,
        teacher="self",
        data=TinyData(32),
        **args,
    )
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-10"
    assert (checkpoint / "obert_native_state.pt").is_file() and (checkpoint / "recipe.yaml").is_file()
    # another starting model: only the checkpoint (weights, masks, state) can make the runs agree;
    # the teacher is the first run's ('self': its starting model)
    resumed = trainer(
        STAGED,
        tmp_path / "resumed",
        model=tiny_model(layers=6, seed=7),
        recipe_args=STAGED_ARGS,
        teacher=tiny_model(layers=6),
        data=TinyData(32),
        **args,
    )
    steps = StepRecorder(lambda: None)
    resumed.add_callback(steps)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert [s for s, _ in steps.values] == list(range(11, 21))  # the last ten optimizer steps only
    (pruning,) = [m for m in resumed.recipe_runner.modifiers if m.tag == "OBertPruningModifier"]
    assert [h["epoch"] for h in pruning.history] == [1.0, 2.0, 3.0]
    assert resumed.recipe_runner.lr_trace == full.recipe_runner.lr_trace
    final, again = full.model.state_dict(), resumed.model.state_dict()
    assert final.keys() == again.keys()
    different = [k for k in final if not torch.equal(final[k], again[k])]
    assert different == []


CONSTANT = f"""
modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: 2.0
  - !SetLearningRateModifier
    learning_rate: 2.0e-3
    start_epoch: 1.0
  - !ConstantPruningModifier
    params: ["{PRUNE_PARAMS}"]
    start_epoch: 0.0
"""


def test_constant_pruning_keeps_a_sparse_model_sparse_and_set_lr_sets_once(tmp_path):
    """Sparse transfer: the zeros of a pruned model stay zero (AdamW would move them); the rate is the
    trainer's until epoch 1, then the recipe's."""
    model = tiny_model()
    weights = encoder_weights(model)
    with torch.no_grad():
        for weight in weights.values():
            weight[::2] = 0.0
    run = trainer(CONSTANT, tmp_path, model=model, learning_rate=1e-3, weight_decay=0.1)
    run.train()
    assert sparsity(weights.values()) == pytest.approx(0.5)
    rates = [rate for _, _, rate in run.recipe_runner.lr_trace]
    assert rates == [1e-3] * 4 + [2e-3] * 4


def test_importance_layer_drop_chooses_on_training_batches(tmp_path):
    """strategy: importance scores the layers on training batches before the optimizer exists; a layer
    made an identity (zero output projections) scores 0 and is dropped first."""
    model = tiny_model(dropout=0.0)
    with torch.no_grad():
        for name in ("attention.output.dense", "output.dense"):
            layer = model.bert.encoder.layer[1].get_submodule(name)
            layer.weight.zero_(), layer.bias.zero_()
    recipe = DROP.replace("keep: 2", "keep: 3\n    strategy: importance\n    importance_batches: 2")
    run = trainer(recipe, tmp_path, model=model)
    assert run.model.config.obert_layer_map == [0, 2, 3]
    (drop,) = [m for m in run.recipe_runner.modifiers if m.tag == "LayerDropModifier"]
    assert drop.params.layers == [1]


def test_ziplm_on_a_family_it_cannot_shrink_fails_before_training(tmp_path):
    ziplm = """
modifiers:
  - !ZipLMPruningModifier
    speedup_targets: 1.5
"""
    message = r"!ZipLMPruningModifier: encoder layer 0 \(TransformerBlock\) is not BERT-like"
    with pytest.raises(RecipeRunError, match=message):
        trainer(ziplm, tmp_path, model=tiny_model("distilbert"))


def test_attention_distillation_reads_the_models_attention_maps(tmp_path):
    """hardness 0 and attention_weight 1: with the starting model as teacher (no dropout) the first
    step's attention term is KL(p || p) = 0, so the loss is the task loss of a run without it; with
    another teacher it is larger. Student and teacher compute attention with obert_qat (eager)."""
    recipe = DISTIL.replace("hardness: 1.0", "hardness: 0.0\n    attention_weight: 1.0")
    other = tiny_model(dropout=0.0, seed=5)
    with torch.no_grad():  # peaked attention maps, far from the student's nearly uniform ones
        for layer in other.bert.encoder.layer:
            layer.attention.self.query.weight.mul_(30.0)
    first = {}
    for name, teacher in (("self", "self"), ("other", other), ("none", None)):
        run = trainer(recipe, tmp_path / name, model=tiny_model(dropout=0.0), teacher=teacher, max_steps=1)
        run.train()
        first[name] = run.state.log_history[0]["loss"]
        if teacher is not None:
            assert run.model.config._attn_implementation == "obert_qat"
            assert run.teacher.config._attn_implementation == "obert_qat"
    assert first["self"] == pytest.approx(first["none"], abs=1e-6)
    assert first["other"] > first["none"] + 0.05


def test_hidden_distillation_with_projections_checkpoints_and_resumes(tmp_path):
    """A teacher 48 wide for a student 32 wide: learned projections train with their own optimizer,
    so the trainer's optimizer, scheduler and checkpoints hold the model's parameters only."""
    torch.manual_seed(1)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=48, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=2,
    )  # fmt: skip
    teacher = transformers.BertForSequenceClassification(config)
    recipe = DISTIL.replace("hardness: 1.0", "hardness: 0.5\n    hidden_weight: 1.0").replace(
        "end_epoch: 1.0", "end_epoch: 2.0"
    )
    run = trainer(recipe, tmp_path / "a", teacher=teacher, save_strategy="steps", save_steps=4)
    run.train()
    (kd,) = [m for m in run.recipe_runner.modifiers if m.tag == "OBertDistillationModifier"]
    assert set(kd.projections) == {"0", "1", "2", "3"}
    assert len(run.optimizer.param_groups) == 2  # the trainer's two (decay, no decay)
    trained = kd.projections["0"].weight
    assert kd.projection_optimizer.state[trained]["step"] == 8  # stepped with every optimizer step
    saved = torch.load(tmp_path / "a" / "checkpoint-4" / "optimizer.pt", weights_only=False)
    assert len(saved["param_groups"]) == 2
    resumed = trainer(recipe, tmp_path / "b", teacher=teacher, save_strategy="steps", save_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    assert resumed.state.global_step == 8


def test_training_again_from_a_saved_folder_composes_the_recipes(tmp_path):
    """QAT first, then pruning from the saved QAT folder: the second folder's recipe.yaml holds both
    stages (the new one's epochs after the first's, as SparseML's compose_staged writes them) and
    reloads with the QAT structure."""
    first = trainer(QAT.replace("start_epoch: 1.0", "start_epoch: 0.0"), tmp_path / "a")
    first.train()
    first.save_model(tmp_path / "qat")
    model = load_model(tmp_path / "qat", transformers.BertForSequenceClassification)
    second = trainer(PRUNE, tmp_path / "b", model=model, model_recipe=tmp_path / "qat" / "recipe.yaml")
    second.train()
    second.save_model(tmp_path / "pruned")
    plan = load_recipe(tmp_path / "pruned" / "recipe.yaml")
    assert list(plan.stages) == ["stage_0", "stage_1"]
    (pruning,) = [m for m in plan.modifiers if m.tag == "OBertPruningModifier"]
    assert (pruning.start_epoch, pruning.end_epoch) == (
        1.0 + 3,
        3.0 + 3,
    )  # moved past the QAT recipe's 3 epochs
    reloaded = load_model(tmp_path / "pruned")
    data = TinyData(8, seed=3)
    batch = {"input_ids": data.ids, "attention_mask": data.mask}
    second.model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, second.model(**batch).logits)
