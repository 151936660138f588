"""Register our recipe modifiers, third-party plugin modifiers and the compat fixes with SparseML
(called by the start-up hook when SparseML's PyTorch modifiers are imported).

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
import importlib.metadata
import logging
import warnings

MODIFIER_MODULES = (
    "obert_modifiers.modifiers.obert_pruning",
    "obert_modifiers.modifiers.layer_drop",
    "obert_modifiers.modifiers.quantization",
    "obert_modifiers.modifiers.distillation",
)
ENTRY_POINT_GROUP = "obert_modifiers.modifiers"

_LOGGER = logging.getLogger(__name__)
_done = False


class PluginLoadWarning(RuntimeWarning):
    """A plugin advertised under ``obert_modifiers.modifiers`` could not be imported."""


def plugin_entry_points() -> list[importlib.metadata.EntryPoint]:
    """Entry points of installed distributions in the ``obert_modifiers.modifiers`` group, by name."""
    return sorted(
        importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: (ep.name, ep.value)
    )


def load_plugins() -> list[str]:
    """Import every advertised plugin module; returns the entry-point values loaded.

    A plugin that fails to import is reported (warning naming the distribution, the entry point and
    the error) and skipped, so one broken plugin does not stop runs that do not use it.
    """
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
        _LOGGER.debug(f"obert_modifiers: loaded modifier plugin {entry_point.value} from {origin}")
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
