"""An after-import mechanism: run callbacks right after given modules finish importing.

Pure mechanism, no project imports: :func:`install_finder` adds a tiny ``sys.meta_path`` finder that
finds nothing itself but wraps the loader of each watched module, and :func:`after_import` watches a
module. What is watched at start-up, and why, is decided by :mod:`obert_modifiers.registration`.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable

# module name -> callbacks to run once that module has executed (each at most once per process)
_AFTER_IMPORT: dict[str, list[Callable[[object], None]]] = {}
# watched modules whose import was already under way when the watch was added (nobody wrapped their
# loader): their callbacks run at the next import of anything once they have finished
_LATE: set = set()
# watched modules whose code has finished executing (their import may still be finishing up):
# a callback added for one of them, e.g. by another callback, runs at once
_EXECUTED: set = set()
_LOCK = threading.RLock()
_installed = False


def _run_callbacks(name: str, module: object) -> None:
    with _LOCK:
        callbacks = _AFTER_IMPORT.pop(name, [])
    for callback in callbacks:
        callback(module)


class _AfterImportLoader(importlib.abc.Loader):
    def __init__(self, name: str, wrapped: importlib.abc.Loader):
        self._name = name
        self._wrapped = wrapped

    def create_module(self, spec):
        return self._wrapped.create_module(spec)

    def exec_module(self, module):
        self._wrapped.exec_module(module)
        with _LOCK:
            _EXECUTED.add(self._name)
        _run_callbacks(self._name, module)

    def __getattr__(self, item):  # get_source, is_package, ... of the real loader
        return getattr(self._wrapped, item)


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of a watched module so callbacks run after it."""

    def find_spec(self, fullname, path=None, target=None):
        if _LATE:
            _run_late_callbacks()
        if fullname not in _AFTER_IMPORT:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _AfterImportLoader(fullname, spec.loader)
                return spec
        return None


def after_import(module_name: str, callback: Callable[[object], None]) -> None:
    """Run ``callback(module)`` once ``module_name`` is imported (now, if it already is)."""
    install_finder()
    module = sys.modules.get(module_name)
    if module is not None and (not _initializing(module) or module_name in _EXECUTED):
        callback(module)
        return
    with _LOCK:
        if module is not None and module_name not in _AFTER_IMPORT:
            _LATE.add(module_name)  # mid-import and not wrapped: finish it on a later import
        _AFTER_IMPORT.setdefault(module_name, []).append(callback)


def _run_late_callbacks() -> None:
    for name in list(_LATE):
        module = sys.modules.get(name)
        if module is not None and not _initializing(module):
            _LATE.discard(name)
            _run_callbacks(name, module)


def _initializing(module: object) -> bool:
    spec = getattr(module, "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


def install_finder() -> None:
    """Put the after-import finder first on ``sys.meta_path`` (idempotent, cheap)."""
    global _installed
    with _LOCK:
        if _installed:
            return
        _installed = True
        sys.meta_path.insert(0, _AfterImportFinder())
