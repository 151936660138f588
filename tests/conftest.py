"""Shared fixtures. Every test runs offline (no hub, no analytics) and single-threaded, so the
suite behaves the same on a busy 2-core CI box."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from obert_modifiers.runs.stock import OFFLINE_ENV as PACKAGE_OFFLINE_ENV

OFFLINE_ENV = {**PACKAGE_OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
os.environ.update(OFFLINE_ENV)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A tiny random BertForSequenceClassification (4 layers, hidden 32) with the MiniLM-L6
    WordPiece tokenizer and string labels, saved as pytorch_model.bin."""
    from obert_modifiers.models import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), num_labels=5)


@pytest.fixture(scope="session")
def bbc_data_dir(tmp_path_factory) -> Path:
    """train/validation/test CSVs (columns sentence,label with label names) for a BBC slice."""
    from obert_modifiers.data import prepare

    out = tmp_path_factory.mktemp("bbc")
    prepare("bbc", out, max_train=320, max_eval=80)
    return out
