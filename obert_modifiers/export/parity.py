"""The ONNX/PyTorch parity check: the same real sentences through ONNX Runtime and PyTorch,
compared output by output, before a deployment folder is declared good.

The inputs follow the model's task: single sentences for text and token classification (a token
model's outputs are compared per token), question + context pairs for question answering, with
contexts longer than the sequence split into overlapping windows (``doc_stride``) as the stock QA
script and DeepSparse's QA pipeline split them, so the second segment (``token_type_ids`` = 1) and
the windowing are covered too."""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from obert_modifiers.export.errors import ExportError, ParityError, ParityReport

FP32_TOLERANCE = 1e-4  # max |logit difference|, scaled by max(1, max |logit|)
INT8_TOLERANCE = 1e-1  # looser: see docs/export.md (integer conversion folds biases into int32)
# per INT8 form (graph.INT8_FORMATS), same scaling. All four keep every scale of the QAT model, so
# they differ from PyTorch only where summation order moves an activation across a rounding step
# (flips: 0.007-0.12 measured, docs/export.md), the same bound for all; a form whose integer kernel
# is not exact on this CPU is caught by int8_kernels_exact(), not by a tighter bound.
INT8_TOLERANCES = {form: INT8_TOLERANCE for form in ("ort", "ort-u8", "integer", "qdq")}
# the integer GEMM each INT8 form runs on in ORT (QDQ: after ORT fuses it, with INT8 weights)
INT8_KERNELS = {"ort": "u8s8", "ort-u8": "u8u8", "integer": "u8u8", "qdq": "u8s8"}

# Real sentences of several lengths (short review snippets to a long news-style paragraph), so
# parity covers padding, truncation and more than one sequence length.
SAMPLE_TEXTS = (
    "A gripping, beautifully acted film.",
    "Dull.",
    "The plot wanders for an hour before anything happens, and the ending feels rushed.",
    "Shares in the carmaker rose sharply after it reported record quarterly profits on Tuesday.",
    "It is not the masterpiece its trailer promised, but the cast is charming and the music works.",
    "The government said the new rail line would open next spring, two years later than planned, "
    "after engineers found problems with the tunnels under the river and costs rose by a third.",
    "What a waste of a talented director.",
    "The striker scored twice in the second half as the home side came back to win three goals to two, "
    "lifting them out of the relegation places for the first time since October and leaving the "
    "visitors' manager to explain another late collapse to an increasingly frustrated crowd.",
)


# Question + context pairs (hand-written): a short context, a long one that needs several windows
# at 64-128 tokens, and one whose answer lies past the first window.
SAMPLE_QA_PAIRS = (
    ("Who opened the bakery?", "The bakery on Quay Street was opened in 1987 by Marta Olsen."),
    (
        "How long did the flight take?",
        "The rover landed in a wide crater on a spring morning after a flight of seven months. It carries "
        "a drill that can reach two meters below the surface, a camera on a mast and a small weather "
        "station. Engineers in Toulouse steer it with commands that take eleven minutes to arrive, and "
        "its first sample, taken from a dry river bed near the crater wall, contained traces of clay.",
    ),
    (
        "Which day is the library closed?",
        "The new city library has five floors and holds more than two hundred thousand books, maps and "
        "records. The architect placed the reading rooms on the top floor so that readers could see the "
        "river and the old harbour, and gave the children a floor of their own with a puppet theater, a "
        "garden and a room for music lessons. After a year of work on the roof the library is open again "
        "every day except Monday.",
    ),
    ("What fell?", "Shares fell."),
)
QA_ARCHITECTURE_SUFFIX = "ForQuestionAnswering"


def is_question_answering(model) -> bool:
    """True for a model with a question-answering head (``start_logits`` / ``end_logits``)."""
    return type(model).__name__.endswith(QA_ARCHITECTURE_SUFFIX) or any(
        str(name).endswith(QA_ARCHITECTURE_SUFFIX)
        for name in (getattr(getattr(model, "config", None), "architectures", None) or [])
    )


