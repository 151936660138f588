"""Register our recipe modifiers and the compat fixes with SparseML (called by the start-up hook).

Importing a module that defines a class decorated with ``@PyTorchModifierYAML()`` is what
registers its ``!Tag`` with SparseML's (PyYAML's global) recipe loader; this imports ours.
"""

from __future__ import annotations

import importlib

MODIFIER_MODULES = (
    "obert_modifiers.modifiers.obert_pruning",
    "obert_modifiers.modifiers.layer_drop",
    "obert_modifiers.modifiers.quantization",
    "obert_modifiers.modifiers.distillation",
)

_done = False


def register_all() -> None:
    """Apply every compat fix, then import our modifier modules (idempotent)."""
    global _done
    if _done:
        return
    _done = True
    from obert_modifiers import compat

    compat.apply_all()
    for name in MODIFIER_MODULES:
        importlib.import_module(name)
