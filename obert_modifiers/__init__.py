"""obert-modifiers: oBERT pruning, layer dropping, QAT and distillation for SparseML recipes.

Importing this package is cheap: it does not import torch or SparseML. It makes sure our recipe
tags (``!OBertPruningModifier``, ``!LayerDropModifier``, ``!OBertQuantizationModifier``,
``!OBertDistillationModifier``, ``!ZipLMPruningModifier``) and the SparseML 1.8 compatibility fixes
are registered with SparseML: at once if SparseML's PyTorch modifiers are already imported,
otherwise the moment they are. The public names below are loaded on first use.
"""

from obert_modifiers import registration
from obert_modifiers.version import __version__

registration.install()

# public name -> (module, attribute); attribute None means the module itself
_LAZY = {
    "OBertPruningModifier": ("obert_modifiers.modifiers.obert_pruning", "OBertPruningModifier"),
    "LayerDropModifier": ("obert_modifiers.modifiers.layer_drop", "LayerDropModifier"),
    "ZipLMPruningModifier": ("obert_modifiers.modifiers.ziplm", "ZipLMPruningModifier"),
    "OBertQuantizationModifier": ("obert_modifiers.modifiers.quantization", "OBertQuantizationModifier"),
    "OBertDistillationModifier": ("obert_modifiers.modifiers.distillation", "OBertDistillationModifier"),
    "export_deployment": ("obert_modifiers.export", "export_deployment"),
    "run_benchmark": ("obert_modifiers.bench", "run_benchmark"),
    "zoo": ("obert_modifiers.zoo", None),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    import importlib

    if name not in _LAZY:
        raise AttributeError(f"module 'obert_modifiers' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value
