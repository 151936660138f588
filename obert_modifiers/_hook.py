"""Lazy start-up hook: run our code right after given SparseML modules finish importing.

The package installs ``obert_modifiers_hook.pth`` into site-packages; Python executes its one line
at every interpreter start, which calls :func:`install`. That adds a tiny ``sys.meta_path`` finder
and nothing else: no torch, no SparseML, no YAML is imported until a process imports SparseML
itself. When one of the watched modules finishes executing, its callbacks run:

* ``sparseml.pytorch.sparsification`` (SparseML's PyTorch modifiers, the recipe-tag registry):
  apply the compat fixes and register our four modifier classes, so the stock console scripts,
  the exporter and anything re-reading a saved ``recipe.yaml`` resolve our tags.
* further modules registered by :mod:`obert_modifiers.compat` for fixes that patch them.

SparseZoo and DeepSparse analytics are switched off here by default (``NM_DISABLE_ANALYTICS``),
so a training run makes no network calls; set ``OBERT_ALLOW_ANALYTICS=1`` to leave it to them.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import threading
import warnings
from collections.abc import Callable

# module name -> callbacks to run once that module has executed (each at most once per process)
_AFTER_IMPORT: dict[str, list[Callable[[object], None]]] = {}
# watched modules whose import was already under way when the watch was added (nobody wrapped their
# loader): their callbacks run at the next import of anything once they have finished
_LATE: set = set()
_LOCK = threading.RLock()
_installed = False

MODIFIERS_MODULE = "sparseml.pytorch.sparsification"
DEEPSPARSE_PIPELINE_MODULE = "deepsparse.transformers.pipelines.pipeline"
DEEPSPARSE_ONNX_MODULE = "deepsparse.utils.onnx"  # imported by `import deepsparse` itself


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
    module = sys.modules.get(module_name)
    if module is not None and not _initializing(module):
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


def _register_with_sparseml(_module: object) -> None:
    from obert_modifiers import registration

    registration.register_all()


def _schedule_compat(_module: object) -> None:
    from obert_modifiers import compat

    compat.apply_all()  # schedules lazily: patches only what is (or gets) imported


def install() -> None:
    """Install the finder and the SparseML watch (idempotent, cheap)."""
    global _installed
    with _LOCK:
        if _installed:
            return
        _installed = True
        if os.environ.get("OBERT_ALLOW_ANALYTICS", "0") != "1":
            os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
        # SparseML 1.8 imports pkg_resources (setuptools < 81 is pinned for it); its deprecation
        # notice on every SparseML start says nothing a user can act on
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        sys.meta_path.insert(0, _AfterImportFinder())
    after_import(MODIFIERS_MODULE, _register_with_sparseml)
    # DeepSparse pipelines are used without SparseML too (deployment, models pulled by stub)
    after_import(DEEPSPARSE_PIPELINE_MODULE, _schedule_compat)
    after_import(DEEPSPARSE_ONNX_MODULE, _schedule_compat)
