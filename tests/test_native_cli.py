"""``obert train TASK`` on the native engine (the modern venv has no SparseML): the stock scripts'
flags, text classification and question answering end to end, one-line errors, and the question
answering pipeline (windows, post-processing, SQuAD scores) checked against gold answers."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers", reason="needs transformers (the [modern] extra)")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the native adapter targets transformers 5 (the modern venv)", allow_module_level=True)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from obert_modifiers.data import prepare_conll, prepare_squad  # noqa: E402
from obert_modifiers.models import TOKENIZER_FILES, save_tiny_bert  # noqa: E402
from obert_modifiers.native import ner, qa  # noqa: E402
from obert_modifiers.native.train import read_records  # noqa: E402

OBERT = Path(sys.executable).parent / "obert"
SQUAD = Path(__file__).parent / "fixtures" / "squad_small.json"
RECIPE = """
num_epochs: 2
modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: eval(num_epochs)
  - !OBertPruningModifier
    params: ["re:bert.encoder.layer.*.(attention.self.(query|key|value)|intermediate.dense).weight"]
    init_sparsity: 0.5
    final_sparsity: 0.5
    start_epoch: 1.0
    end_epoch: 1.0
    update_frequency: 1.0
    num_grads: 8
    fisher_block_size: 16
  - !OBertDistillationModifier
    hardness: 0.5
"""


def obert(*args, env=None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "OBERT_TRAIN_ENGINE": "native", **(env or {})}
    return subprocess.run(
        [str(OBERT), *map(str, args)], capture_output=True, text=True, env=environment, timeout=300
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("native-cli")
    save_tiny_bert(root / "model", num_labels=2, labels=["neg", "pos"], num_layers=2)
    rng = random.Random(0)
    words = "good bad great awful fine poor nice terrible".split()
    for split, count in (("train", 48), ("validation", 16)):
        with open(root / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["sentence", "label"])
            for _ in range(count):
                text = rng.choices(words, k=6)
                writer.writerow(
                    [" ".join(text), "pos" if text[0] in ("good", "great", "fine", "nice") else "neg"]
                )
    (root / "recipe.yaml").write_text(RECIPE)
    return root


def test_text_classification_with_a_recipe(workdir):
    out = workdir / "tc-out"
    result = obert(
        "train",
        "text-classification",
        "--model_name_or_path",
        workdir / "model",
        "--recipe",
        workdir / "recipe.yaml",
        "--recipe_args",
        '{"num_epochs": 3}',
        "--distill_teacher",
        "self",
        "--train_file",
        workdir / "train.csv",
        "--validation_file",
        workdir / "validation.csv",
        "--output_dir",
        out,
        "--per_device_train_batch_size",
        "16",
        "--learning_rate",
        "1e-3",
        "--max_seq_length",
        "16",
        "--do_train",
        "--do_eval",
        "--seed",
        "3",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--disable_tqdm",
        "true",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "all_results.json").read_text())
    assert metrics["epoch"] == 3.0  # recipe_args moved the recipe's end, which sets the epochs
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"}  # sorted string labels, as the stock script
    assert (
        "num_epochs: 3" not in (out / "recipe.yaml").read_text()
        and "end_epoch: 3" in (out / "recipe.yaml").read_text()
    )
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    pruned = [
        p
        for n, p in model.named_parameters()
        if n.endswith("query.weight") or "intermediate.dense.weight" in n
    ]
    assert sum(int((p == 0).sum()) for p in pruned) / sum(p.numel() for p in pruned) == pytest.approx(
        0.5, abs=0.01
    )


def test_question_answering_with_a_recipe(workdir, tmp_path):
    prepare_squad(SQUAD, tmp_path / "squad")
    model_dir = tmp_path / "qa-model"
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    transformers.BertForQuestionAnswering(config).save_pretrained(model_dir)
    for name in TOKENIZER_FILES:
        shutil.copy(workdir / "model" / name, model_dir / name)
    out = tmp_path / "qa-out"
    result = obert(
        "train",
        "question-answering",
        "--model_name_or_path",
        model_dir,
        "--recipe",
        workdir / "recipe.yaml",
        "--distill_teacher",
        "self",
        "--train_file",
        tmp_path / "squad" / "train.json",
        "--validation_file",
        tmp_path / "squad" / "validation.json",
        "--output_dir",
        out,
        "--per_device_train_batch_size",
        "8",
        "--max_seq_length",
        "64",
        "--doc_stride",
        "16",
        "--do_train",
        "--do_eval",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--disable_tqdm",
        "true",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "eval_results.json").read_text())
    assert set(metrics) >= {"eval_exact_match", "eval_f1", "eval_samples"}
    assert 0.0 <= metrics["eval_exact_match"] <= metrics["eval_f1"] <= 100.0
    assert (out / "recipe.yaml").is_file() and (out / "model.safetensors").is_file()


def test_qa_windows_and_postprocessing_recover_the_gold_answers(workdir):
    """Logits that point at the labelled positions of each window give back every gold answer that
    fits in a window (exact match 100 on them); short windows with a stride exercise the overflow."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(workdir / "model")
    records = qa.flatten_squad(json.loads(SQUAD.read_text())["data"])[:12]
    train = qa.train_features(records, tokenizer, 48, 16, "max_length")
    evaluation = qa.eval_features(records, tokenizer, 48, 16, "max_length")
    assert len(train["input_ids"]) == len(evaluation["input_ids"]) > len(records)  # contexts were split
    start = np.full((len(train["input_ids"]), 48), -10.0)
    end = np.full_like(start, -10.0)
    for index, (s, e) in enumerate(zip(train["start_positions"], train["end_positions"], strict=True)):
        if s:  # 0: the CLS position, the answer is not in this window
            start[index, s], end[index, e] = 10.0, 10.0
    predictions = qa.postprocess(records, evaluation, start, end)
    found = [r for r in records if predictions[r["id"]]]
    assert len(found) >= len(records) // 2
    assert qa.squad_scores(found, predictions)["exact_match"] == 100.0
    assert qa.squad_scores(found, {r["id"]: "" for r in found})["f1"] == 0.0


