"""!OBertDistillationModifier: the KD loss against a hand computation and SparseML's own formula,
hardness/temperature semantics, the teacher (frozen, eval, never saved, 'self' = the model before any
modifier), hidden-state / attention distillation with learned projections, and recipe validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from obert_modifiers.algorithms import distillation as algo

STUDENT_LOGITS = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3], [-3.0, 4.0, 1.0]])
TEACHER_LOGITS = torch.tensor([[1.5, 0.0, -0.5], [1.0, -1.0, 0.0], [-2.0, 2.5, 2.0]])


def hand_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> float:
    """KL(teacher || student) of temperature-softened distributions, times T^2, mean over rows,
    written out with plain exp/log sums."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        s_exp = [math.exp(v / temperature) for v in s_row]
        t_exp = [math.exp(v / temperature) for v in t_row]
        p_s = [v / sum(s_exp) for v in s_exp]
        p_t = [v / sum(t_exp) for v in t_exp]
        total += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s, strict=True))
    return total / len(student) * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.5])
def test_kd_loss_equals_hand_computation_and_sparseml(temperature):
    from sparseml.pytorch.sparsification.distillation.modifier_distillation_base import kldiv_loss

    ours = algo.logit_distillation_loss(
        {"logits": STUDENT_LOGITS}, {"logits": TEACHER_LOGITS}, temperature, ["logits"]
    )
    assert float(ours) == pytest.approx(hand_kd(STUDENT_LOGITS, TEACHER_LOGITS, temperature), rel=1e-5)
    reference = kldiv_loss({"logits": STUDENT_LOGITS}, {"logits": TEACHER_LOGITS}, temperature, ["logits"])
    assert float(ours) == pytest.approx(float(reference), rel=1e-6)


def test_kd_loss_qa_keys_average_start_and_end():
    start_s, start_t = STUDENT_LOGITS, TEACHER_LOGITS
    end_s, end_t = TEACHER_LOGITS * 0.5, STUDENT_LOGITS
    loss = algo.logit_distillation_loss(
        {"start_logits": start_s, "end_logits": end_s},
        {"start_logits": start_t, "end_logits": end_t},
        2.0,
        ["start_logits", "end_logits"],
    )
    expected = (hand_kd(start_s, start_t, 2.0) + hand_kd(end_s, end_t, 2.0)) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(KeyError, match="logits"):
        algo.logit_distillation_loss({"start_logits": start_s}, {"start_logits": start_t}, 2.0, ["logits"])


def test_kd_loss_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="same shape"):
        algo.kl_div_temperature(STUDENT_LOGITS, TEACHER_LOGITS[:, :2], 2.0)


def test_layer_map_resolution():
    assert algo.resolve_layer_map(3, 6, recorded_map=[0, 2, 4]) == [0, 2, 4]
    assert algo.resolve_layer_map(3, 6, layer_map=[1, 3, 5], recorded_map=[0, 2, 4]) == [1, 3, 5]
    assert algo.resolve_layer_map(4, 4) == [0, 1, 2, 3]
    assert algo.resolve_layer_map(3, 12) == [3, 7, 11]
    with pytest.raises(ValueError, match="teacher has 6 layers"):
        algo.resolve_layer_map(2, 6, layer_map=[0, 6])
    with pytest.raises(ValueError, match="3 layers"):
        algo.resolve_layer_map(3, 6, layer_map=[0, 1])


def test_hidden_and_attention_losses_are_zero_for_identical_inputs():
    hidden = [torch.randn(2, 5, 8) for _ in range(2)]
    attention = [torch.softmax(torch.randn(2, 2, 5, 5), dim=-1) for _ in range(2)]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert float(algo.hidden_state_loss(hidden, hidden, attention_mask=mask)) == 0.0
    assert abs(float(algo.attention_loss(attention, attention, mask))) < 1e-6
    shifted = [h + 1.0 for h in hidden]
    assert float(algo.hidden_state_loss(shifted, hidden, attention_mask=mask)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="projection"):
        algo.hidden_state_loss([torch.randn(2, 5, 4)], [torch.randn(2, 5, 8)])


# ---------------------------------------------------------------------------- the modifier
def _recipe(**keys) -> str:
    lines = "".join(f"    {key}: {value}\n" for key, value in keys.items())
    return f"modifiers:\n  - !OBertDistillationModifier\n{lines}"


def _manager(recipe: str):
    from sparseml.pytorch.optim import ScheduledModifierManager

    return ScheduledModifierManager.from_yaml(recipe)


def _load(folder):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(folder)


def _batch(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 5000, (4, 12), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 4, 2])}


def _teacher(tiny_bert_dir):
    teacher = _load(tiny_bert_dir)
    with torch.no_grad():  # a teacher that differs from the student
        for parameter in teacher.classifier.parameters():
            parameter.add_(0.5)
    return teacher


