"""Knowledge-distillation losses (pure torch; no SparseML here).

Logit distillation follows SparseML 1.8's ``DistillationModifier`` exactly
(``sparseml/pytorch/sparsification/distillation/modifier_distillation_base.py: kl_logsoftmax``):
for each distilled output, ``KL(softmax(t/T) || softmax(s/T)) * T**2`` summed over every element and
divided by the number of distributions (``numel / size(-1)``: the batch size for ``[B, C]`` logits,
``B * S`` for ``[B, S]`` QA start/end logits); the mean over outputs is the KD term, and the total is
``(1 - hardness) * task_loss + hardness * KD``.

Hidden-state and attention distillation (optional, TinyBERT-style) pair each student layer with a
teacher layer; where hidden sizes differ, a learned linear projection maps student to teacher width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Outputs = Tensor | Mapping[str, Tensor] | Sequence[Tensor]


def kl_div_temperature(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``KL(softmax(teacher/T) || softmax(student/T)) * T**2``, averaged over the distributions in the
    last dimension (SparseML's ``kl_logsoftmax``)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student and teacher outputs must have the same shape for distillation, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    num_distributions = student_logits.numel() / student_logits.size(-1)
    kl = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.log_softmax(teacher_logits / temperature, dim=-1),
        log_target=True,
        reduction="sum",
    )
    return kl * (temperature**2) / num_distributions


def select_outputs(outputs: Outputs, keys: Sequence[str | int] | None) -> list:
    """The tensors to distil: ``keys`` picked from a mapping (HF ``ModelOutput``) or a sequence; a bare
    tensor is used as is."""
    if isinstance(outputs, Tensor):
        return [outputs]
    if isinstance(outputs, Mapping):
        keys = list(keys) if keys else [k for k in outputs if k != "loss"]
        missing = [k for k in keys if k not in outputs]
        if missing:
            raise KeyError(f"distill_output_keys {missing} are not model outputs (outputs: {list(outputs)})")
        return [outputs[k] for k in keys]
    keys = list(keys) if keys else range(len(outputs))
    return [outputs[int(k)] for k in keys]


def logit_distillation_loss(
    student_outputs: Outputs,
    teacher_outputs: Outputs,
    temperature: float,
    output_keys: Sequence[str | int] | None = None,
) -> Tensor:
    """Mean over the selected outputs of :func:`kl_div_temperature`."""
    students = select_outputs(student_outputs, output_keys)
    teachers = select_outputs(teacher_outputs, output_keys)
    losses = [kl_div_temperature(s, t, temperature) for s, t in zip(students, teachers, strict=True)]
    return torch.stack(losses).mean()


def combine_losses(
    task_loss: Tensor,
    kd_loss: Tensor,
    hardness: float,
    hidden_loss: Tensor | None = None,
    hidden_weight: float = 0.0,
    attention_loss: Tensor | None = None,
    attention_weight: float = 0.0,
) -> Tensor:
    """``(1 - hardness) * task + hardness * kd + hidden_weight * hidden + attention_weight * attention``
    (the last two only when given)."""
    total = (1.0 - hardness) * task_loss + hardness * kd_loss
    if hidden_loss is not None and hidden_weight:
        total = total + hidden_weight * hidden_loss
    if attention_loss is not None and attention_weight:
        total = total + attention_weight * attention_loss
    return total


def hidden_state_loss(
    student_hidden: Sequence[Tensor],
    teacher_hidden: Sequence[Tensor],
    projections: Sequence[nn.Module | None] | None = None,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Mean over layer pairs of the MSE between (projected) student and teacher hidden states
    ``[B, S, H]``; padded positions are left out when ``attention_mask`` ``[B, S]`` is given."""
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"{len(student_hidden)} student vs {len(teacher_hidden)} teacher hidden states")
    losses = []
    for index, (student, teacher) in enumerate(zip(student_hidden, teacher_hidden, strict=True)):
        projection = projections[index] if projections is not None else None
        if projection is not None:
            student = projection(student)
        if student.shape != teacher.shape:
            raise ValueError(
                f"hidden states of pair {index} differ in shape: student {tuple(student.shape)}, "
                f"teacher {tuple(teacher.shape)} (a projection is needed where hidden sizes differ)"
            )
        squared = (student - teacher.to(student.dtype)).pow(2).mean(dim=-1)
        if attention_mask is not None:
            mask = attention_mask.to(squared.dtype)
            losses.append((squared * mask).sum() / mask.sum().clamp_min(1.0))
        else:
            losses.append(squared.mean())
    return torch.stack(losses).mean()


def attention_loss(
    student_attentions: Sequence[Tensor],
    teacher_attentions: Sequence[Tensor],
    attention_mask: Tensor | None = None,
    eps: float = 1e-12,
) -> Tensor:
    """Mean over layer pairs of ``KL(teacher || student)`` between attention distributions
    ``[B, heads, S, S]`` (one distribution per query row), averaged over real (unpadded) query rows."""
    if len(student_attentions) != len(teacher_attentions):
        raise ValueError(
            f"{len(student_attentions)} student vs {len(teacher_attentions)} teacher attention maps"
        )
    losses = []
    for index, (student, teacher) in enumerate(zip(student_attentions, teacher_attentions, strict=True)):
        if student.shape != teacher.shape:
            raise ValueError(
                f"attention maps of pair {index} differ in shape: student {tuple(student.shape)}, "
                f"teacher {tuple(teacher.shape)} (attention distillation needs equal head counts)"
            )
        teacher = teacher.to(student.dtype)
        row_kl = (teacher * (torch.log(teacher + eps) - torch.log(student + eps))).sum(dim=-1)  # [B,H,S]
        if attention_mask is not None:
            mask = attention_mask.to(row_kl.dtype)[:, None, :].expand_as(row_kl)
            losses.append((row_kl * mask).sum() / mask.sum().clamp_min(1.0))
        else:
            losses.append(row_kl.mean())
    return torch.stack(losses).mean()


def make_projection(student_size: int, teacher_size: int) -> nn.Linear | None:
    """A learned ``Linear(student_size, teacher_size)`` where the widths differ, else ``None``."""
    if student_size == teacher_size:
        return None
    return nn.Linear(student_size, teacher_size)


def resolve_layer_map(
    num_student_layers: int,
    num_teacher_layers: int,
    layer_map: Sequence[int] | None = None,
    recorded_map: Sequence[int] | None = None,
) -> list:
    """Student layer ``i`` -> teacher layer index: the explicit ``layer_map``, else the map recorded by
    layer dropping (``config.obert_layer_map``), else identity when the layer counts agree, else
    uniform spacing over the teacher's layers (student ``i`` -> teacher ``floor((i+1)*T/S) - 1``,
    so the last student layer matches the last teacher layer)."""
    if layer_map is not None:
        mapping, source = [int(i) for i in layer_map], "layer_map"
    elif recorded_map is not None and len(recorded_map) == num_student_layers:
        mapping, source = [int(i) for i in recorded_map], "config.obert_layer_map"
    elif num_student_layers == num_teacher_layers:
        return list(range(num_student_layers))
    else:
        return [((i + 1) * num_teacher_layers) // num_student_layers - 1 for i in range(num_student_layers)]
    if len(mapping) != num_student_layers:
        raise ValueError(
            f"{source} has {len(mapping)} entries but the student has {num_student_layers} layers"
        )
    bad = [i for i in mapping if not 0 <= i < num_teacher_layers]
    if bad:
        raise ValueError(
            f"{source} points at teacher layers {bad}; the teacher has {num_teacher_layers} layers"
        )
    return mapping
