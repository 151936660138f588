"""The model hub: model cards, a SparseZoo-style hub server, and its client.

``write_card(dir)`` writes ``model.md`` + plots; ``push(folder, stub, url, token)`` publishes;
``pull(stub)`` downloads (returns a Hugging Face folder usable as ``--model_name_or_path``);
``local_hub(root_dir)`` (``zoo/local.py``) runs a throwaway server on loopback. Nothing here imports torch.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "write_card": ("obert_modifiers.zoo.card", "write_card"),
    "read_card": ("obert_modifiers.zoo.card", "read_card"),
    "ModelCard": ("obert_modifiers.zoo.card", "ModelCard"),
    "CardError": ("obert_modifiers.zoo.card", "CardError"),
    "push": ("obert_modifiers.zoo.client", "push"),
    "pull": ("obert_modifiers.zoo.client", "pull"),
    "resolve": ("obert_modifiers.zoo.client", "resolve"),
    "search": ("obert_modifiers.zoo.client", "search"),
    "delete": ("obert_modifiers.zoo.client", "delete"),
    "local_hub": ("obert_modifiers.zoo.local", "local_hub"),
    "roundtrip": ("obert_modifiers.zoo.local", "roundtrip"),
    "start_hub": ("obert_modifiers.zoo.local", "start_hub"),
    "HubClientError": ("obert_modifiers.zoo.client", "HubClientError"),
    "parse_stub": ("obert_modifiers.zoo.stubs", "parse_stub"),
    "StubError": ("obert_modifiers.zoo.stubs", "StubError"),
    "create_app": ("obert_modifiers.zoo.server", "create_app"),
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'obert_modifiers.zoo' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value