@pytest.mark.parametrize(("hardness", "temperature"), [(0.0, 2.0), (0.5, 2.0), (1.0, 1.0), (0.3, 5.5)])
def test_modifier_loss_matches_hardness_temperature_formula(tiny_bert_dir, hardness, temperature):
    student = _load(tiny_bert_dir)
    teacher = _teacher(tiny_bert_dir)
    manager = _manager(_recipe(hardness=hardness, temperature=temperature, distill_output_keys="[logits]"))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    manager.initialize(student, epoch=0.0, distillation_teacher=teacher)
    batch = _batch()
    outputs = student(**batch)
    total = manager.loss_update(
        outputs.loss, student, optimizer, 0.0, 10, student_outputs=outputs, student_inputs=batch
    )
    with torch.no_grad():
        teacher_logits = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
    kd = hand_kd(outputs.logits.detach(), teacher_logits, temperature)
    expected = (1 - hardness) * float(outputs.loss) + hardness * kd
    assert float(total) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    if hardness == 0.0:
        assert float(total) == pytest.approx(float(outputs.loss), rel=1e-7)
    manager.finalize(student)


def test_teacher_is_frozen_in_eval_and_outside_the_student(tiny_bert_dir):
    student = _load(tiny_bert_dir)
    teacher = _teacher(tiny_bert_dir)
    teacher.train()
    manager = _manager(_recipe(hardness=1.0, temperature=2.0))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    manager.initialize(student, epoch=0.0, distillation_teacher=teacher)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student.train()
    batch = _batch()
    outputs = student(**batch)
    loss = manager.loss_update(
        outputs.loss, student, optimizer, 0.0, 10, student_outputs=outputs, student_inputs=batch
    )
    loss.backward()
    manager.update(student, optimizer, 0.0, 10)
    optimizer.step()
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert set(student.state_dict()) == set(_load(tiny_bert_dir).state_dict())  # nothing of the teacher
    manager.finalize(student)


def test_outside_its_epochs_and_without_teacher_the_loss_is_untouched(tiny_bert_dir):
    student = _load(tiny_bert_dir)
    batch = _batch()
    outputs = student(**batch)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    windowed = _manager(_recipe(hardness=1.0, start_epoch=1.0, end_epoch=2.0))
    windowed.initialize(student, epoch=0.0, distillation_teacher=_teacher(tiny_bert_dir))
    for epoch, active in ((0.5, False), (1.5, True), (2.0, False)):
        loss = windowed.loss_update(
            outputs.loss, student, optimizer, epoch, 10, student_outputs=outputs, student_inputs=batch
        )
        assert (loss is not outputs.loss) == active
    disabled = _manager(_recipe(hardness=1.0))
    disabled.initialize(student, epoch=0.0, distillation_teacher="disable")
    loss = disabled.loss_update(
        outputs.loss, student, optimizer, 0.0, 10, student_outputs=outputs, student_inputs=batch
    )
    assert loss is outputs.loss