def test_errors_are_one_line(workdir, tmp_path):
    result = obert(
        "train",
        "masked-language-modeling",
        "--model_name_or_path",
        workdir / "model",
        "--output_dir",
        tmp_path,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: task 'masked-language-modeling' does not run on the native engine yet (it runs "
        "text-classification, question-answering, token-classification); use the SparseML stack "
        "(make venv) for it"
    ]
    result = obert(
        "train",
        "text-classification",
        "--model_name_or_path",
        workdir / "model",
        "--do_train",
        "--train_file",
        tmp_path / "missing.csv",
        "--output_dir",
        tmp_path / "o",
    )
    assert result.returncode == 1 and result.stderr.strip().endswith("missing.csv: no such file")
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(RECIPE.replace("re:bert.encoder", "re:roberta.encoder"))
    result = obert(
        "train",
        "text-classification",
        "--model_name_or_path",
        workdir / "model",
        "--do_train",
        "--recipe",
        recipe,
        "--train_file",
        workdir / "train.csv",
        "--output_dir",
        tmp_path / "o",
        "--report_to",
        "none",
    )
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("error: !OBertPruningModifier: recipe key 'params': 're:roberta.encoder.layer.*")
    )


def test_read_records_reads_csv_json_and_json_lines(tmp_path):
    (tmp_path / "a.csv").write_text("sentence,label\nhi,pos\n")
    (tmp_path / "b.json").write_text(json.dumps({"data": [{"sentence": "hi", "label": "pos"}]}))
    (tmp_path / "c.json").write_text(
        '{"sentence": "hi", "label": "pos"}\n{"sentence": "yo", "label": "neg"}\n'
    )
    assert read_records(tmp_path / "a.csv", "--train_file") == [{"sentence": "hi", "label": "pos"}]
    assert read_records(tmp_path / "b.json", "--train_file") == [{"sentence": "hi", "label": "pos"}]
    assert len(read_records(tmp_path / "c.json", "--train_file")) == 2
    assert read_records(SQUAD, "--train_file")[0].keys() >= {"id", "context", "question", "answers"}


def test_token_classification_with_a_recipe(workdir, tmp_path):
    prepare_conll(Path(__file__).parent / "fixtures" / "conll_small.txt", tmp_path / "conll")
    out = tmp_path / "ner-out"
    result = obert(
        "train", "token-classification", "--model_name_or_path", workdir / "model",
        "--recipe", workdir / "recipe.yaml",
        "--distill_teacher", "disable", "--train_file", tmp_path / "conll" / "train.json",
        "--validation_file", tmp_path / "conll" / "validation.json", "--output_dir", out,
        "--per_device_train_batch_size", "4", "--max_seq_length", "32", "--do_train", "--do_eval",
        "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
    )  # fmt: skip
    assert result.returncode == 1  # a checkpoint with another task's head: one line naming the flag
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"error: --model_name_or_path {workdir / 'model'}: cannot load it as "
            "AutoModelForTokenClassification"
        )
    )
    result = obert(*result.args[1:], "--ignore_mismatched_sizes")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "eval_results.json").read_text())
    assert {"eval_precision", "eval_recall", "eval_f1", "eval_accuracy"} <= set(metrics)
    config = json.loads((out / "config.json").read_text())
    tags = json.loads((tmp_path / "conll" / "data.json").read_text())["labels"]
    assert list(config["id2label"].values()) == sorted(tags)
    assert config["architectures"] == ["BertForTokenClassification"]


def test_entity_scores_follow_iob_spans():
    assert ner.entity_spans(["B-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG"]) == {
        ("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 5), ("ORG", 5, 6)
    }  # fmt: skip
    id2label = {0: "O", 1: "B-PER", 2: "I-PER"}
    labels = np.array([[-100, 1, 2, 0, 1, -100]])
    exact = np.eye(3)[[0, 1, 2, 0, 1, 0]][None]
    assert ner.entity_scores(exact, labels, id2label) == {
        "precision": 1.0,
        "recall": 1.0,
        "f1": 1.0,
        "accuracy": 1.0,
    }
    half = np.eye(3)[[0, 1, 0, 0, 1, 0]][None]  # the first entity cut short: one of two spans right
    scores = ner.entity_scores(half, labels, id2label)
    assert (scores["precision"], scores["recall"], scores["accuracy"]) == (0.5, 0.5, 0.75)


def test_the_integration_example_runs_a_repo_recipe(workdir, tmp_path):
    """integrations/huggingface/native_trainer.py: a training script of one's own with the two lines,
    the repo's 6-layer pruning recipe shortened by recipe_args, on the tiny model."""
    script = Path(__file__).parents[1] / "integrations" / "huggingface" / "native_trainer.py"
    args = '{"num_grads": 8, "fisher_block_size": 16, "prune_epochs": 2, "recovery_epochs": 1}'
    recipe = Path(__file__).parents[1] / "recipes" / "minilm_6l_prune.yaml"
    command = [sys.executable, script, workdir / "model", workdir / "train.csv", tmp_path / "out"]
    result = subprocess.run(
        [*map(str, command), "--recipe", str(recipe), "--recipe-args", args],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "saved" in result.stdout and (tmp_path / "out" / "recipe.yaml").is_file()
