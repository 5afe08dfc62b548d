"""The class-parallel head: margins, the sharded cross-entropy, the layer and its optimizer."""

from hybridfc.head.class_parallel_fc import ClassParallelFC
from hybridfc.head.margins import AngularMargin, SoftmaxMargin, build_margin
from hybridfc.head.optimizer import HeadAdam, HeadOptimizer, HeadSGD, build_head_optimizer
from hybridfc.head.validation import InputError

__all__ = ["AngularMargin", "ClassParallelFC", "HeadAdam", "HeadOptimizer", "HeadSGD", "InputError", "SoftmaxMargin",
           "build_head_optimizer", "build_margin"]
