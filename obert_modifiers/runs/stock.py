"""Training with SparseML's STOCK ``sparseml.transformers.train.text_classification`` command.

One place for what ``obert demo``, ``obert train``, the benchmarks and the tests share:

- :data:`OFFLINE_ENV`, the environment every run gets (models and data come from packages; nothing
  calls home), and :func:`offline_env` / :func:`apply_offline_env` to use it;
- :func:`stock_script` and :func:`train_command`, the one builder of the stock command line;
- :func:`run_logged`, which runs a command with all its output in a log file and reports the
  command's tqdm step counter as it goes.

Pure standard library: importing this module imports neither torch nor SparseML.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from obert_modifiers.errors import ObertError

# Offline by default. Tests and the Makefile set the same variables (make cannot import Python).
OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "NM_DISABLE_ANALYTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
STOCK_SCRIPT = "sparseml.transformers.train.text_classification"
# The trainer's tqdm counter, " 30%|███       | 12/40 [" at the start of a line: training first, then
# one bar per evaluation. Bars with a description ("Running tokenizer on dataset: ...", the oBERT
# modifier's "Collecting gradients: ...") are other work and are not counted.
PROGRESS_PATTERN = re.compile(r"(?:^|[\r\n]) *\d+%\|[^|\r\n]*\| *(\d+)/(\d+) \[")
LOG_TAIL_LINES = 25


class StockRunError(ObertError, RuntimeError):
    """A stock command exited non-zero; the message names it, its exit code, its log and the log's tail."""


def apply_offline_env() -> None:
    """Set :data:`OFFLINE_ENV` in this process, where the user has not set a value already."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def offline_env(threads: int | None = None, **extra: str) -> dict[str, str]:
    """The environment for a child run: this process's, with :data:`OFFLINE_ENV` where unset,
    unbuffered output (log lines as they happen), ``OMP_NUM_THREADS=threads`` if given, and ``extra``."""
    env = {**OFFLINE_ENV, **os.environ, "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env.update(extra)
    return env


def stock_script() -> list[str]:
    """The stock console script next to this interpreter (the same venv)."""
    script = Path(sys.executable).parent / STOCK_SCRIPT
    if script.exists():
        return [str(script)]
    # installed without console scripts: the same entry point through the interpreter
    return [
        sys.executable,
        "-c",
        "import sys; from sparseml.transformers.text_classification import main; sys.exit(main())",
    ]


def train_args(
    model: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    recipe: str | os.PathLike,
    *,
    seq: int,
    batch: int,
    seed: int | None = None,
    recipe_args: Mapping[str, Any] | None = None,
    teacher: str | os.PathLike | None = None,
    logging_steps: int | None = None,
    evaluate: bool = False,
    predict: bool = False,
    final_bin_only: bool = False,
    extra: Sequence[object] = (),
) -> list[str]:
    """The stock script's arguments: train ``model`` on ``data/train.csv`` (``data/validation.csv``
    for the trainer's evaluation) into ``out`` with ``recipe``.

    ``evaluate`` adds ``--do_eval`` (batch 64), ``predict`` scores ``data/test.csv`` too
    (``predict_results_*.txt``); ``teacher`` is ``--distill_teacher`` (a folder, or ``"disable"``);
    ``final_bin_only`` saves no checkpoints and the final model as ``pytorch_model.bin`` only (SparseML
    1.8 reloads a model's QAT / layer-drop structure only from it) and loads data in this process;
    ``extra`` are further arguments, passed unchanged."""
    data = Path(data)
    args = [
        "--model_name_or_path", str(model),
        "--train_file", str(data / "train.csv"),
        "--validation_file", str(data / "validation.csv"),
        "--do_train",
        "--max_seq_length", str(seq),
        "--per_device_train_batch_size", str(batch),
        "--output_dir", str(out),
        "--overwrite_output_dir",
        "--report_to", "none",
        "--recipe", str(recipe),
    ]  # fmt: skip
    if evaluate:
        args += ["--do_eval", "--per_device_eval_batch_size", "64"]
    if predict:
        args += ["--test_file", str(data / "test.csv"), "--do_predict"]
    if final_bin_only:
        args += ["--save_strategy", "no", "--save_safetensors", "False", "--dataloader_num_workers", "0"]
    if seed is not None:
        args += ["--seed", str(seed)]
    if logging_steps is not None:
        args += ["--logging_steps", str(logging_steps)]
    if recipe_args:
        args += ["--recipe_args", json.dumps(dict(recipe_args))]
    if teacher is not None:
        args += ["--distill_teacher", str(teacher)]
    return args + [str(a) for a in extra]


def train_command(
    model: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    recipe: str | os.PathLike,
    **kwargs: Any,
) -> list[str]:
    """The whole stock training command line: :func:`stock_script`, then :func:`train_args`."""
    return [*stock_script(), *train_args(model, data, out, recipe, **kwargs)]


ProgressCallback = Callable[[int, int, int], None]


def run_logged(
    command: Sequence[str],
    log: str | os.PathLike,
    on_progress: ProgressCallback | None = None,
    *,
    cwd: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    what: str | None = None,
    on_start: Callable[[subprocess.Popen], None] | None = None,
) -> None:
    """Run ``command`` with its stdout and stderr in the file ``log`` (flushed as it comes, so
    ``tail -f`` follows it).

    ``on_progress(done, total, bar)`` is called whenever the command's tqdm counter moves; ``bar``
    counts the progress bars seen (0: training, then one per evaluation). ``env`` defaults to
    :func:`offline_env`; ``on_start`` receives the process (to terminate it from elsewhere).
    Raises :class:`StockRunError` naming ``what`` (default: the program), the exit code, the log and
    its last lines when the command fails."""
    log_path = Path(log)
    totals: list[int] = []
    last: tuple[int, int] | None = None
    carry = ""  # text after the last counter seen (a counter may be split across reads)
    with open(log_path, "wb") as handle:
        process = subprocess.Popen(
            list(command),
            cwd=cwd,
            env=dict(env) if env is not None else offline_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        if on_start is not None:
            on_start(process)
        assert process.stdout is not None
        while chunk := process.stdout.read1(4096):
            handle.write(chunk)
            handle.flush()
            if on_progress is None:
                continue
            text = carry + chunk.decode("utf-8", "replace")
            end = 0
            for match in PROGRESS_PATTERN.finditer(text):  # every counter, in order
                done, total = int(match[1]), int(match[2])
                end = match.end()
                if not totals or (total != totals[-1] and done <= 1):
                    totals.append(total)
                if (done, total) != last:
                    last = (done, total)
                    on_progress(done, total, len(totals) - 1)
            carry = text[end:][-200:]
        code = process.wait()
    if code != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        name = what or Path(command[0]).name
        raise StockRunError(f"{name} failed (exit {code}); log: {log_path}\n" + "\n".join(tail))

