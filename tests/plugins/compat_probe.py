"""Probes for tests/test_compat.py, run in a fresh interpreter
(``python compat_probe.py NAME[,NAME...] [--model DIR] [--train-csv CSV] [--out DIR] [--all-metrics]``)
so that ``OBERT_COMPAT_DISABLE`` takes effect exactly as for a user. Nothing here imports
obert_modifiers: the start-up hook must do all the work. Each probe prints one JSON line
(``PROBE name {...}``) on success; a broken stack shows as the real exception and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
from pathlib import Path

_current = ""


def emit(result: dict) -> None:
    print(f"PROBE {_current} " + json.dumps(result, default=float), flush=True)


def probe_qconfig(options: argparse.Namespace) -> None:
    import sparseml.pytorch.sparsification  # noqa: F401  (what the hook waits for)
    import torch
    from sparseml.pytorch.sparsification.quantization.quantization_scheme import QuantizationScheme

    scheme = QuantizationScheme()
    qconfig = scheme.get_qconfig()
    wrapper = scheme.get_wrapper_qconfig()
    emit(
        {
            "is_qconfig": isinstance(qconfig, torch.ao.quantization.QConfig),
            "scheme_kept": qconfig.quantization_scheme is scheme and wrapper.quantization_scheme is scheme,
            "weight_observer": type(qconfig.weight()).__name__,
            "pickles": pickle.loads(pickle.dumps(qconfig)).quantization_scheme == scheme,
        }
    )


def probe_metrics(options: argparse.Namespace) -> None:
    import sparseml.pytorch.sparsification  # noqa: F401
    from datasets import load_metric

    results = {"accuracy": load_metric("accuracy").compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])}
    if options.all_metrics:
        results["seqeval"] = load_metric("seqeval").compute(
            predictions=[["B-PER", "I-PER", "O", "B-LOC"]], references=[["B-PER", "I-PER", "O", "B-ORG"]]
        )
        answers = {"text": ["the Eiffel Tower"], "answer_start": [0]}
        results["squad"] = load_metric("squad").compute(
            predictions=[
                {"id": "q1", "prediction_text": "Eiffel Tower"},
                {"id": "q2", "prediction_text": "Paris"},
            ],
            references=[{"id": "q1", "answers": answers}, {"id": "q2", "answers": answers}],
        )
        results["squad_v2"] = load_metric("squad_v2").compute(
            predictions=[
                {"id": "q1", "prediction_text": "Eiffel Tower", "no_answer_probability": 0.0},
                {"id": "q2", "prediction_text": "", "no_answer_probability": 0.0},
            ],
            references=[
                {"id": "q1", "answers": answers},
                {"id": "q2", "answers": {"text": [], "answer_start": []}},
            ],
        )
        results["glue_mrpc"] = load_metric("glue", "mrpc").compute(
            predictions=[1, 0, 1, 1], references=[1, 0, 0, 1]
        )
        results["glue_cola"] = load_metric("glue", "cola").compute(
            predictions=[1, 0, 1, 0], references=[1, 0, 1, 0]
        )
    emit(results)


def probe_grad_sampler(options: argparse.Namespace) -> None:
    model_dir, train_csv = options.model, options.train_csv
    import datasets
    from sparseml.transformers import SparseAutoModel, SparseAutoTokenizer
    from sparseml.transformers.sparsification import Trainer
    from transformers import AutoConfig, TrainingArguments

    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = SparseAutoTokenizer.from_pretrained(model_dir)
    model = SparseAutoModel.text_classification_from_pretrained(model_dir, config=config)
    label_ids = {label: int(i) for i, label in config.id2label.items()}
    raw = datasets.load_dataset("csv", data_files={"train": train_csv})["train"].select(range(24))

    def tokenize(batch):
        encoded = tokenizer(batch["sentence"], truncation=True, max_length=32)
        encoded["label"] = [label_ids[label] for label in batch["label"]]
        return encoded

    train = raw.map(tokenize, batched=True)  # keeps the string column "sentence": it must be dropped
    args = TrainingArguments(
        output_dir=str(Path(model_dir).parent / "probe-out"),
        per_device_train_batch_size=8,
        report_to=[],
        use_cpu=True,
    )
    trainer = Trainer(
        model=model,
        model_state_path=model_dir,
        recipe=None,
        args=args,
        train_dataset=train,
        tokenizer=tokenizer,
    )
    loader_type = type(trainer.get_train_dataloader()).__name__
    batches = trainer._data_loader_builder({"batch_size": 3})
    sizes = []
    for _ in range(9):  # 24 rows / 3 = 8 batches: the 9th proves the sampler cycles forever
        _, inputs, _ = next(batches)
        sizes.append(int(inputs["input_ids"].shape[0]))
    emit({"train_loader": loader_type, "batch_sizes": sizes, "keys": sorted(inputs)})


def probe_onnx(options: argparse.Namespace) -> None:
    out_dir = options.out
    import onnxruntime
    import sparseml.pytorch.sparsification  # noqa: F401
    import torch
    from sparseml.pytorch.utils import export_onnx

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    sample = torch.randn(2, 4)
    path = Path(out_dir) / "probe.onnx"
    export_onnx(model, sample, str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: sample.numpy()})
    diff = float((torch.from_numpy(out) - model(sample)).abs().max())
    # a call from outside SparseML keeps torch's own default (the dynamo exporter)
    try:
        torch.onnx.export(model, (sample,), str(Path(out_dir) / "direct.onnx"))
        direct = "exported"
    except ModuleNotFoundError as error:
        direct = f"ModuleNotFoundError: {error}"
    emit({"max_abs_diff": diff, "direct_call": direct})


def probe_reload(options: argparse.Namespace) -> None:
    """Load a saved QAT checkpoint the way sparseml.transformers.export_onnx does and compare every
    reloaded parameter with the tensors in its files."""
    _reload(options.qat_model)


def probe_reload_bin(options: argparse.Namespace) -> None:
    """The same for a QAT checkpoint saved as pytorch_model.bin, given as a path relative to the
    working directory (as in ``--model_name_or_path my-model``)."""
    _reload(options.qat_model_bin)


def _reload(model_dir: str) -> None:
    import torch
    from safetensors.torch import load_file
    from sparseml.transformers import SparseAutoModel
    from sparseml.transformers.export import DeviceCPUTrainingArgs, load_task_model
    from sparseml.transformers.sparsification import Trainer
    from transformers import AutoConfig

    saved = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        saved.update(load_file(str(path)))
    for path in sorted(Path(model_dir).glob("pytorch_model*.bin")):
        saved.update(torch.load(path, map_location="cpu", weights_only=True))
    _, delayed = SparseAutoModel._loadable_state_dict(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    model = load_task_model("text-classification", model_dir, config)
    trainer = Trainer(
        model=model,
        args=DeviceCPUTrainingArgs(output_dir=str(Path(model_dir).parent)),
        model_state_path=model_dir,
        recipe=None,
    )
    trainer.apply_manager(epoch=math.inf, checkpoint=None)
    state = trainer.model.state_dict()
    common = [k for k in saved if k in state and state[k].shape == saved[k].shape]
    differ = sorted(k for k in common if not torch.equal(state[k], saved[k]))
    emit(
        {
            "delayed_qat_load": bool(delayed),
            "keys_compared": len(common),
            "keys_saved": len(saved),
            "keys_differing": len(differ),
            "example_differing": differ[:3],
            "qat_keys": sum(k.endswith(".zero_point") for k in state),
            "torch": torch.__version__,
        }
    )


def probe_rng_state(options: argparse.Namespace) -> None:
    """The HF trainer writes its RNG checkpoint and reads it back, as ``--resume_from_checkpoint`` does."""
    import random

    import sparseml.transformers  # noqa: F401  (SparseML's trainer stack: what the hook waits for)
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    out = Path(options.out) / "rng-checkpoint"
    model = AutoModelForSequenceClassification.from_pretrained(options.model)
    args = TrainingArguments(output_dir=str(out), report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args)
    trainer._save_rng_state(str(out))
    expected = random.random()
    random.random()  # move on, then restore
    trainer._load_rng_state(str(out))
    emit({"restored": random.random() == expected})


PROBES = {
    "qconfig": probe_qconfig,
    "metrics": probe_metrics,
    "grad_sampler": probe_grad_sampler,
    "onnx": probe_onnx,
    "reload": probe_reload,
    "reload_bin": probe_reload_bin,
    "rng_state": probe_rng_state,
}

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("names", help="comma-separated probe names: " + ", ".join(PROBES))
    parser.add_argument("--model", help="a plain (dense) model folder")
    parser.add_argument("--qat-model", help="a QAT model folder saved as safetensors with its recipe.yaml")
    parser.add_argument("--qat-model-bin", help="the same QAT model saved as pytorch_model.bin")
    parser.add_argument("--train-csv")
    parser.add_argument("--out", help="a scratch folder")
    parser.add_argument("--all-metrics", action="store_true")
    parsed = parser.parse_args()
    for name in parsed.names.split(","):
        _current = name
        PROBES[name](parsed)
