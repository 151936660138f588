"""What happens at interpreter start-up, and what registers our recipe tags with SparseML.

The package installs ``obert_modifiers_hook.pth`` into site-packages; Python executes its one line
at every interpreter start, which calls :func:`install`. That watches a few modules with
:func:`obert_modifiers._hook.after_import` and nothing else: no torch, no SparseML, no YAML is
imported until a process imports SparseML itself. Then:

* ``sparseml.pytorch.sparsification`` (SparseML's PyTorch modifiers, the recipe-tag registry):
  :func:`register_all` applies the compat fixes and registers our four modifier classes and any
  plugin modifiers, so the stock console scripts, the exporter and anything re-reading a saved
  ``recipe.yaml`` resolve our tags.
* every module of :func:`obert_modifiers.compat.trigger_modules` (libraries used without SparseML,
  e.g. DeepSparse pipelines on a pulled model, transformers loading a shrunk model): the
  ``standalone`` fixes of that module are applied, and no other.

SparseZoo and DeepSparse analytics are switched off here by default (``NM_DISABLE_ANALYTICS``),
so a training run makes no network calls; set ``OBERT_ALLOW_ANALYTICS=1`` to leave it to them.

Importing a module that defines a class decorated with ``@PyTorchModifierYAML()`` is what
registers its ``!Tag`` with SparseML's (PyYAML's global) recipe loader; this imports ours, then
every module that an installed distribution advertises under the entry-point group
``obert_modifiers.modifiers`` (SparseML itself has no plugin discovery), e.g. in a plugin's
``pyproject.toml``::

    [project.entry-points."obert_modifiers.modifiers"]
    my_modifiers = "my_package.modifiers"
"""

from __future__ import annotations

import importlib
import os
import warnings

from obert_modifiers import _hook

MODIFIER_MODULES = (
    "obert_modifiers.modifiers.obert_pruning",
    "obert_modifiers.modifiers.layer_drop",
    "obert_modifiers.modifiers.quantization",
    "obert_modifiers.modifiers.distillation",
    "obert_modifiers.modifiers.ziplm",
)
ENTRY_POINT_GROUP = "obert_modifiers.modifiers"
MODIFIERS_MODULE = "sparseml.pytorch.sparsification"

_done = False
_installed = False


class PluginLoadWarning(RuntimeWarning):
    """A plugin advertised under ``obert_modifiers.modifiers`` could not be imported."""


def plugin_entry_points() -> list[importlib.metadata.EntryPoint]:
    """Entry points of installed distributions in the ``obert_modifiers.modifiers`` group, by name."""
    import importlib.metadata  # not at module level: this module is imported at every interpreter start

    return sorted(
        importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: (ep.name, ep.value)
    )


def load_plugins() -> list[str]:
    """Import every advertised plugin module; returns the entry-point values loaded.

    A plugin that fails to import is reported (warning naming the distribution, the entry point and
    the error) and skipped, so one broken plugin does not stop runs that do not use it.
    """
    import logging

    loaded = []
    for entry_point in plugin_entry_points():
        dist = getattr(entry_point, "dist", None)
        origin = f"{dist.name} {dist.version}" if dist is not None else "unknown distribution"
        try:
            entry_point.load()
        except Exception as error:  # a plugin's bug must not break every SparseML process
            warnings.warn(
                f"obert_modifiers: could not load modifier plugin {entry_point.name} = {entry_point.value!r} "
                f"from {origin} (entry-point group {ENTRY_POINT_GROUP!r}): {type(error).__name__}: {error}; "
                "recipes using its tags will not resolve",
                PluginLoadWarning,
                stacklevel=2,
            )
            continue
        logging.getLogger(__name__).debug(f"loaded modifier plugin {entry_point.value} from {origin}")
        loaded.append(entry_point.value)
    return loaded


def register_all() -> None:
    """Apply every compat fix, then import our modifier modules and plugin modules (idempotent)."""
    global _done
    if _done:
        return
    _done = True
    from obert_modifiers import compat

    compat.apply_all()
    for name in MODIFIER_MODULES:
        importlib.import_module(name)
    load_plugins()


def _register(_module: object) -> None:
    register_all()


def _apply_standalone(module: object) -> None:
    from obert_modifiers import compat

    compat.apply_standalone(module.__name__)  # type: ignore[attr-defined]


def install() -> None:
    """The start-up hook (the ``.pth`` line, and ``import obert_modifiers``): idempotent and cheap."""
    global _installed
    if _installed:
        return
    _installed = True
    if os.environ.get("OBERT_ALLOW_ANALYTICS", "0") != "1":
        os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
    # SparseML 1.8 imports pkg_resources (setuptools < 81 is pinned for it); its deprecation
    # notice on every SparseML start says nothing a user can act on
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    from obert_modifiers import compat

    _hook.after_import(MODIFIERS_MODULE, _register)
    for module_name in compat.trigger_modules():
        _hook.after_import(module_name, _apply_standalone)
