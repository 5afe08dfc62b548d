"""hybridfc: DeepSpeed training of classifiers with millions of classes.

The backbone trains data-parallel under the DeepSpeed engine; the classification layer
(:class:`ClassParallelFC`) is sharded over the class dimension across the ranks.

>>> engine, optimizer, loader, scheduler = hybridfc.initialize(args=args, model=backbone,
...     model_parameters=backbone.parameters(), training_data=dataset)
>>> for x, y in loader:
...     loss = engine(x, y); engine.backward(loss); engine.step()
"""

from hybridfc.config import ConfigError
from hybridfc.head import ClassParallelFC, HeadAdam, HeadOptimizer, HeadSGD, InputError, build_head_optimizer

__version__ = "0.1.0"

__all__ = ["ClassParallelFC", "ConfigError", "HeadAdam", "HeadOptimizer", "HeadSGD", "HybridEngine", "InputError",
           "build_head_optimizer", "initialize"]


def __getattr__(name: str):
    """``initialize`` and ``HybridEngine`` import DeepSpeed, so only on first use."""
    if name in ("initialize", "HybridEngine"):
        from hybridfc import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'hybridfc' has no attribute {name!r}")
