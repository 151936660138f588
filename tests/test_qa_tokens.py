"""Question answering and token classification, end to end, as text classification is tested.

- ``obert data prepare squad|conll`` on the hand-written fixtures in ``tests/fixtures/`` (and its
  validation errors, which name the file and line);
- SparseML's STOCK ``sparseml.transformers.train.question_answering`` / ``...token_classification``
  scripts run recipes with our tags: a dense tiny model first (the teacher), then one student run that
  drops layers, prunes with oBERT to the target sparsity and distils ``start_logits``/``end_logits``
  (QA, teacher folder) or ``logits`` (tokens, teacher ``self``), then QAT on the pruned student;
- save, reload, ``obert export --task ...`` with parity, and the exported folders answer the same in
  DeepSparse's pipelines, in ONNX Runtime and in PyTorch;
- benchmark inputs, parity samples and model-card metrics of both tasks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from obert_modifiers.data import DataPrepareError, prepare_conll, prepare_squad, read_conll, read_squad

FIXTURES = Path(__file__).parent / "fixtures"
SQUAD = FIXTURES / "squad_small.json"
CONLL = FIXTURES / "conll_small.txt"
BIN = Path(sys.executable).parent
SEQ = 64  # contexts are longer than this with their question: the QA runs split them with DOC_STRIDE
DOC_STRIDE = 24
ENCODER = "re:bert.encoder.layer.*.(attention.self.(query|key|value)|attention.output.dense|intermediate.dense|output.dense).weight"  # noqa: E501

# ------------------------------------------------------------------------------ recipes of the runs
DENSE_RECIPE = """
num_epochs: 12.0
training_modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: eval(num_epochs)
  - !LearningRateFunctionModifier
    lr_func: linear
    init_lr: 3.0e-3
    final_lr: 1.0e-4
    start_epoch: 0.0
    end_epoch: eval(num_epochs)
"""

# one run: layers 4 -> 2 (before training), oBERT block4 pruning 0.5 -> 0.75 (cubic, steps at
# epochs 0, 1, 2), distillation of the task's outputs from the teacher all along
STUDENT_RECIPE = """
num_epochs: 4.0
final_sparsity: 0.75
training_modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: eval(num_epochs)
  - !LearningRateFunctionModifier
    lr_func: linear
    init_lr: 2.0e-3
    final_lr: 1.0e-4
    start_epoch: 0.0
    end_epoch: eval(num_epochs)
structure_modifiers:
  - !LayerDropModifier
    keep: 2
    strategy: uniform
    num_layers: 4
pruning_modifiers:
  - !OBertPruningModifier
    params: ["%(encoder)s"]
    init_sparsity: 0.5
    final_sparsity: eval(final_sparsity)
    start_epoch: 0.0
    end_epoch: 2.0
    update_frequency: 1.0
    inter_func: cubic
    mask_type: block4
    global_sparsity: true
    leave_enabled: true
    num_grads: 8
    damp: 1.0e-7
    fisher_block_size: 32
    num_recomputations: 1
    grad_sampler_kwargs:
      batch_size: 4
distillation_modifiers:
  - !OBertDistillationModifier
    hardness: 0.5
    temperature: 2.0
    distill_output_keys: %(keys)s
""".replace("%(encoder)s", ENCODER)

QAT_RECIPE = """
num_epochs: 2.0
training_modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: eval(num_epochs)
  - !LearningRateFunctionModifier
    lr_func: linear
    init_lr: 5.0e-4
    final_lr: 1.0e-5
    start_epoch: 0.0
    end_epoch: eval(num_epochs)
quantization_modifiers:
  - !OBertQuantizationModifier
    start_epoch: 0.0
    freeze_observer_epoch: 1.0
    exclude: [%(head)s]