def doc_stride_for(sequence_length: int) -> int:
    """The overlap of consecutive context windows: a quarter of the sequence, at least 1 token
    (the stock QA script's default is 128 of 384)."""
    return max(1, sequence_length // 4)


def int8_kernels_exact() -> dict[str, bool]:
    """Whether ONNX Runtime's ``MatMulInteger`` is exact on this CPU for UINT8 x INT8 (``u8s8``),
    UINT8 x UINT8 (``u8u8``) and INT8 x INT8 (``s8s8``) inputs: one 64 x 256 x 64 product of
    full-range values against the exact integer result. Without VNNI, ORT's ``u8s8`` kernel sums
    pairs of products in saturating 16-bit lanes (``vpmaddubsw``) and is not exact."""
    global _KERNELS_EXACT
    if _KERNELS_EXACT is None:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        rng = np.random.default_rng(0)
        result = {}
        for name, a_type, b_type in (("u8s8", np.uint8, np.int8), ("u8u8", np.uint8, np.uint8),
                                     ("s8s8", np.int8, np.int8)):
            a_info, b_info = np.iinfo(a_type), np.iinfo(b_type)
            # extremes of each range: where 16-bit pair sums overflow
            a = rng.choice([a_info.min, a_info.max], size=(64, 256)).astype(a_type)
            b = rng.choice([b_info.min, b_info.max], size=(256, 64)).astype(b_type)
            a_zero, b_zero = (np.array(128 if t == np.uint8 else 0, t) for t in (a_type, b_type))
            onnx_type = {np.uint8: TensorProto.UINT8, np.int8: TensorProto.INT8}[a_type]
            graph = helper.make_graph(
                [helper.make_node("MatMulInteger", ["a", "b", "a_zero", "b_zero"], ["y"])],
                "probe",
                [helper.make_tensor_value_info("a", onnx_type, [64, 256])],
                [helper.make_tensor_value_info("y", TensorProto.INT32, [64, 64])],
                [numpy_helper.from_array(b, "b"), numpy_helper.from_array(a_zero, "a_zero"),
                 numpy_helper.from_array(b_zero, "b_zero")],
            )
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
            model.ir_version = 8
            session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            got = session.run(None, {"a": a})[0]
            want = (a.astype(np.int64) - int(a_zero)) @ (b.astype(np.int64) - int(b_zero))
            result[name] = bool(np.array_equal(got, want))
        _KERNELS_EXACT = result
    return dict(_KERNELS_EXACT)


_KERNELS_EXACT: dict[str, bool] | None = None


def _input_names(model, tokenizer) -> list[str]:
    import inspect

    encoded = tokenizer(["a"], return_tensors="pt")
    forward_args = list(inspect.signature(model.forward).parameters)
    return [name for name in forward_args if name in encoded]


def qa_sample_batches(
    tokenizer,
    input_names: Sequence[str],
    sequence_length: int,
    pairs: Sequence[tuple[str, str]] = SAMPLE_QA_PAIRS,
    pad_to_full: bool = False,
    doc_stride: int | None = None,
) -> list[tuple[str, OrderedDict[str, Any]]]:
    """Named question-answering batches: every ``(question, context)`` pair, the context truncated
    into overlapping windows of ``sequence_length`` tokens (``doc_stride`` overlap, as the stock QA
    script and DeepSparse's pipeline do), padded to the longest window; the same padded to
    ``sequence_length``; and one context repeated until it needs at least two windows."""
    stride = doc_stride_for(sequence_length) if doc_stride is None else doc_stride

    def encode(batch_pairs, padding):
        questions = [question for question, _ in batch_pairs]
        contexts = [context for _, context in batch_pairs]
        longest_question = max(len(tokenizer(q, add_special_tokens=False)["input_ids"]) for q in questions)
        room = sequence_length - longest_question - 3  # context tokens a window holds ([CLS] q [SEP] c [SEP])
        if room < 2:  # a very short sequence: the question alone fills it; truncate both, no windows
            encoded = tokenizer(
                questions, contexts, padding=padding, truncation=True, max_length=sequence_length,
                return_tensors="np",
            )  # fmt: skip
        else:
            encoded = tokenizer(
                questions,
                contexts,
                padding=padding,
                truncation="only_second",
                max_length=sequence_length,
                stride=min(stride, room - 1),  # the overlap must be shorter than a window's context
                return_overflowing_tokens=True,
                return_tensors="np",
            )
        return OrderedDict((name, encoded[name].astype("int64")) for name in input_names)

    longest = "max_length" if pad_to_full else "longest"
    question, context = max(pairs, key=lambda pair: len(pair[1]))
    long_context = context  # repeated until it needs at least two windows at this sequence length
    while len(tokenizer(long_context)["input_ids"]) < 1.5 * sequence_length:
        long_context += " " + context
    return [
        (f"{len(pairs)} question/context pairs in windows (stride {stride})", encode(pairs, longest)),
        (f"{len(pairs)} pairs padded to {sequence_length}", encode(pairs, "max_length")),
        ("1 long context in windows", encode([(question, long_context)], longest)),
    ]


def sample_batches(
    tokenizer,
    input_names: Sequence[str],
    sequence_length: int,
    texts: Sequence[str] = SAMPLE_TEXTS,
    pad_to_full: bool = False,
) -> list[tuple[str, OrderedDict[str, Any]]]:
    """Named input batches: all texts padded to the longest, three texts padded to
    ``sequence_length``, and a single text (everything padded to ``sequence_length`` when
    ``pad_to_full``, for ONNX files with a fixed sequence axis)."""

    def encode(batch_texts, padding):
        encoded = tokenizer(
            list(batch_texts),
            padding=padding,
            truncation=True,
            max_length=sequence_length,
            return_tensors="np",
        )
        return OrderedDict((name, encoded[name].astype("int64")) for name in input_names)

    longest = "max_length" if pad_to_full else "longest"
    return [
        (
            f"{len(texts)} texts padded to {'longest' if longest == 'longest' else sequence_length}",
            encode(texts, longest),
        ),
        (f"3 texts padded to {sequence_length}", encode(texts[:3], "max_length")),
        ("1 text", encode(texts[-1:], longest)),
    ]


def _torch_outputs(model, batch) -> OrderedDict[str, Any]:
    import torch

    with torch.no_grad():
        output = model(**{name: torch.from_numpy(value) for name, value in batch.items()})
    if hasattr(output, "keys"):
        return OrderedDict((key, output[key].numpy()) for key in output.keys())
    if isinstance(output, (tuple, list)):
        return OrderedDict((f"output_{i}", t.numpy()) for i, t in enumerate(output))
    return OrderedDict(output=output.numpy())


def check_parity(
    model,
    onnx_path: str | os.PathLike,
    tokenizer,
    *,
    quantized: bool,
    sequence_length: int = 128,
    texts: Sequence[str] | None = None,
    tolerance: float | None = None,
    raise_on_failure: bool = True,
    pairs: Sequence[tuple[str, str]] | None = None,
) -> ParityReport:
    """Run ``onnx_path`` in ONNX Runtime and ``model`` in PyTorch on real sentences and compare.

    A question-answering model (:func:`is_question_answering`) gets question + context ``pairs``
    (default :data:`SAMPLE_QA_PAIRS`) split into doc-stride windows; other models get ``texts``
    (default :data:`SAMPLE_TEXTS`); outputs are compared whole (per token for token classification,
    per position for ``start_logits`` / ``end_logits``).

    Passes when every output is within ``tolerance * max(1, max |PyTorch output|)`` (default
    1e-4 for FP32, 1e-1 for INT8) and, for INT8, the arg-max prediction agrees on every sample
    whose PyTorch top-2 margin exceeds twice the allowed difference. On failure raises
    :class:`ParityError` naming the largest difference and where it is.
    """
    import numpy as np
    import onnxruntime as ort

    tolerance = (INT8_TOLERANCE if quantized else FP32_TOLERANCE) if tolerance is None else tolerance
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    onnx_inputs = [i.name for i in session.get_inputs()]
    onnx_outputs = [o.name for o in session.get_outputs()]
    model.eval()

    static_length = session.get_inputs()[0].shape[1] if len(session.get_inputs()[0].shape) > 1 else None
    if isinstance(static_length, int):  # exported with a fixed sequence axis (the stock exporter)
        sequence_length = static_length
    worst_diff, worst_where = -1.0, ""
    num_samples, agree, compared, failures = 0, 0, 0, []
    pad_to_full = isinstance(static_length, int)
    if is_question_answering(model) and texts is None:
        batches = qa_sample_batches(
            tokenizer, onnx_inputs, sequence_length, pairs or SAMPLE_QA_PAIRS, pad_to_full=pad_to_full
        )
    else:
        batches = sample_batches(
            tokenizer, onnx_inputs, sequence_length, texts or SAMPLE_TEXTS, pad_to_full=pad_to_full
        )
    for label, batch in batches:
        reference = _torch_outputs(model, batch)
        produced = session.run(None, dict(batch))
        num_samples += len(next(iter(batch.values())))
        for name, got in zip(onnx_outputs, produced, strict=True):
            want = reference.get(name)
            if want is None:
                raise ExportError(f"ONNX output {name!r} has no PyTorch counterpart ({list(reference)})")
            if want.shape != got.shape:
                raise ParityError(
                    f"output {name!r} on {label}: ONNX shape {got.shape} != PyTorch {want.shape}",
                    ParityReport(math.inf, tolerance, num_samples, 0.0, label, False),
                )
            if not (np.isfinite(want).all() and np.isfinite(got).all()):
                # NaN compares as "not larger" than any tolerance: name it instead of passing it
                failures.append(f"{name} on '{label}' holds NaN or infinite values")
                continue
            scale = max(1.0, float(np.abs(want).max()))
            diff = np.abs(want.astype(np.float64) - got.astype(np.float64))
            where = np.unravel_index(int(diff.argmax()), diff.shape)
            if float(diff.max()) > worst_diff:
                worst_diff = float(diff.max())
                worst_where = (
                    f"output {name!r}, batch '{label}', sample {where[0]}, index "
                    f"{tuple(int(i) for i in where[1:])}: PyTorch {float(want[where]):.6g}, "
                    f"ONNX {float(got[where]):.6g}"
                )
            if float(diff.max()) > tolerance * scale:
                failures.append(
                    f"{name} on '{label}' differs by {float(diff.max()):.3g} > {tolerance * scale:.3g}"
                )
            # prediction agreement along the last axis (classes / positions)
            top2 = np.sort(want, axis=-1)[..., -2:] if want.shape[-1] > 1 else None
            same = want.argmax(-1) == got.argmax(-1)
            agree += int(same.sum())
            compared += int(same.size)
            if quantized and top2 is not None:
                clear = (top2[..., 1] - top2[..., 0]) > 2 * tolerance * scale
                if np.any(clear & ~same):
                    failures.append(
                        f"{name} on '{label}': {int((clear & ~same).sum())} clear predictions changed"
                    )
    agreement = agree / compared if compared else 1.0
    report = ParityReport(worst_diff, tolerance, num_samples, agreement, worst_where, not failures)
    if failures and raise_on_failure:
        raise ParityError(
            f"ONNX/PyTorch parity check failed for {onnx_path}: largest difference {worst_diff:.4g} "
            f"at {worst_where}; tolerance {tolerance:g} x max(1, |output|) "
            f"({'INT8' if quantized else 'FP32'}); " + "; ".join(failures[:3]),
            report,
        )
    return report

