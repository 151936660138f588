"""Third-party logs go to the run's log file; the screen keeps the run's own steps, progress and tables.

SparseML (its ONNX graph transforms log a dozen INFO lines per export), DeepSparse (temporary-file
notices), transformers ("Some weights ... newly initialized ... You should probably TRAIN this
model") and Python warnings all write to the console through :mod:`logging` or :mod:`warnings`.
Inside :func:`third_party_logs` every record goes to one file instead:

- the root logger's handlers are replaced by a handler on the file;
- every library logger that writes to the console itself (a ``StreamHandler`` on stdout/stderr, as
  SparseML, DeepSparse and transformers install) writes to the file instead, also when the library
  is first imported inside the block;
- warnings are captured into logging (``py.warnings``).

The run's own progress bars and messages (``tqdm``/``rich`` on the console, not logging) stay on the
screen, and so do the two lines DeepSparse's native engine prints when it first loads (its banner and
a CPU-feature warning: written by C++ straight to the terminal, not through Python).

Everything is restored on exit. Used by ``obert demo`` and ``obert export``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _LogFile(logging.FileHandler):
    """The run's log file, opened at the first record (a run that logs nothing, or fails on its
    argument checks, leaves no file and creates no folder); a log that cannot be written never
    breaks the run it records (the run's own error says what is wrong with the place)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, mode="a", encoding="utf-8", delay=True)

    def emit(self, record: logging.LogRecord) -> None:
        if not Path(self.baseFilename).parent.is_dir():
            return
        super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        pass


def log_beside(target: str | os.PathLike) -> Path:
    """``<target>.log`` next to the folder or file ``target`` (``runs/x/deployment`` ->
    ``runs/x/deployment.log``): outside the folder, so the folder's contents stay the contract's."""
    target = Path(target)
    return target.parent / f"{target.name}.log"


def _is_console(handler: logging.Handler) -> bool:
    if isinstance(handler, logging.FileHandler) or not isinstance(handler, logging.StreamHandler):
        return False
    stream = getattr(handler, "stream", None)
    consoles = {sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__}
    return stream in consoles or getattr(stream, "name", None) in ("<stdout>", "<stderr>")


@contextlib.contextmanager
def third_party_logs(log_file: str | os.PathLike) -> Iterator[Path]:
    """Route logging records and warnings to ``log_file`` (appended) for the block."""
    path = Path(log_file)
    file_handler = _LogFile(path)
    file_handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    saved_root = list(root.handlers)
    original_add = logging.Logger.addHandler
    moved: list[tuple[logging.Logger, logging.Handler, bool]] = []  # (logger, handler, its propagate)

    def reroute(logger: logging.Logger) -> None:
        # the library's own console handler gives way to the file; records do not also reach the
        # root (which writes to the same file), and a library that sets propagate=False keeps working
        for handler in [h for h in logger.handlers if _is_console(h)]:
            moved.append((logger, handler, logger.propagate))
            logger.removeHandler(handler)
            if file_handler not in logger.handlers:
                original_add(logger, file_handler)
            logger.propagate = False

    def add_handler(logger: logging.Logger, handler: logging.Handler) -> None:
        # a library imported inside the block installs its console handler now: send it our way
        original_add(logger, handler)
        if logger is not root:
            reroute(logger)

    root.handlers = [file_handler]
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            reroute(logger)
    logging.Logger.addHandler = add_handler  # type: ignore[method-assign]
    logging.captureWarnings(True)
    try:
        yield path
    finally:
        logging.captureWarnings(False)
        logging.Logger.addHandler = original_add  # type: ignore[method-assign]
        for logger, handler, propagate in reversed(moved):
            logger.removeHandler(file_handler)
            original_add(logger, handler)
            logger.propagate = propagate
        root.handlers = saved_root
        file_handler.close()

