"""Prepared data: de-duplication, stratified fixed-seed splits, label names, atomic writes."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from obert_modifiers import data


@pytest.fixture(scope="module")
def rt_full(tmp_path_factory):
    out = tmp_path_factory.mktemp("rt") / "full"
    info = data.prepare("rt", out)
    return out, info


def _texts(path):
    return [text for text, _ in data.read_csv(path)]


def test_rt_counts_match_the_measured_split(rt_full):
    out, info = rt_full
    # DATA.md: 12,808 fresh/rotten snippets, stratified 85/15 gave a 1,913-snippet test split, majority 0.578
    assert info["dedup"]["raw"] == 12808
    assert info["counts"]["test"] == 1913
    assert info["majority_class_test_accuracy"] == pytest.approx(0.578, abs=0.001)
    assert info["labels"] == ["negative", "positive"]
    assert json.loads((out / "data.json").read_text()) == info
    total = sum(info["counts"].values())
    assert total == info["dedup"]["unique"] - info["dedup"]["conflicting_labels_dropped"]


def test_splits_are_disjoint_and_deduplicated(rt_full):
    out, _ = rt_full
    splits = {s: _texts(out / f"{s}.csv") for s in data.SPLITS}
    for split, texts in splits.items():
        assert len(texts) == len(set(texts)), f"{split} has repeated texts"
    assert not set(splits["train"]) & set(splits["test"])
    assert not set(splits["validation"]) & set(splits["test"])
    assert not set(splits["train"]) & set(splits["validation"])


def test_splits_are_stratified(rt_full):
    out, info = rt_full
    overall = Counter()
    for split in data.SPLITS:
        overall.update(label for _, label in data.read_csv(out / f"{split}.csv"))
    share = overall["positive"] / sum(overall.values())
    for split in data.SPLITS:
        counts = info["label_counts"][split]
        n = sum(counts.values())
        assert abs(counts["positive"] - share * n) <= 1.0, (split, counts)


def test_test_split_does_not_depend_on_slice_sizes(rt_full, tmp_path):
    out, _ = rt_full
    small = data.prepare("rt", tmp_path / "small", max_train=300, max_eval=50)
    assert small["counts"] == {"train": 300, "validation": 50, "test": 1913}
    assert (tmp_path / "small" / "test.csv").read_bytes() == (out / "test.csv").read_bytes()
    # a smaller slice is a subset of the full training / validation sets
    assert set(_texts(tmp_path / "small" / "train.csv")) <= set(_texts(out / "train.csv"))
    assert set(_texts(tmp_path / "small" / "validation.csv")) <= set(_texts(out / "validation.csv"))
    assert small["label_counts"]["train"] == {"negative": 127, "positive": 173}


def test_seed_fixes_the_split(tmp_path):
    a = data.prepare("bbc", tmp_path / "a", max_train=100, max_eval=20, seed=7)
    b = data.prepare("bbc", tmp_path / "b", max_train=100, max_eval=20, seed=7)
    c = data.prepare("bbc", tmp_path / "c", max_train=100, max_eval=20, seed=8)
    assert a["counts"] == b["counts"] == c["counts"]
    for split in data.SPLITS:
        name = f"{split}.csv"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "test.csv").read_bytes() != (tmp_path / "c" / "test.csv").read_bytes()


def test_bbc_and_tweets_label_names(tmp_path):
    bbc = data.prepare("bbc", tmp_path / "bbc", max_train=50, max_eval=10)
    assert bbc["labels"] == ["business", "entertainment", "politics", "sports", "tech"]
    assert bbc["majority_class_test_accuracy"] == pytest.approx(0.238, abs=0.001)  # DATA.md
    assert {label for _, label in data.read_csv(tmp_path / "bbc" / "train.csv")} == set(bbc["labels"])
    tweets = data.prepare("tweets", tmp_path / "tweets", max_train=60, max_eval=30)
    assert tweets["labels"] == ["negative", "neutral", "positive"]
    assert tweets["dedup"]["raw"] == 38158  # DATA.md
    assert tweets["dedup"]["conflicting_labels_dropped"] > 0
    # latin-1 source text arrives as valid UTF-8 in the CSV
    assert (tmp_path / "tweets" / "test.csv").read_text(encoding="utf-8")


def test_deduplicate_normalises_and_drops_conflicts():
    rows = [("a  b", "x"), ("a b", "x"), ("c", "x"), ("c", "y"), ("  ", "x"), ("d", "y")]
    kept, stats = data.deduplicate(rows)
    assert kept == [("a b", "x"), ("d", "y")]
    assert stats == {"raw": 6, "unique": 3, "conflicting_labels_dropped": 1}


def test_split_rows_is_independent_of_input_order():
    rows = [(f"text {i}", "a" if i % 3 else "b") for i in range(200)]
    first = data.split_rows(rows, seed=1)
    second = data.split_rows(list(reversed(rows)), seed=1)
    assert first == second
    assert len(first["test"]) == 30  # ceil(0.15 * 200)
    assert Counter(label for _, label in first["test"]) == {"a": 20, "b": 10}


def test_bad_input_is_named(tmp_path):
    with pytest.raises(data.DataPrepareError, match="unknown data set 'sst2'"):
        data.prepare("sst2", tmp_path / "x")
    with pytest.raises(data.DataPrepareError, match="max_train = 0"):
        data.prepare("bbc", tmp_path / "x", max_train=0)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(data.DataPrepareError, match="notes.txt"):
        data.prepare("bbc", foreign)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_rewrite_replaces_whole_and_leaves_no_temp_folders(tmp_path):
    out = tmp_path / "bbc"
    data.prepare("bbc", out, max_train=40, max_eval=10)
    info = data.prepare("bbc", out, max_train=20, max_eval=10)
    assert info["counts"]["train"] == 20
    assert len(data.read_csv(out / "train.csv")) == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bbc"]
    assert sorted(p.name for p in out.iterdir()) == sorted(data.OUTPUT_FILES)


def test_a_failed_rewrite_keeps_the_earlier_output_whole(tmp_path, monkeypatch):
    """Killed half way (here: the disk fails on the third file), a rewrite leaves the earlier
    output exactly as it was and no staging or moved-aside folder."""
    out = tmp_path / "bbc"
    data.prepare("bbc", out, max_train=40, max_eval=10)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_write = data._write_csv

    def failing_write(path, rows):
        if path.name == "test.csv":
            raise OSError(28, "No space left on device")
        real_write(path, rows)

    monkeypatch.setattr(data, "_write_csv", failing_write)
    with pytest.raises(OSError, match="No space left"):
        data.prepare("bbc", out, max_train=20, max_eval=10)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["bbc"]


def test_an_unwritable_output_is_a_one_line_error_naming_it(tmp_path):
    from obert_modifiers.errors import ObertError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ObertError, match=f"cannot write {blocker / 'out'}: {blocker} is a file"):
        data.prepare("bbc", blocker / "out", max_train=20, max_eval=10)
    assert blocker.read_text() == "x" and [p.name for p in tmp_path.iterdir()] == ["file"]
