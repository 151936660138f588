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


def test_start_up_watches_the_modules_the_fix_table_names(tmp_path, monkeypatch):
    """A ``standalone`` fix added to compat.FIXES is applied when its module is imported, with no
    change to the start-up code: the watched modules come from the table, not from a list in the hook.
    Importing it applies that fix only: a SparseML-only fix stays unapplied in a process without
    SparseML's modifiers, even when the module it patches is imported too."""
    from obert_modifiers import compat, registration

    (tmp_path / "obert_standalone_probe.py").write_text("PATCHED = False\n")
    (tmp_path / "obert_sparseml_only_probe.py").write_text("PATCHED = False\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def patch_probe(module):
        module.PATCHED = True

    standalone = compat.Fix("probe_fix", patch_probe, ("obert_standalone_probe",), standalone=True)
    sparseml_only = compat.Fix("sparseml_only_fix", patch_probe, ("obert_sparseml_only_probe",))
    monkeypatch.setattr(compat, "FIXES", {"probe_fix": standalone, "sparseml_only_fix": sparseml_only})
    monkeypatch.setattr(compat, "_scheduled", False)
    monkeypatch.setattr(registration, "_installed", False)
    monkeypatch.delenv(compat.DISABLE_ENV, raising=False)
    assert compat.trigger_modules() == ("obert_standalone_probe",)

    registration.install()
    import obert_sparseml_only_probe
    import obert_standalone_probe

    assert obert_standalone_probe.PATCHED is True
    assert ("probe_fix", "obert_standalone_probe") in compat.applied_fixes()
    assert obert_sparseml_only_probe.PATCHED is False
    assert compat._scheduled is False  # noqa: SLF001 - apply_all did not run


def test_the_shipped_triggers_are_the_deepsparse_modules_and_transformers_model_building():
    from obert_modifiers import compat

    assert set(compat.trigger_modules()) == {
        "deepsparse.transformers.pipelines.pipeline",
        "deepsparse.utils.onnx",
        "transformers.modeling_utils",  # structure_config: shrunk models load without SparseML too
    }