"""

TASKS = {
    "question-answering": {
        "script": "sparseml.transformers.train.question_answering",
        "keys": "[start_logits, end_logits]",
        "head": "qa_outputs",
        "extra": ["--doc_stride", str(DOC_STRIDE), "--per_device_eval_batch_size", "16"],
    },
    "token-classification": {
        "script": "sparseml.transformers.train.token_classification",
        "keys": "[logits]",
        "head": "classifier",
        "extra": ["--per_device_eval_batch_size", "16"],
    },
}


def _env() -> dict[str, str]:
    from conftest import OFFLINE_ENV

    return {**os.environ, **OFFLINE_ENV}


def stock_args(
    task: str, model: Path, data: Path, out: Path, recipe: str, teacher: str | None = None
) -> list:
    """Arguments of SparseML's unmodified training script for ``task``: the final model saved as
    pytorch_model.bin (SparseML reloads structure only from it), no checkpoints."""
    out.parent.mkdir(parents=True, exist_ok=True)
    recipe_path = out.parent / f"{out.name}.recipe.yaml"
    recipe_path.write_text(recipe)
    args = [
        "--model_name_or_path", str(model),
        "--train_file", str(data / "train.json"),
        "--validation_file", str(data / "validation.json"),
        "--do_train", "--do_eval",
        "--max_seq_length", str(SEQ), "--per_device_train_batch_size", "8",
        "--output_dir", str(out), "--overwrite_output_dir", "--report_to", "none",
        "--save_strategy", "no", "--save_safetensors", "False", "--dataloader_num_workers", "0",
        "--seed", "1", "--recipe", str(recipe_path),
        *TASKS[task]["extra"],
    ]  # fmt: skip
    return args + (["--distill_teacher", teacher] if teacher is not None else [])


# The stock scripts' own main(), one run after the other in ONE fresh process: a stock script spends
# most of a tiny run importing SparseML (~15 s of CPU), so the six runs share that start. Each run is
# exactly what its console script does (`sparseml.transformers.train.<task>` calls the same main()).
DRIVER = """
import importlib, json, sys
from pathlib import Path
for script, args in json.loads(sys.argv[1]):
    module = importlib.import_module(script.replace(".train.", "."))
    out = Path(args[args.index("--output_dir") + 1])
    sys.argv = [script, *args]
    module.main()
    for name in ("optimizer.pt", "scheduler.pt"):  # the next stage starts fresh from this folder
        (out / name).unlink(missing_ok=True)
    print("stock run done:", out, flush=True)
"""


def stock_runs(runs: list[tuple[str, list]], cwd: Path) -> None:
    """Run ``[(task, args), ...]`` through the stock scripts' main() in order, in a fresh process."""
    payload = json.dumps([(TASKS[task]["script"], [str(a) for a in args]) for task, args in runs])
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, payload], cwd=cwd, env=_env(), capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, f"stock runs failed:\n{(done.stdout + done.stderr)[-8000:]}"