def test_teacher_self_is_the_model_before_layer_drop(tiny_bert_dir):
    student = _load(tiny_bert_dir).eval()
    manager = _manager(
        "modifiers:\n  - !LayerDropModifier\n    keep: 2\n    start_epoch: 0.0\n"
        + _recipe(hardness=1.0, hidden_weight=1.0, attention_weight=1.0).split("modifiers:\n", 1)[1]
    )
    manager.apply_structure(student, epoch=0.0)  # structure first, as SparseML's trainer does
    assert len(student.bert.encoder.layer) == 2
    manager.initialize(student, epoch=0.0, distillation_teacher="self")
    distiller = next(m for m in manager.modifiers if type(m).__name__ == "OBertDistillationModifier")
    teacher = distiller.teacher
    assert len(teacher.bert.encoder.layer) == 4 and not teacher.training
    batch = {k: v for k, v in _batch().items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(teacher(**batch).logits, _load(tiny_bert_dir).eval()(**batch).logits)

    student.train()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    batch = _batch()
    outputs = student(**batch)
    manager.loss_update(
        outputs.loss, student, optimizer, 0.0, 10, student_outputs=outputs, student_inputs=batch
    )
    logged = distiller._logged
    assert {"task_loss", "distillation_loss", "hidden_loss", "attention_loss", "total_loss"} <= set(logged)
    assert distiller._pairs == [(0, 0), (1, 2)]  # student layer 1 is original layer 2
    manager.finalize(student)


def test_hidden_distillation_trains_a_projection_outside_saved_optimizer_state(tiny_bert_dir, tmp_path):
    from obert_modifiers.models import save_tiny_bert

    teacher = _load(save_tiny_bert(tmp_path / "wide", num_labels=5, hidden_size=48, heads=2, num_layers=4))
    student = _load(tiny_bert_dir).train()
    manager = _manager(_recipe(hardness=0.5, hidden_weight=1.0))
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    groups_before = len(optimizer.state_dict()["param_groups"])
    manager.initialize(student, epoch=0.0, distillation_teacher=teacher)
    distiller = manager.modifiers[0]
    for step in range(2):
        batch = _batch(step)
        optimizer.zero_grad()
        outputs = student(**batch)
        loss = manager.loss_update(
            outputs.loss, student, optimizer, 0.0, 10, student_outputs=outputs, student_inputs=batch
        )
        loss.backward()
        if step == 0:
            projection = distiller._projections["0"]
            assert projection.in_features == 32 and projection.out_features == 48
            weight_before = projection.weight.detach().clone()
        manager.update(student, optimizer, 0.0, 10)
        manager.optimizer_pre_step(student, optimizer, 0.0, 10)
        optimizer.step()
    assert not torch.equal(projection.weight, weight_before)  # trained by the model's optimizer
    assert len(optimizer.param_groups) == groups_before + 1
    assert len(optimizer.state_dict()["param_groups"]) == groups_before  # left out of optimizer.pt
    assert "hidden_loss" in distiller._logged
    manager.finalize(student)


@pytest.mark.parametrize(
    ("keys", "key"),
    [
        ({"hardness": 1.5}, "hardness"),
        ({"temperature": 0}, "temperature"),
        ({"hidden_weight": -1}, "hidden_weight"),
        ({"layer_map": "[]"}, "layer_map"),
        ({"distill_output_keys": "{a: 1}"}, "distill_output_keys"),
        ({"start_epoch": 2.0, "end_epoch": 1.0}, "end_epoch"),
    ],
)
def test_bad_recipe_values_name_the_key(keys, key):
    from obert_modifiers.modifiers._base import RecipeParameterError

    with pytest.raises(RecipeParameterError, match=f"OBertDistillationModifier: recipe key '{key}'"):
        _manager(_recipe(**keys))


def test_numeric_strings_are_accepted():
    manager = _manager(_recipe(hardness="5e-1", temperature="2e0"))
    modifier = manager.modifiers[0]
    assert modifier.hardness == 0.5 and modifier.temperature == 2.0


class _TupleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        return (self.linear(x),)


def test_plain_module_teacher_self_falls_back_to_a_copy():
    student = _TupleModel()
    manager = _manager(_recipe(hardness=1.0, distill_output_keys="[0]"))
    manager.initialize(student, epoch=0.0, distillation_teacher="self")
    x = torch.randn(5, 4)
    outputs = student(x)
    loss = manager.loss_update(
        torch.tensor(0.0), student, None, 0.0, 1, student_outputs=outputs, student_inputs=x
    )
    assert float(loss) == pytest.approx(0.0, abs=1e-7)  # the copy equals the student at initialize


# ---------------------------------------------------------------------------- stock CLI, end to end
SELF_RECIPE = """
modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: 1.0
  - !LayerDropModifier
    keep: 2
    start_epoch: 0.0
  - !OBertDistillationModifier
    hardness: 0.5
    temperature: 2.0
    hidden_weight: 1.0
    attention_weight: 0.5
    start_epoch: 0.0
"""


@pytest.mark.integration
def test_teacher_self_with_stock_cli(tiny_bert_dir, bbc_data_dir, tmp_path):
    """`--distill_teacher self` through SparseML's unmodified training script: the teacher is the
    4-layer model as loaded, the 2-layer student trains from the right original layers (SparseML's
    structure reload of the 4-layer checkpoint is renumbered), loss terms reach SparseML's log, and
    nothing of the teacher is saved."""
    from test_layer_drop import run_stock_script, small_data, train_args

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(SELF_RECIPE)
    out = tmp_path / "out"
    run_stock_script(
        "sparseml.transformers.train.text_classification",
        train_args(tiny_bert_dir, small_data(bbc_data_dir, tmp_path / "data", 64), out, recipe, "self"),
        cwd=tmp_path,
    )
    logs = "".join(p.read_text() for p in (tmp_path / "sparse_logs").glob("*.log"))
    for term in ("distillation_loss", "hidden_loss", "attention_loss", "task_loss", "total_loss"):
        assert f"OBertDistillationModifier/{term}" in logs

    original = _load(tiny_bert_dir)
    student = _load(out)  # plain transformers
    assert len(student.bert.encoder.layer) == 2 and student.config.obert_layer_map == [0, 2]
    assert set(student.state_dict()) == {
        k for k in original.state_dict() if ".layer.2." not in k and ".layer.3." not in k
    }
    saved = torch.load(out / "pytorch_model.bin", map_location="cpu")
    assert set(saved) <= set(student.state_dict())  # no teacher weights, no projections

    def distance(a, b):
        return float((a.output.dense.weight - b.output.dense.weight).abs().mean())

    trained = student.bert.encoder.layer[1]
    layers = original.bert.encoder.layer
    assert distance(trained, layers[2]) < 0.1 * distance(trained, layers[1])  # started from original layer 2
