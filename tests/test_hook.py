"""The start-up hook's after-import mechanism, in isolation (no SparseML needed)."""

from __future__ import annotations

import importlib.util
import sys
import types

from obert_modifiers import _hook


def _fake_module(name: str, initializing: bool) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.util.spec_from_loader(name, loader=None)
    module.__spec__._initializing = initializing
    sys.modules[name] = module
    return module


def test_callback_runs_at_once_for_an_imported_module():
    hits = []
    _hook.after_import("json", lambda module: hits.append(module.__name__))
    assert hits == ["json"]


def test_callback_runs_after_a_watched_module_finishes_importing(tmp_path, monkeypatch):
    (tmp_path / "obert_hook_probe.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    _hook.after_import("obert_hook_probe", lambda module: seen.append(module.VALUE))
    assert seen == []
    import obert_hook_probe  # noqa: F401

    assert seen == [42]


def test_callback_added_while_the_module_is_mid_import_still_runs(tmp_path, monkeypatch):
    (tmp_path / "obert_hook_later_import.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = _fake_module("obert_hook_mid_import", initializing=True)
    try:
        hits = []
        _hook.after_import("obert_hook_mid_import", lambda m: hits.append(m.__name__))
        assert hits == []  # not finished yet
        module.__spec__._initializing = False
        import obert_hook_later_import  # noqa: F401  any later import lets the hook notice

        assert hits == ["obert_hook_mid_import"]
    finally:
        sys.modules.pop("obert_hook_mid_import", None)
