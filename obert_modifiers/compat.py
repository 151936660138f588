"""Named fixes for SparseML 1.8 on the pinned stack (torch 2.13, transformers 4.40, accelerate 0.28,
datasets 2.18). This is the only place where the project patches SparseML or its dependencies.

Each fix is one function ``fix(module)`` that patches ``module`` in place; its docstring says what
breaks without it. :func:`apply_all` (called by :mod:`obert_modifiers.registration` when SparseML's
PyTorch modifiers are imported, or one of :func:`trigger_modules`) schedules every fix lazily with
:func:`obert_modifiers._hook.after_import`: a fix runs the moment the module it patches finishes
importing (at once if it already has), so importing SparseML's modifiers does not pull in
transformers, datasets or the exporters.

Disable fixes with ``OBERT_COMPAT_DISABLE=name1,name2`` (``all`` disables every one); the tests use
this to prove that each fix is needed. ``docs/compat.md`` describes each fix for users.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from obert_modifiers import _hook

__all__ = [
    "DISABLE_ENV",
    "FIXES",
    "BUNDLED_METRICS",
    "METRICS_DIR",
    "apply_all",
    "trigger_modules",
    "disabled_fixes",
    "applied_fixes",
    "qconfig_slots",
    "grad_sampler_loader",
    "onnx_dynamo_export",
    "safetensors_reload",
    "reload_relative_path",
    "safetensors_qat_detect",
    "offline_metrics",
    "rng_state_resume",
    "scheduled_optimizer_state",
    "deepsparse_pipeline_inplace",
    "deepsparse_shape_override_inplace",
    "recipe_structure",
    "structure_config",
    "empty_weight_sparsity",
    "ziplm_resume",
]

DISABLE_ENV = "OBERT_COMPAT_DISABLE"
METRICS_DIR = Path(__file__).resolve().parent / "_metric_scripts"
# metric names the stock SparseML scripts pass to datasets.load_metric, served from METRICS_DIR
BUNDLED_METRICS = ("accuracy", "seqeval", "squad", "squad_v2", "glue")


def _logger():  # logging is imported on first use: this module is imported at every interpreter start
    import logging

    return logging.getLogger(__name__)


# attribute on a patched function: the fixes applied to it, so each applies once
_PATCHED = "_obert_compat_fixes"
# (fix name, module name) pairs applied in this process
_applied: set[tuple[str, str]] = set()
_scheduled = False


def _patched(function: Any, fix: str) -> bool:
    return fix in getattr(function, _PATCHED, ())


def _mark(wrapper: Any, original: Any, fix: str) -> Any:
    """Record on ``wrapper`` the fixes already on ``original`` plus ``fix`` (several may stack)."""
    setattr(wrapper, _PATCHED, (*getattr(original, _PATCHED, ()), fix))
    return wrapper


# --------------------------------------------------------------------------------------------
# QAT: torch QConfig has __slots__
# --------------------------------------------------------------------------------------------


def qconfig_slots(module: ModuleType) -> None:
    """QAT: give SparseML QConfig objects that accept its ``quantization_scheme`` attribute.

    Without it: in torch 2.13 ``torch.ao.quantization.QConfig`` (a namedtuple subclass) declares
    ``__slots__ = ()`` (torch 2.3 did not). ``QuantizationScheme.get_qconfig`` then fails on
    ``qconfig.quantization_scheme = self`` with ``AttributeError: 'QConfig' object has no attribute
    'quantization_scheme'``: every QAT recipe (``QuantizationModifier``, ``!OBertQuantizationModifier``)
    fails in training and again at export of a QAT model.

    Patch: ``module._get_qconfig`` (SparseML's QConfig factory in ``quantization_scheme``) returns an
    instance of a QConfig subclass without ``__slots__`` (it has a ``__dict__``), still a QConfig
    for every ``isinstance`` check in torch.
    """
    original = module._get_qconfig
    if _patched(original, "qconfig_slots"):
        return

    @functools.wraps(original)
    def _get_qconfig(*args: Any, **kwargs: Any) -> Any:
        qconfig = original(*args, **kwargs)
        return _qconfig_with_dict(type(qconfig))(*qconfig)

    _mark(_get_qconfig, original, "qconfig_slots")
    module._get_qconfig = _get_qconfig


QCONFIG_CLASS = "QConfigWithScheme"  # a module attribute, so pickled QAT modules load again


@functools.cache
def _qconfig_with_dict(qconfig_type: type) -> type:
    if "__dict__" in dir(qconfig_type) or not hasattr(qconfig_type, "__slots__"):
        return qconfig_type
    # a subclass that does not declare __slots__ gets a per-instance __dict__
    cls = type(QCONFIG_CLASS, (qconfig_type,), {"__module__": __name__, "__qualname__": QCONFIG_CLASS})
    globals()[QCONFIG_CLASS] = cls
    return cls


def __getattr__(name: str) -> Any:
    # unpickling a QAT module in a process where the fix has not run yet
    if name == QCONFIG_CLASS:
        from torch.ao.quantization import QConfig

        return _qconfig_with_dict(QConfig)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------
# OBS gradient sampler: DataLoader rebuilt from loader.__dict__
# --------------------------------------------------------------------------------------------


def grad_sampler_loader(module: ModuleType) -> None:
    """OBS / oBERT gradient sampling: build the sampler's loader as a plain torch DataLoader.

    Without it: SparseML's ``RecipeManagerTrainerInterface._data_loader_builder`` (the loader that
    ``OBSPruningModifier`` and ``!OBertPruningModifier`` draw their gradient batches from) copies
    the trainer's train loader as ``type(loader)(**loader.__dict__)``. With accelerate the loader is
    a ``DataLoaderShard``: accelerate 0.28 fails with ``TypeError: DataLoader.__init__() got an
    unexpected keyword argument 'gradient_state'`` (1.x: ``missing 1 required positional argument:
    'dataset'``), so OBS pruning cannot start.

    Patch: a ``torch.utils.data.DataLoader`` over the trainer's train dataset (unused columns
    removed, as the trainer does) with the trainer's collator, ``per_device_train_batch_size`` and
    shuffling, overridden by the recipe's ``grad_sampler_kwargs`` (e.g. ``batch_size``); it yields
    ``([], inputs, labels)`` forever, as SparseML's builder does.
    """
    interface = module.RecipeManagerTrainerInterface
    original = interface._data_loader_builder
    if _patched(original, "grad_sampler_loader"):
        return

    @functools.wraps(original)
    def _data_loader_builder(self: Any, kwargs: dict[str, Any] | None = None) -> Iterator[Any]:
        data_loader = _grad_sampler_data_loader(self, kwargs)
        while True:  # the sampler draws as many batches as it needs
            for batch in data_loader:
                labels = None
                if self.label_smoother is not None and "labels" in batch:
                    labels = batch.pop("labels")
                yield [], self._prepare_inputs(batch), labels

    _mark(_data_loader_builder, original, "grad_sampler_loader")
    interface._data_loader_builder = _data_loader_builder


def _grad_sampler_data_loader(trainer: Any, kwargs: dict[str, Any] | None) -> Any:
    import datasets
    from torch.utils.data import DataLoader

    if trainer.train_dataset is None:
        raise ValueError("gradient sampling needs a train dataset: pass --do_train and a train file")
    dataset = trainer.train_dataset
    collator = trainer.data_collator
    if isinstance(dataset, datasets.Dataset):
        dataset = trainer._remove_unused_columns(dataset, description="gradient sampling")
    else:
        collator = trainer._get_collator_with_removed_columns(collator, description="gradient sampling")
    options: dict[str, Any] = {
        "batch_size": trainer.args.per_device_train_batch_size,
        "shuffle": True,
        "collate_fn": collator,
        "num_workers": trainer.args.dataloader_num_workers,
        "pin_memory": trainer.args.dataloader_pin_memory,
    }
    options.update(kwargs or {})
    return DataLoader(dataset, **options)


# --------------------------------------------------------------------------------------------
# ONNX export: torch 2.13 defaults to the dynamo exporter
# --------------------------------------------------------------------------------------------


def onnx_dynamo_export(module: ModuleType) -> None:
    """ONNX export: make SparseML's ``torch.onnx.export`` calls use the TorchScript exporter.

    Without it: from torch 2.9 ``torch.onnx.export`` defaults to ``dynamo=True``, which imports
    ``onnxscript`` (not installed: it needs a newer onnx than DeepSparse's ``onnx<1.15``), so
    ``sparseml.transformers.export_onnx`` and ``obert export`` fail with ``ModuleNotFoundError: No
    module named 'onnxscript'``. SparseML's export code (QAT folding, opset 14 graphs) is written for
    the TorchScript exporter anyway.

    Patch: wrap ``torch.onnx.export`` so that calls made from SparseML's modules (``module`` is one
    of its exporter modules) get ``dynamo=False`` unless they pass ``dynamo`` themselves; calls from
    any other code keep torch's default.
    """
    import torch.onnx

    original = torch.onnx.export
    if _patched(original, "onnx_dynamo_export"):
        return

    @functools.wraps(original)
    def export(*args: Any, **kwargs: Any) -> Any:
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.split(".")[0] == "sparseml" and "dynamo" not in kwargs:
            kwargs["dynamo"] = False
        return original(*args, **kwargs)

    _mark(export, original, "onnx_dynamo_export")
    torch.onnx.export = export


# --------------------------------------------------------------------------------------------
# Structure reload ignores model.safetensors
# --------------------------------------------------------------------------------------------


def _weight_files(directory: str) -> tuple[list[str], list[str]]:
    """(pytorch_model*.bin files, model*.safetensors files) in ``directory``."""
    if not directory or not os.path.isdir(directory):
        return [], []
    names = sorted(os.listdir(directory))
    bins = [os.path.join(directory, n) for n in names if n.startswith("pytorch_model") and n.endswith(".bin")]
    tensors = [
        os.path.join(directory, n) for n in names if n.startswith("model") and n.endswith(".safetensors")
    ]
    return bins, tensors


def safetensors_reload(module: ModuleType) -> None:
    """Structure reload: read ``model*.safetensors`` when a checkpoint has no ``pytorch_model*.bin``.

    Without it: SparseML's ``Trainer._reload_model_state`` reloads a checkpoint's weights after the
    saved recipe has restructured the model (QAT wrappers, dropped layers) but looks only for
    ``pytorch_model*.bin``. transformers 4.40 saves ``model.safetensors`` by default, so the reload
    logs ``Model state was not reloaded for SparseML: could not find model weights`` and the
    restructured parameters keep their random initial values: a QAT model exports with random
    weights (accuracy at chance), silently.

    Patch: when the folder has safetensors files and no ``.bin``, reload from the safetensors files
    with the same steps as SparseML's method (channel-wise observer shapes, ``_load_pretrained_model``,
    warnings for missing / unexpected / mismatched keys); ``.bin`` folders take SparseML's own path.
    """
    interface = module.RecipeManagerTrainerInterface
    original = interface._reload_model_state
    if _patched(original, "safetensors_reload"):
        return

    @functools.wraps(original)
    def _reload_model_state(self: Any, load_path: str, orig_state_dict: dict[str, Any]) -> bool:
        bins, tensors = _weight_files(load_path)
        if bins or not tensors:
            return original(self, load_path, orig_state_dict)
        return _reload_from_safetensors(module, self, load_path, tensors, orig_state_dict)

    _mark(_reload_model_state, original, "safetensors_reload")
    interface._reload_model_state = _reload_model_state


def reload_relative_path(module: ModuleType) -> None:
    """Structure reload: work when the model folder is given as a relative path.

    Without it: ``Trainer._reload_model_state`` joins the folder onto file paths that already
    contain it (``os.path.join(load_path, os.path.join(load_path, f))``). With an absolute folder the
    second join is harmless; with a relative one, e.g. ``--model_name_or_path tiny`` or
    ``export_onnx --model_path model``, every recipe that restructures the model (QAT, layer
    pruning) fails with ``FileNotFoundError: [Errno 2] No such file or directory:
    'tiny/tiny/pytorch_model.bin'`` (found running the stock text-classification script).

    Patch: the method receives the folder as an absolute path.
    """
    interface = module.RecipeManagerTrainerInterface
    original = interface._reload_model_state
    if _patched(original, "reload_relative_path"):
        return

    @functools.wraps(original)
    def _reload_model_state(self: Any, load_path: str, orig_state_dict: dict[str, Any]) -> bool:
        if load_path and os.path.isdir(load_path):
            load_path = os.path.abspath(load_path)
        return original(self, load_path, orig_state_dict)

    _mark(_reload_model_state, original, "reload_relative_path")
    interface._reload_model_state = _reload_model_state


def _reload_from_safetensors(
    trainer_module: ModuleType,
    trainer: Any,
    load_path: str,
    files: list[str],
    orig_state_dict: dict[str, Any],
) -> bool:
    from safetensors.torch import load_file

    # per-channel observers start with placeholder shapes; size them as saved before loading
    trainer_module.initialize_channel_wise_scale_zp(trainer.model)
    current_state_dict = trainer.model.state_dict()
    if set(orig_state_dict) == set(current_state_dict):
        return False  # the recipe did not change the structure: from_pretrained loaded everything
    loaded: dict[str, Any] = {}
    for path in files:
        loaded.update(load_file(path, device="cpu"))
    _, missing, unexpected, mismatched, _, _ = trainer.model._load_pretrained_model(
        model=trainer.model,
        state_dict=loaded,
        loaded_keys=list(loaded),
        resolved_archive_file=None,
        pretrained_model_name_or_path=load_path,
        _fast_init=False,
    )
    for label, keys in (("Missing", missing), ("Unexpected", unexpected), ("Mismatched", mismatched)):
        if keys:
            _logger().warning(f"{label} keys when reloading model state for the SparseML recipe: {keys}")
    _logger().info(
        f"Reloaded {len(current_state_dict) - len(missing)} model params for SparseML Recipe "
        f"from {load_path} (safetensors)"
    )
    trainer_module.log_model_load(
        trainer.model,
        trainer.model_state_path,
        model_type="student" if trainer.teacher else "model",
        delayed_load=False,
    )
    return True


def safetensors_qat_detect(module: ModuleType) -> None:
    """Model load: detect a QAT checkpoint saved as ``model.safetensors`` too.

    Without it: ``SparseAutoModel._loadable_state_dict`` inspects only ``pytorch_model.bin`` to see
    whether a checkpoint holds QAT state. For a safetensors checkpoint it reports "not QAT", so the
    load logs the QAT parameters as unexpected / randomly initialized instead of announcing that they
    will be reloaded once the recipe has been applied (the reload itself is ``safetensors_reload``).

    Patch: when ``pytorch_model.bin`` is absent, read the key names (not the tensors) of the
    safetensors files and report a delayed QAT load the way SparseML does for ``.bin``.
    """
    sparse_auto_model = module.SparseAutoModel
    original = sparse_auto_model._loadable_state_dict
    if _patched(original, "safetensors_qat_detect"):
        return

    @functools.wraps(original)
    def _loadable_state_dict(model_name_or_path: str) -> tuple[dict[str, Any] | None, bool]:
        bins, tensors = _weight_files(model_name_or_path)
        if bins or not tensors:
            return original(model_name_or_path)
        from safetensors import safe_open

        keys: list[str] = []
        for path in tensors:
            with safe_open(path, framework="pt") as handle:
                keys.extend(handle.keys())
        if not any(k.endswith(".zero_point") or k.endswith(".observer_enabled") for k in keys):
            return None, False
        _logger().warning(
            "QAT state detected, ignore any loading errors, weights will reload "
            f"after SparseML recipes have been applied {model_name_or_path}"
        )
        return None, True

    _mark(_loadable_state_dict, original, "safetensors_qat_detect")
    sparse_auto_model._loadable_state_dict = staticmethod(_loadable_state_dict)


# --------------------------------------------------------------------------------------------
# load_metric("accuracy") reaches the internet
# --------------------------------------------------------------------------------------------


def offline_metrics(module: ModuleType) -> None:
    """Metrics: serve ``datasets.load_metric("accuracy")`` and friends from bundled scripts.

    Without it: the stock scripts call ``load_metric("accuracy")`` (text classification, masked
    language modeling), ``load_metric("glue", task)`` (text classification with ``--task_name``),
    ``load_metric("seqeval")`` (token classification) and ``load_metric("squad"|"squad_v2")``
    (question answering) even for local data. datasets 2.18 downloads those scripts from GitHub,
    so offline every run fails with ``OfflineModeIsEnabled: ... Tried to reach
    https://raw.githubusercontent.com/huggingface/datasets/2.18.0/metrics/accuracy/accuracy.py``
    (online it makes a network call from a user's training run).

    Patch: ``datasets.load.metric_module_factory`` (``module``) resolves the bare names in
    :data:`BUNDLED_METRICS` to our own scripts in ``obert_modifiers/_metric_scripts/``. A local
    ``NAME/NAME.py`` or path the user gives still wins, as in datasets.
    """
    original = module.metric_module_factory
    if _patched(original, "offline_metrics"):
        return

    @functools.wraps(original)
    def metric_module_factory(path: str, *args: Any, **kwargs: Any) -> Any:
        if (
            isinstance(path, str)
            and path in BUNDLED_METRICS
            and not os.path.isfile(os.path.join(path, f"{path}.py"))
        ):
            path = str(METRICS_DIR / f"{path}.py")
            if len(args) < 5:  # trust_remote_code not given positionally: our own file, shipped with us
                kwargs["trust_remote_code"] = True
        return original(path, *args, **kwargs)

    _mark(metric_module_factory, original, "offline_metrics")
    module.metric_module_factory = metric_module_factory


# --------------------------------------------------------------------------------------------
# Resume: transformers 4.40 reads its own RNG checkpoint with torch's new weights_only default
# --------------------------------------------------------------------------------------------


def rng_state_resume(module: ModuleType) -> None:
    """Resume: let the HF trainer read the ``rng_state.pth`` it wrote itself.

    Without it: torch >= 2.6 defaults ``torch.load`` to ``weights_only=True``; transformers 4.40's
    ``Trainer._load_rng_state`` loads ``rng_state.pth`` (Python, NumPy and torch RNG states, written
    by the same trainer) without saying otherwise, and the NumPy state is a pickled ``ndarray``. Every
    ``--resume_from_checkpoint`` run then fails with ``UnpicklingError: Weights only load failed ...
    numpy.core.multiarray._reconstruct``, so pruning/QAT schedules cannot be resumed at all.

    Patch: ``module.Trainer._load_rng_state`` runs inside ``torch.serialization.safe_globals`` with
    exactly the NumPy types an RNG state needs; ``weights_only`` stays on, nothing else is allowed.
    """
    trainer_cls = module.Trainer
    original = trainer_cls._load_rng_state
    if _patched(original, "rng_state_resume"):
        return

    @functools.wraps(original)
    def _load_rng_state(self: Any, checkpoint: Any) -> Any:
        import numpy
        import torch
        from numpy.core import multiarray

        allowed = [multiarray._reconstruct, numpy.ndarray, numpy.dtype, type(numpy.dtype(numpy.uint32))]
        with torch.serialization.safe_globals(allowed):
            return original(self, checkpoint)

    _mark(_load_rng_state, original, "rng_state_resume")
    trainer_cls._load_rng_state = _load_rng_state


# --------------------------------------------------------------------------------------------
# Training: SparseML's optimizer wrapper loses its optimizer's state under accelerate
# --------------------------------------------------------------------------------------------


def scheduled_optimizer_state(module: ModuleType) -> None:
    """Training with a recipe: the optimizer that steps is the one the LR scheduler drives and saves.

    Without it: SparseML's ``ScheduledOptimizer`` (the wrapper the trainer puts around AdamW when a
    recipe is given) subclasses ``torch.optim.Optimizer`` without calling its ``__init__`` and
    forwards missing attributes to AdamW through ``__getattr__``, but inherits ``state_dict``,
    ``load_state_dict`` and ``zero_grad`` from ``Optimizer``. accelerate 0.28's ``AcceleratedOptimizer``
    (``accelerator.prepare`` in the HF trainer) moves the optimizer state to the device with
    ``optimizer.load_state_dict(optimizer.state_dict())``; ``Optimizer.load_state_dict`` then writes
    fresh ``state`` and ``param_groups`` into the wrapper's own ``__dict__``, detached from AdamW's.
    From then on the LR scheduler (built on the wrapper) sets learning rates AdamW never reads (with no
    LR modifier AdamW steps at a constant ``--learning_rate`` while the trainer logs a linear decay; with
    one, the log shows a constant rate while AdamW follows the modifier), every checkpoint's
    ``optimizer.pt`` holds ``state: {}`` and its own copy of the groups, and ``--resume_from_checkpoint``
    loads the optimizer into the detached copy: Adam's moments restart from zero.

    Patch: ``module.ScheduledOptimizer`` gets ``state``, ``param_groups`` and ``defaults`` properties
    and ``state_dict`` / ``load_state_dict`` / ``zero_grad`` / ``add_param_group`` methods that all go
    to the optimizer it wraps, so nothing can be written beside it.
    """
    wrapper_cls = module.ScheduledOptimizer
    if _patched(wrapper_cls.__dict__.get("state_dict"), "scheduled_optimizer_state"):
        return

    def inner(self: Any) -> Any:
        return self._wrapper.wrapped_optimizer

    def forwarding(name: str) -> property:
        def get(self: Any) -> Any:
            return getattr(inner(self), name)

        def set_(self: Any, value: Any) -> None:
            setattr(inner(self), name, value)

        return property(get, set_, doc=f"The wrapped optimizer's ``{name}``.")

    def state_dict(self: Any) -> dict[str, Any]:
        return inner(self).state_dict()

    def load_state_dict(self: Any, state_dict: dict[str, Any]) -> None:
        inner(self).load_state_dict(state_dict)

    def zero_grad(self: Any, set_to_none: bool = True) -> None:
        inner(self).zero_grad(set_to_none=set_to_none)

    def add_param_group(self: Any, param_group: dict[str, Any]) -> None:
        inner(self).add_param_group(param_group)

    for name in ("state", "param_groups", "defaults"):
        setattr(wrapper_cls, name, forwarding(name))
    for method in (state_dict, load_state_dict, zero_grad, add_param_group):
        method.__qualname__ = f"{wrapper_cls.__qualname__}.{method.__name__}"
        _mark(method, wrapper_cls.__dict__.get(method.__name__), "scheduled_optimizer_state")
        setattr(wrapper_cls, method.__name__, method)


# --------------------------------------------------------------------------------------------
# DeepSparse: a transformers pipeline rewrites the model file it is given
# --------------------------------------------------------------------------------------------


def deepsparse_pipeline_inplace(module: ModuleType) -> None:
    """DeepSparse pipelines: leave the user's ``model.onnx`` as it is.

    Without it: ``deepsparse.Pipeline.create(task="text-classification", model_path=FOLDER)`` (and
    every DeepSparse transformers pipeline, also on a model downloaded by ``zoo:`` stub) calls
    ``overwrite_transformer_onnx_model_inputs(onnx_path, max_length=...)``, whose ``inplace``
    defaults to True: it saves the graph back over ``FOLDER/model.onnx`` with static inputs
    ``[1, sequence_length]``. The deployment folder silently loses its dynamic batch and sequence
    axes (ONNX Runtime then rejects any other shape: ``Got invalid dimensions for input``), its
    bytes no longer match ``export.json``'s figures or a hub's sha256, and a second pipeline with
    another sequence length rewrites it again.

    Patch: the pipeline module's reference to that function defaults to ``inplace=False``: DeepSparse
    then compiles a temporary copy with the static shapes it needs (its own code path, kept alive by
    the pipeline), and the folder is never written.
    """
    original = module.overwrite_transformer_onnx_model_inputs
    if _patched(original, "deepsparse_pipeline_inplace"):
        return

    @functools.wraps(original)
    def overwrite_transformer_onnx_model_inputs(path: str, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("inplace", False)
        return original(path, *args, **kwargs)

    _mark(overwrite_transformer_onnx_model_inputs, original, "deepsparse_pipeline_inplace")
    module.overwrite_transformer_onnx_model_inputs = overwrite_transformer_onnx_model_inputs


def deepsparse_shape_override_inplace(module: ModuleType) -> None:
    """DeepSparse's shape overrides: compile from a temporary copy, never rewrite the user's file.

    Without it: ``deepsparse.utils.onnx.override_onnx_input_shapes`` and
    ``override_onnx_batch_size`` default to ``inplace=True`` and save the graph with the static
    shapes back over the ONNX file they were given. They run whenever shapes are fixed: stock
    ``deepsparse.benchmark model.onnx --input_shapes ...`` (and ``-e onnxruntime`` at any batch
    size), ``deepsparse.debug_analysis -shapes ...``, ``deepsparse.Engine(model, input_shapes=...)``.
    A deployment folder checked by ``deepsparse.debug_analysis ... -shapes "[1,64],[1,64],[1,64]"``
    then holds a ``[1, 64]`` model: ONNX Runtime rejects every other shape (``Got invalid dimensions
    for input``), and the file no longer matches ``export.json`` or the hub's sha256.

    Patch: the two functions' ``inplace`` default becomes False (their own temporary-file path), on
    the function objects themselves, so every module that imported them by name gets it too.
    """
    for name in ("override_onnx_input_shapes", "override_onnx_batch_size"):
        function = getattr(module, name)
        original = getattr(function, "__wrapped__", function)  # under @contextlib.contextmanager
        if _patched(original, "deepsparse_shape_override_inplace"):
            continue
        defaults = original.__defaults__ or ()
        names = original.__code__.co_varnames[: original.__code__.co_argcount]
        if names[-1] != "inplace" or not defaults or defaults[-1] is not True:
            raise RuntimeError(f"deepsparse.utils.onnx.{name}: unexpected signature {names} {defaults}")
        original.__defaults__ = (*defaults[:-1], False)
        _mark(original, original, "deepsparse_shape_override_inplace")


# --------------------------------------------------------------------------------------------
# Recipes: SparseML's loader takes an empty recipe, a list or a repeated key without a word
# --------------------------------------------------------------------------------------------


def recipe_structure(module: ModuleType) -> None:
    """Recipes: refuse an empty recipe, a top-level list and a key given twice, saying so.

    Without it: SparseML's loader (``ScheduledModifierManager.from_yaml``: the stock training
    scripts for ``--recipe`` and a model folder's ``recipe.yaml``, export, ``obert``) fails on an
    empty recipe with ``TypeError: 'NoneType' object is not iterable`` and on one whose top level is
    a list with ``AttributeError: 'list' object has no attribute 'items'``, and a key given twice in
    one modifier (``damp: 1e-7`` ... ``damp: 1e-5``) is taken without a word: YAML keeps the last one.

    Patch: ``module._load_yaml_str_from_file`` (``sparseml.optim.helpers``: every recipe SparseML
    loads, from a file, a ``zoo:`` stub or a YAML string, goes through it) passes the text it read to
    :func:`obert_modifiers.recipe_check.check_recipe_yaml` first, the same check as
    ``obert recipe check``: a ``RecipeCheckError`` names the file and the line(s).
    """
    original = module._load_yaml_str_from_file
    if _patched(original, "recipe_structure"):
        return

    @functools.wraps(original)
    def _load_yaml_str_from_file(file_path: Any) -> str:
        from obert_modifiers.recipe_check import check_recipe_yaml

        text = original(file_path)
        check_recipe_yaml(text, *_recipe_source(file_path, text))
        return text

    _mark(_load_yaml_str_from_file, original, "recipe_structure")
    module._load_yaml_str_from_file = _load_yaml_str_from_file


# --------------------------------------------------------------------------------------------
# Structured models: transformers has one intermediate_size
# --------------------------------------------------------------------------------------------


def structure_config(module: ModuleType) -> None:
    """Shrunk models: a config recording ``obert_structure`` builds a model with those shapes.

    Without it: transformers has one ``intermediate_size``, so ``from_pretrained`` of a model whose
    FFN widths ``!ZipLMPruningModifier`` shrank per layer (the stock training scripts, SparseML's
    reload, ``obert export``) fails with ``size mismatch for bert.encoder.layer.0.intermediate.dense``.

    Patch: ``PreTrainedModel.init_weights`` (where transformers re-applies ``config.pruned_heads``
    while the model is built, before any weight is loaded) then gives the model the recorded FFN
    widths and the stand-ins of removed blocks (``algorithms.shrink.apply_structure``).
    """
    cls = module.PreTrainedModel
    original = cls.init_weights
    if _patched(original, "structure_config"):
        return

    @functools.wraps(original)
    def init_weights(self: Any) -> None:
        original(self)
        if isinstance(getattr(self.config, "obert_structure", None), dict):
            from obert_modifiers.algorithms.shrink import apply_structure

            apply_structure(self)

    _mark(init_weights, original, "structure_config")
    cls.init_weights = init_weights


def empty_weight_sparsity(module: ModuleType) -> None:
    """Shrunk models: SparseML's end-of-training sparsity report counts a removed block as 0 % sparse.

    Without it: a stock training run in which ``!ZipLMPruningModifier`` removed a whole attention or
    FFN block trains to the end and then fails in SparseML's ``log_model_sparsification`` with
    ``ValueError: cannot convert float NaN to integer``: the removed block keeps its zero-width
    linears (so parameter names stay), and ``tensor_sparsity`` of an empty weight is ``0 / 0``.
    The model is not saved.

    Patch: ``tensor_sparsity`` as ``sparseml.pytorch.utils.sparsification`` (the module behind
    ``ModuleSparsificationInfo``) calls it returns 0 for an empty tensor; other tensors as before.
    """
    original = module.tensor_sparsity
    if _patched(original, "empty_weight_sparsity"):
        return

    @functools.wraps(original)
    def tensor_sparsity(tens: Any, dim: Any = None) -> Any:
        if dim is None and tens.numel() == 0:
            return tens.new_zeros(()).float()
        return original(tens, dim)

    _mark(tensor_sparsity, original, "empty_weight_sparsity")
    module.tensor_sparsity = tensor_sparsity


def ziplm_resume(module: ModuleType) -> None:
    """Structured pruning: ``--resume_from_checkpoint`` between two ``!ZipLMPruningModifier`` steps.

    Without it: the stock training scripts build the starting (dense) model, and resuming from a
    checkpoint saved after a ZipLM step fails with ``size mismatch for
    bert.encoder.layer.1.intermediate.dense.weight``; and the run's recipe would take the pruning
    steps again from the first.

    Patch: ``RecipeManagerTrainerInterface.apply_manager(epoch, checkpoint)`` (called with the
    checkpoint before the recipe is applied and the weights reloaded) first gives the model the
    checkpoint's recorded shapes and each ZipLM modifier the checkpoint's recorded structure and
    steps taken (``obert_modifiers.modifiers.ziplm.resume_structure``), so the run continues with the
    next step and ends as the uninterrupted run does.
    """
    cls = module.RecipeManagerTrainerInterface
    original = cls.apply_manager
    if _patched(original, "ziplm_resume"):
        return

    @functools.wraps(original)
    def apply_manager(self: Any, epoch: float, checkpoint: Any) -> bool:
        if checkpoint and self.manager is not None and not self.manager_applied:
            from obert_modifiers.modifiers.ziplm import resume_structure

            resume_structure(self.model, self.manager, checkpoint)
        return original(self, epoch, checkpoint)

    _mark(apply_manager, original, "ziplm_resume")
    cls.apply_manager = apply_manager


def _recipe_source(file_path: Any, text: str) -> tuple[str, int]:
    """(the file a recipe text came from, or 'recipe', and the line of the text in that file)."""
    path = getattr(file_path, "path", file_path)  # a sparsezoo File
    if not isinstance(path, str) or "\n" in path or "\r" in path or not os.path.isfile(path):
        return "recipe", 0
    try:
        with open(path, encoding="utf-8") as handle:
            whole = handle.read()
    except (OSError, UnicodeDecodeError):
        return path, 0
    start = whole.find(text)
    return path, whole[:start].count("\n") if start > 0 else 0


# --------------------------------------------------------------------------------------------
# registry and scheduling
# --------------------------------------------------------------------------------------------


class Fix:
    """A named fix and the modules it patches (it runs once per module, when that module is imported).

    ``standalone``: a fix of a library used without SparseML (DeepSparse pipelines on a pulled model,
    transformers loading a shrunk model): importing one of its ``modules`` applies this fix, also in a
    process that never imports SparseML's modifiers (which schedules every fix).
    (A plain class, not a dataclass: this module is imported at every interpreter start, and
    dataclasses pulls in inspect.)
    """

    __slots__ = ("name", "function", "modules", "standalone")

    def __init__(
        self,
        name: str,
        function: Callable[[ModuleType], None],
        modules: tuple[str, ...],
        standalone: bool = False,
    ) -> None:
        self.name, self.function, self.modules, self.standalone = name, function, modules, standalone

    def __repr__(self) -> str:
        return f"Fix({self.name!r}, modules={self.modules!r}, standalone={self.standalone})"

    @property
    def summary(self) -> str:
        return (self.function.__doc__ or "").strip().splitlines()[0]


FIXES: dict[str, Fix] = {
    fix.name: fix
    for fix in (
        Fix(
            "qconfig_slots",
            qconfig_slots,
            (
                "sparseml.pytorch.sparsification.quantization.quantization_scheme",
                "sparseml.modifiers.quantization_legacy.utils.quantization_scheme",
            ),
        ),
        Fix("grad_sampler_loader", grad_sampler_loader, ("sparseml.transformers.sparsification.trainer",)),
        Fix(
            "onnx_dynamo_export",
            onnx_dynamo_export,
            ("sparseml.pytorch.utils.exporter", "sparseml.pytorch.torch_to_onnx_exporter"),
        ),
        Fix("safetensors_reload", safetensors_reload, ("sparseml.transformers.sparsification.trainer",)),
        Fix("reload_relative_path", reload_relative_path, ("sparseml.transformers.sparsification.trainer",)),
        Fix(
            "safetensors_qat_detect",
            safetensors_qat_detect,
            ("sparseml.transformers.sparsification.sparse_model",),
        ),
        Fix("offline_metrics", offline_metrics, ("datasets.load",)),
        Fix("rng_state_resume", rng_state_resume, ("transformers.trainer",)),
        Fix("scheduled_optimizer_state", scheduled_optimizer_state, ("sparseml.pytorch.optim.optimizer",)),
        Fix(
            "deepsparse_pipeline_inplace",
            deepsparse_pipeline_inplace,
            ("deepsparse.transformers.pipelines.pipeline",),
            standalone=True,
        ),
        Fix(
            "deepsparse_shape_override_inplace",
            deepsparse_shape_override_inplace,
            ("deepsparse.utils.onnx",),  # imported by `import deepsparse` itself
            standalone=True,
        ),
        Fix("recipe_structure", recipe_structure, ("sparseml.optim.helpers",)),
        Fix("structure_config", structure_config, ("transformers.modeling_utils",), standalone=True),
        Fix("empty_weight_sparsity", empty_weight_sparsity, ("sparseml.pytorch.utils.sparsification",)),
        Fix("ziplm_resume", ziplm_resume, ("sparseml.transformers.sparsification.trainer",)),
    )
}


def trigger_modules() -> tuple[str, ...]:
    """Modules whose import applies their ``standalone`` fixes even in a process that never imports
    SparseML's modifiers (derived from the table: the modules of every ``standalone`` fix)."""
    return tuple(dict.fromkeys(m for fix in FIXES.values() if fix.standalone for m in fix.modules))