def save_tiny_base(out: Path, num_layers: int = 4) -> Path:
    """A tiny random ``BertModel`` (no task head: the stock scripts add theirs) with the MiniLM tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    from obert_modifiers.models import TOKENIZER_FILES, minilm_l6_dir

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128,
    )  # fmt: skip
    out.mkdir(parents=True)
    BertModel(config).save_pretrained(out, safe_serialization=False)
    for name in TOKENIZER_FILES:
        shutil.copyfile(minilm_l6_dir() / name, out / name)
    return out


# ------------------------------------------------------------------------------ data prepare


def test_prepare_squad_writes_the_stock_layout(tmp_path):
    info = prepare_squad(SQUAD, tmp_path / "qa")
    splits = {s: json.loads((tmp_path / "qa" / f"{s}.json").read_text())["data"] for s in info["counts"]}
    assert sum(len(v) for v in splits.values()) == 40 and info["counts"]["test"] >= 4
    contexts = {s: {r["context"] for r in rows} for s, rows in splits.items()}
    assert not (contexts["train"] & contexts["test"]) and not (contexts["train"] & contexts["validation"])
    for row in splits["train"]:
        start, text = row["answers"]["answer_start"][0], row["answers"]["text"][0]
        assert row["context"][start : start + len(text)] == text
    again = prepare_squad(SQUAD, tmp_path / "qa", max_train=5)  # an earlier output is replaced
    assert again["counts"]["train"] == 5 and again["counts"]["test"] == info["counts"]["test"]


def test_prepare_conll_writes_the_stock_layout(tmp_path):
    info = prepare_conll(CONLL, tmp_path / "tok")
    rows = [json.loads(line) for line in (tmp_path / "tok" / "train.json").read_text().splitlines()]
    assert set(rows[0]) == {"tokens", "ner_tags"} and len(rows) == info["counts"]["train"]
    assert sum(info["counts"].values()) == 40
    train_tags = {t for r in rows for t in r["ner_tags"]}
    for split in ("validation", "test"):  # the stock script fails on a tag the training file lacks
        lines = (tmp_path / "tok" / f"{split}.json").read_text().splitlines()
        assert {t for line in lines for t in json.loads(line)["ner_tags"]} <= train_tags
    assert info["labels"] == sorted(train_tags) and {"B-PER", "I-ORG", "B-MISC", "O"} <= train_tags


def test_prepare_conll_moves_a_sentence_with_an_unseen_tag_into_train(tmp_path):
    text = "\n\n".join(f"w{i} O\nx{i} B-LOC" for i in range(12)) + "\n\nrare B-EVENT\n"
    source = tmp_path / "rare.txt"
    source.write_text(text)
    for seed in range(4):
        info = prepare_conll(source, tmp_path / f"out{seed}", seed=seed)
        assert info["label_counts"]["train"].get("B-EVENT") == 1


def _squad_with(tmp_path, change) -> Path:
    document = json.loads(SQUAD.read_text())
    change(document)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(document, indent=1))
    return path


def _line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def test_squad_errors_name_file_line_and_what_is_right(tmp_path):
    def shift(document):
        document["data"][2]["paragraphs"][0]["qas"][1]["answers"][0]["answer_start"] += 3

    path = _squad_with(tmp_path, shift)
    with pytest.raises(DataPrepareError) as caught:
        read_squad(path)
    message = str(caught.value)
    line = _line_of(path, '"fx010"')
    assert message.startswith(f"{path}:{line}: data[2].paragraphs[0].qas[1]")
    assert "answer_start" in message and "'seven months'" in message and "occurs at" in message

    def duplicate(document):
        document["data"][5]["paragraphs"][0]["qas"][0]["id"] = "fx003"

    path = _squad_with(tmp_path, duplicate)
    with pytest.raises(DataPrepareError, match=r"id 'fx003' is used twice \(first at line \d+\)"):
        read_squad(path)

    bad_json = tmp_path / "broken.json"
    bad_json.write_text('{"data": [\n  {"title": "x",\n  }\n]}')
    with pytest.raises(DataPrepareError, match=rf"^{bad_json}:3: not valid JSON"):
        read_squad(bad_json)
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps([{"question": "q", "context": "c"}]))
    with pytest.raises(DataPrepareError, match="expected a SQuAD v1.1 object"):
        prepare_squad(flat, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.parametrize(
    "lines, line, fragment",
    [
        (["Anna B-PER", "Berg I-PER", "", "runs O", "Oslo I-LOC"], 5, "follows O: a BIO entity starts"),
        (["Anna B-PER", "Berg I-LOC"], 2, "follows B-PER"),
        (["Anna NNP B-PER", "Berg NNP I-PER", "", "runs O"], 4, "2 columns, but line 1 has 3"),
        (["Anna B-PER", "Berg PER"], 2, "tag 'PER' of token 'Berg' is not BIO"),
        (["Anna"], 1, "has one column"),
    ],
)
def test_conll_errors_name_file_and_line(tmp_path, lines, line, fragment):
    path = tmp_path / "bad.txt"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataPrepareError) as caught:
        read_conll(path)
    assert str(caught.value).startswith(f"{path}:{line}: ") and fragment in str(caught.value)


def test_cli_data_prepare_user_files(tmp_path):
    obert = [str(BIN / "obert"), "data", "prepare"]
    done = subprocess.run(
        [*obert, "conll", "--file", str(CONLL), "--out", str(tmp_path / "tok")],
        env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "tok" / "data.json").read_text())["task"] == "token-classification"
    done = subprocess.run(
        [*obert, "squad", "--out", str(tmp_path / "qa")], env=_env(), capture_output=True, text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "needs --file" in done.stderr and "Traceback" not in done.stderr


# ------------------------------------------------------------------------------ stock runs, end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """For each task: ``dense`` (the tiny base fine-tuned: the teacher), ``student`` (layers 4 -> 2,
    oBERT block4 to 75 %, distilled from the dense folder for QA and from ``self`` - the dense model it
    starts from - for tokens) and ``qat`` (QAT of the student), all by the stock scripts."""
    work = tmp_path_factory.mktemp("qa-tokens")
    base = save_tiny_base(work / "base")
    runs, folders = [], {}
    for task, source in (("question-answering", SQUAD), ("token-classification", CONLL)):
        root = work / task
        data = root / "data"
        (prepare_squad if task == "question-answering" else prepare_conll)(source, data)
        dense, student, qat = root / "dense", root / "student", root / "qat"
        teacher = str(dense) if task == "question-answering" else "self"
        student_recipe = STUDENT_RECIPE.replace("%(keys)s", TASKS[task]["keys"])
        qat_recipe = QAT_RECIPE.replace("%(head)s", TASKS[task]["head"])
        runs += [
            (task, stock_args(task, base, data, dense, DENSE_RECIPE)),
            (task, stock_args(task, dense, data, student, student_recipe, teacher)),
            (task, stock_args(task, student, data, qat, qat_recipe)),
        ]
        folders[task] = {"data": data, "dense": dense, "student": student, "qat": qat}
    stock_runs(runs, work)
    # SparseML's file logger is per process: one log holds every run's modifier losses
    folders["logs"] = "".join(p.read_text() for p in sorted((work / "sparse_logs").glob("**/*.log")))
    return folders


def _encoder_state(folder: Path) -> dict:
    import torch

    state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    return {
        name: value
        for name, value in state.items()
        if ".encoder.layer." in name
        and name.endswith(("query.weight", "key.weight", "value.weight", "dense.weight"))
    }


@pytest.mark.integration
@pytest.mark.parametrize("task", list(TASKS))
def test_stock_scripts_prune_drop_distill_and_quantize(trained, task):
    folders = trained[task]
    for stage in ("student", "qat"):
        config = json.loads((folders[stage] / "config.json").read_text())
        assert config["num_hidden_layers"] == 2, stage  # LayerDropModifier shrank the model
        weights = _encoder_state(folders[stage])
        assert {int(name.split(".")[3]) for name in weights} == {0, 1}
        zeros = sum(int((w == 0).sum()) for w in weights.values())
        sparsity = zeros / sum(w.numel() for w in weights.values())
        assert sparsity >= 0.75 - 1e-3, (stage, sparsity)  # oBERT reached its target (kept through QAT)
        for w in weights.values():  # block4: whole groups of 4 consecutive inputs are zero or not
            blocks = (w.reshape(w.shape[0], -1, 4) == 0).sum(-1)
            assert bool(((blocks == 0) | (blocks == 4)).all())
    import torch

    qat_state = torch.load(folders["qat"] / "pytorch_model.bin", map_location="cpu", weights_only=True)
    assert any(name.endswith("weight_fake_quant.scale") for name in qat_state)
    head = TASKS[task]["head"]
    assert not any(name.startswith(head) and "fake_quant" in name for name in qat_state)  # excluded
    keys = ["start_logits", "end_logits"] if task == "question-answering" else ["logits"]
    # distillation ran on every training step of both students (the only runs with the modifier)
    states = [json.loads((trained[t]["student"] / "trainer_state.json").read_text()) for t in TASKS]
    steps = [state["global_step"] for state in states]
    assert trained["logs"].count("OBertDistillationModifier/distillation_loss [") == sum(steps) > 0
    recipe = (folders["student"] / "recipe.yaml").read_text()
    assert all(key in recipe for key in keys) and "!OBertDistillationModifier" in recipe
    results = json.loads((folders["dense"] / "eval_results.json").read_text())
    metrics = ("eval_exact_match", "eval_f1") if task == "question-answering" else (
        "eval_precision", "eval_recall", "eval_f1")  # fmt: skip
    assert all(name in results for name in metrics)


@pytest.mark.integration
def test_token_labels_are_tag_names_in_config(trained):
    config = json.loads((trained["token-classification"]["student"] / "config.json").read_text())
    assert sorted(config["id2label"].values()) == json.loads(
        (trained["token-classification"]["data"] / "data.json").read_text()
    )["labels"]


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> dict:
    """FP32 exports of the pruned students (export API) and INT8 exports of the QAT models (the
    ``obert export`` command for QA, the API for tokens); each passed its parity check."""
    from obert_modifiers.export import export_deployment

    out = tmp_path_factory.mktemp("qa-tokens-exports")
    folders = {}
    for task in TASKS:
        fp32 = out / f"{task}-fp32"
        export_deployment(trained[task]["student"], fp32, task=task, sequence_length=SEQ, progress=False)
        int8 = out / f"{task}-int8"
        if task == "question-answering":
            done = subprocess.run(
                [str(BIN / "obert"), "export", str(trained[task]["qat"]), "--task", task, "--out", str(int8),
                 "--sequence-length", str(SEQ)],
                env=_env(), capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr[-4000:]
        else:
            export_deployment(trained[task]["qat"], int8, task=task, sequence_length=SEQ, progress=False)
        folders[task] = {"fp32": fp32, "int8": int8}
    return folders


@pytest.mark.integration
@pytest.mark.parametrize("task", list(TASKS))
def test_exports_keep_structure_and_pass_parity(exported, task):
    from obert_modifiers.deployment import DeploymentManifest

    for kind in ("fp32", "int8"):
        manifest = DeploymentManifest.read(exported[task][kind])
        assert manifest.task == task and manifest.num_layers == 2
        assert manifest.quantized == (kind == "int8")
        assert manifest.sparsity.overall >= 0.75 - 1e-3
        assert manifest.parity.max_abs_diff <= manifest.parity.tolerance * 10
    config = json.loads((exported[task]["fp32"] / "config.json").read_text())
    if task == "token-classification":
        assert set(config["id2label"].values()) >= {"B-PER", "I-ORG", "O"}


def _questions() -> list[tuple[str, str]]:
    document = json.loads(SQUAD.read_text())
    paragraphs = [p for article in document["data"] for p in article["paragraphs"]]
    return [(qa["question"], p["context"]) for p in paragraphs for qa in p["qas"]]


def _sentences() -> list[str]:
    return [" ".join(s["tokens"]) for s in read_conll(CONLL)]


def _torch_engine(model, input_names):
    """An ``engine_forward`` for a DeepSparse pipeline that runs the PyTorch model: the pipeline's own
    pre- and post-processing around PyTorch outputs, so answers and tags compare like for like."""
    import torch

    def forward(engine_inputs, context=None):
        with torch.no_grad():
            arrays = zip(input_names, engine_inputs, strict=True)
            output = model(**{name: torch.from_numpy(array).long() for name, array in arrays})
        keys = ["start_logits", "end_logits"] if "start_logits" in output else ["logits"]
        return [output[k].numpy() for k in keys]

    return forward


def _answers(task: str, folder: Path, engine: str, model=None) -> list:
    from deepsparse import Pipeline

    options = {"doc_stride": DOC_STRIDE, "max_answer_length": 15} if task == "question-answering" else {}
    pipeline = Pipeline.create(
        task=task, model_path=str(folder), engine_type=engine, sequence_length=SEQ, num_cores=1, **options
    )
    if model is not None:
        pipeline.engine_forward = _torch_engine(model, pipeline.onnx_input_names)
    if task == "question-answering":
        outputs = [pipeline(question=question, context=context) for question, context in _questions()]
        return [(o.start, o.end, o.answer) for o in outputs]
    found = []
    for sentence in _sentences():
        predictions = pipeline(inputs=sentence).predictions[0]
        found.append([(p.index, p.word, p.entity) for p in predictions])
    return found


@pytest.mark.integration
@pytest.mark.parametrize("task", list(TASKS))
def test_deepsparse_and_onnxruntime_pipelines_answer_like_pytorch(trained, exported, task):
    """The exported folders in DeepSparse's own pipelines (its engine and ONNX Runtime) give the same
    answers (QA: the same span of every question, contexts split with the doc stride) and the same
    tags (tokens, by name) as the PyTorch model.

    INT8: ONNX Runtime runs the integer graph and must agree with the fake-quantized PyTorch model.
    DeepSparse is checked on the FP32 export only: on this AVX2 machine (no VNNI) it runs INT8 through
    emulated kernels (its own warning: "Generating emulated code for quantized (INT8) operations since
    no VNNI instructions were detected") whose rounding may move a near-tied answer of a barely trained
    tiny model, which would say nothing about the export."""
    from obert_modifiers.export.loading import load_model

    fp32_model, _, _ = load_model(trained[task]["student"], task)
    reference = _answers(task, exported[task]["fp32"], "onnxruntime", model=fp32_model)
    assert any(reference), "the model predicts nothing: the comparison would be empty"
    assert _answers(task, exported[task]["fp32"], "onnxruntime") == reference
    assert _answers(task, exported[task]["fp32"], "deepsparse") == reference

    int8_model, _, _ = load_model(trained[task]["qat"], task)
    int8_reference = _answers(task, exported[task]["int8"], "onnxruntime", model=int8_model)
    assert _answers(task, exported[task]["int8"], "onnxruntime") == int8_reference


# ------------------------------------------------------------------------------ export / benchmark inputs


def save_tiny_head(out: Path, task: str) -> Path:
    """A tiny random BERT with a QA head or a token head (tag names as its labels), as a trained
    folder looks to ``obert export``."""
    import torch
    from transformers import BertConfig, BertForQuestionAnswering, BertForTokenClassification

    from obert_modifiers.models import TOKENIZER_FILES, minilm_l6_dir

    torch.manual_seed(0)
    tags = ["B-LOC", "B-PER", "I-PER", "O"] if task == "token-classification" else ["start", "end"]
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, id2label=dict(enumerate(tags)),
        label2id={tag: i for i, tag in enumerate(tags)},
    )  # fmt: skip
    model_class = BertForQuestionAnswering if task == "question-answering" else BertForTokenClassification
    out.mkdir(parents=True)
    model_class(config).save_pretrained(out, safe_serialization=False)
    for name in TOKENIZER_FILES:
        shutil.copyfile(minilm_l6_dir() / name, out / name)
    return out


def test_qa_parity_samples_are_question_context_pairs_in_doc_stride_windows():
    from transformers import AutoTokenizer

    from obert_modifiers.export.parity import SAMPLE_QA_PAIRS, qa_sample_batches
    from obert_modifiers.models import minilm_l6_dir

    tokenizer = AutoTokenizer.from_pretrained(minilm_l6_dir())
    names = ["input_ids", "attention_mask", "token_type_ids"]
    for length in (8, 64, 384):
        batches = qa_sample_batches(tokenizer, names, length)
        (_, windows), (_, full), (_, single) = batches
        assert windows["input_ids"].shape[1] <= length and full["input_ids"].shape[1] == length
        assert (windows["token_type_ids"] == 1).any()  # the context is the second segment
        if length >= 64:
            assert len(windows["input_ids"]) > len(SAMPLE_QA_PAIRS) or length == 384
            assert len(single["input_ids"]) >= 2  # the long context needs more than one window
            cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
            for row in single["input_ids"]:
                assert row[0] == cls and (row == sep).sum() == 2  # [CLS] question [SEP] context [SEP]


@pytest.mark.parametrize("task", list(TASKS))
def test_export_and_benchmark_take_each_tasks_inputs(task, tmp_path):
    from obert_modifiers.bench.runner import make_inputs, run_benchmark, task_of
    from obert_modifiers.export import export_deployment
    from obert_modifiers.export.parity import SAMPLE_QA_PAIRS, SAMPLE_TEXTS

    model_dir = save_tiny_head(tmp_path / "model", task)
    result = export_deployment(model_dir, tmp_path / "deploy", task=task, sequence_length=32, progress=False)
    config = json.loads((tmp_path / "deploy" / "config.json").read_text())
    if task == "token-classification":  # tag names stay strings (DeepSparse's pipeline reads them)
        assert config["id2label"] == {"0": "B-LOC", "1": "B-PER", "2": "I-PER", "3": "O"}
    if task == "question-answering":
        # 4 pairs windowed twice, plus a long context's windows: more samples than pairs or texts
        assert result.num_samples > 2 * len(SAMPLE_QA_PAIRS) + 2
        assert result.num_samples != len(SAMPLE_TEXTS) + 4
    else:
        assert result.num_samples == len(SAMPLE_TEXTS) + 4
    assert task_of(tmp_path / "deploy") == task
    inputs = make_inputs(tmp_path / "deploy" / "model.onnx", 2, 32, task=task)
    if task == "question-answering":
        types = inputs["token_type_ids"][0]
        assert types[0] == 0 and types[-1] == 1
        assert inputs["input_ids"][0][8] == 102  # [SEP] after the question (a quarter of 32)
    else:
        assert not inputs["token_type_ids"].any()
    (ort,) = run_benchmark(tmp_path / "deploy", engines=["onnxruntime"], sequence_length=32, seconds=0.2,
                           warmup_seconds=0.05)  # fmt: skip
    assert ort.ok, ort.error


# ------------------------------------------------------------------------------ model card metrics

STOCK_EVAL_RESULTS = {
    # as the stock scripts write eval_results.json (squad metric: 0-100; seqeval: 0-1)
    "question-answering": {"epoch": 30.0, "eval_exact_match": 81.5, "eval_f1": 88.25, "eval_samples": 10784},
    "token-classification": {
        "epoch": 3.0, "eval_accuracy": 0.98, "eval_f1": 0.91, "eval_loss": 0.05, "eval_precision": 0.9,
        "eval_recall": 0.92, "eval_runtime": 3.1, "eval_samples": 3250, "eval_samples_per_second": 1000.0,
    },
}  # fmt: skip


@pytest.mark.parametrize("task", list(TASKS))
def test_model_card_carries_the_tasks_metrics(task, tmp_path):
    from obert_modifiers.zoo.card import card_facts
    from obert_modifiers.zoo.card.render import render_body

    folder = tmp_path / "trained"
    folder.mkdir()
    head = "BertForQuestionAnswering" if task == "question-answering" else "BertForTokenClassification"
    config = {"architectures": [head], "model_type": "bert", "num_hidden_layers": 2}
    if task == "token-classification":
        config["finetuning_task"] = "ner"  # what the stock token script records
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "eval_results.json").write_text(json.dumps(STOCK_EVAL_RESULTS[task]))
    card = card_facts(folder)
    assert card.task == task
    names = [m.name for m in card.metrics]
    if task == "question-answering":
        assert names == ["exact_match", "f1"] and card.metrics[1].value == 88.25
    else:
        assert names == ["precision", "recall", "f1", "accuracy"]
        assert [m.value for m in card.metrics[:3]] == [0.9, 0.92, 0.91]
    body = render_body(card, {})
    assert ("SQuAD's (0-100)" if task == "question-answering" else "seqeval's entity-level") in body
    assert "| recall |" in body or task == "question-answering"


@pytest.mark.integration
def test_model_card_from_a_stock_token_run(trained):
    from obert_modifiers.zoo.card import card_facts

    card = card_facts(trained["token-classification"]["student"])
    assert card.task == "token-classification" and card.num_layers == 2
    assert [m.name for m in card.metrics][:3] == ["precision", "recall", "f1"]
    card = card_facts(trained["question-answering"]["dense"])
    assert card.task == "question-answering" and [m.name for m in card.metrics] == ["exact_match", "f1"]


# ------------------------------------------------------------------------------ the paper's SQuAD recipes

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SQUAD_RECIPES = {
    # file: (mask_type, init_sparsity, final_sparsity, fisher_block_size, kept layers or None)
    "squad_12layer_unstructured80.yaml": ("unstructured", 0.7, 0.8, 50, None),
    "squad_12layer_unstructured90.yaml": ("unstructured", 0.7, 0.9, 50, None),
    "squad_12layer_block4_80.yaml": ("block4", 0.7, 0.8, 32, None),
    "squad_12layer_block4_90.yaml": ("block4", 0.7, 0.9, 32, None),
    "squad_3layer_unstructured80.yaml": ("unstructured", 0.3, 0.8, 50, 3),
}


@pytest.mark.parametrize("name", list(SQUAD_RECIPES))
def test_paper_squad_recipes_pass_obert_recipe_check(name):
    """`obert recipe check` loads each ported recipe through SparseML with our tags, and the values are
    the paper's: 30 epochs, pruning steps every 4 epochs from 2 to 26 (cubic, global), 1024 gradients,
    distillation of start/end logits at hardness 1.0 and temperature 2.0."""
    import typer
    from typer.testing import CliRunner

    from obert_modifiers import commands

    app = typer.Typer()
    commands.register(app)  # the `obert` command's own registration of `recipe check`
    result = CliRunner().invoke(app, ["recipe", "check", str(RECIPES / name), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["max_epochs"] == 30 and not summary["warnings"]
    by_tag = {}
    for modifier in summary["modifiers"]:
        by_tag.setdefault(modifier["tag"], []).append(modifier)
    (prune,) = by_tag["OBertPruningModifier"]
    mask, init, final, block, layers = SQUAD_RECIPES[name]
    params = prune["params"]
    assert (prune["start_epoch"], prune["end_epoch"]) == (2.0, 26.0)
    assert (params["mask_type"], params["init_sparsity"], params["final_sparsity"]) == (mask, init, final)
    assert params["fisher_block_size"] == block and params["num_grads"] == 1024 and params["damp"] == 1e-7
    assert params["update_frequency"] == 4.0 and params["inter_func"] == "cubic" and params["global_sparsity"]
    (distill,) = by_tag["OBertDistillationModifier"]
    assert distill["params"]["distill_output_keys"] == ["start_logits", "end_logits"]
    assert (distill["params"]["hardness"], distill["params"]["temperature"]) == (1.0, 2.0)
    schedules = by_tag["LearningRateFunctionModifier"]
    rates = sorted((m["params"]["lr_func"], m["params"]["init_lr"]) for m in schedules)
    assert rates == [("cyclic_linear", 8e-5), ("linear", 8e-5)]
    if layers is None:
        assert "LayerDropModifier" not in by_tag
    else:
        assert by_tag["LayerDropModifier"][0]["params"]["keep"] == layers
