"""One lifecycle class per recipe tag for the native adapter (lifecycle only: the math is in
:mod:`obert_modifiers.algorithms`); :data:`MODIFIERS` maps each tag to its class.
:class:`~obert_modifiers.native.lifecycle.RecipeRunner` drives them."""

from obert_modifiers.native.modifiers.base import (
    GradientSource,
    NativeModifier,
    RecipeRunError,
    StepContext,
    find_params,
)
from obert_modifiers.native.modifiers.distillation import Distillation
from obert_modifiers.native.modifiers.layer_drop import LayerDrop
from obert_modifiers.native.modifiers.learning_rate import EpochRange, LearningRateFunction, SetLearningRate
from obert_modifiers.native.modifiers.pruning import ConstantPruning, Masked, OBertPruning
from obert_modifiers.native.modifiers.quantization import Quantization
from obert_modifiers.native.modifiers.ziplm import ZipLMPruning

__all__ = [
    "MODIFIERS",
    "ConstantPruning",
    "Distillation",
    "EpochRange",
    "GradientSource",
    "LayerDrop",
    "LearningRateFunction",
    "Masked",
    "NativeModifier",
    "OBertPruning",
    "Quantization",
    "RecipeRunError",
    "SetLearningRate",
    "StepContext",
    "ZipLMPruning",
    "find_params",
]

MODIFIERS: dict[str, type[NativeModifier]] = {
    "EpochRangeModifier": EpochRange,
    "LearningRateFunctionModifier": LearningRateFunction,
    "SetLearningRateModifier": SetLearningRate,
    "ConstantPruningModifier": ConstantPruning,
    "OBertPruningModifier": OBertPruning,
    "LayerDropModifier": LayerDrop,
    "OBertQuantizationModifier": Quantization,
    "OBertDistillationModifier": Distillation,
    "ZipLMPruningModifier": ZipLMPruning,
}