def disabled_fixes() -> set[str]:
    """Names listed in ``OBERT_COMPAT_DISABLE`` (``all`` means every fix); warns on unknown names."""
    names = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
    if "all" in names:
        return set(FIXES)
    unknown = names - set(FIXES)
    if unknown:
        warnings.warn(
            f"{DISABLE_ENV}: unknown fix name(s) {sorted(unknown)}; known fixes: {', '.join(FIXES)}",
            RuntimeWarning,
            stacklevel=2,
        )
    return names & set(FIXES)


def applied_fixes() -> list[tuple[str, str]]:
    """(fix name, module name) pairs applied so far in this process."""
    return sorted(_applied)


def _runner(fix: Fix, module_name: str) -> Callable[[object], None]:
    def run(module: object) -> None:
        if (fix.name, module_name) in _applied:
            return
        fix.function(module)  # type: ignore[arg-type]
        _applied.add((fix.name, module_name))
        _logger().debug(f"obert_modifiers.compat: applied {fix.name} to {module_name}")

    return run


def apply_standalone(module_name: str) -> None:
    """Schedule the ``standalone`` fixes that patch ``module_name`` (those not disabled by
    ``OBERT_COMPAT_DISABLE``): what importing that module does in a process that never imports
    SparseML's modifiers. Only these fixes: a process that uses transformers or DeepSparse without
    SparseML gets none of the SparseML fixes."""
    skipped = disabled_fixes()
    for fix in FIXES.values():
        if fix.standalone and module_name in fix.modules and fix.name not in skipped:
            _hook.after_import(module_name, _runner(fix, module_name))


def apply_all() -> None:
    """Schedule every fix not disabled by ``OBERT_COMPAT_DISABLE`` (idempotent).

    Each fix runs when the module it patches finishes importing, or at once if it already has.
    """
    global _scheduled
    if _scheduled:
        return
    _scheduled = True
    skipped = disabled_fixes()
    if skipped:
        _logger().warning(
            f"obert_modifiers.compat: fixes disabled by {DISABLE_ENV}: {', '.join(sorted(skipped))}"
        )
    for fix in FIXES.values():
        if fix.name in skipped:
            continue
        for module_name in fix.modules:
            _hook.after_import(module_name, _runner(fix, module_name))
