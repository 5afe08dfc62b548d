"""The runtime: ``hybridfc.initialize`` and the engine that drives backbone and head as one.

The backbone is wrapped by the DeepSpeed engine as usual (ZeRO 0–3, bf16/fp16, DeepSpeed's
optimizers, schedulers and checkpoints). The head lives *outside* that engine, with its own
optimizer: DeepSpeed would broadcast a parameter from rank 0 and average its gradient, which is
wrong for rows that differ on every rank. :class:`HybridEngine` holds both:

>>> engine, optimizer, loader, scheduler = hybridfc.initialize(args=args, model=backbone,
...     model_parameters=backbone.parameters(), training_data=dataset)
>>> for x, y in loader:
...     loss = engine(x, y)          # backbone -> head -> loss (mean over the global batch)
...     engine.backward(loss)
...     engine.step()

One step, on every rank:

1. **forward** (``engine(x, y)``): on the first call of a fresh run with ``warm_start.imprint``
   (or after a load that grew the head: its new rows) the head is imprinted first
   (:mod:`~hybridfc.runtime.warm_start`); then backbone -> embeddings -> ``ClassParallelFC`` -> loss;
2. **backward**: DeepSpeed's, with the fp16 loss scale noted for the head;
3. **step**: between accumulation boundaries DeepSpeed's step alone; at a boundary
   :class:`hybridfc.step.TrainingStep` (unscale, agree, decide, reduce with ``grad_topk``, step both
   or skip both, reset: numbered in :mod:`hybridfc.step`), the head's lr set from the backbone's
   schedule times :attr:`HybridEngine.lr_scale` (:mod:`~hybridfc.runtime.lr`); then a refresh
   imprint when due, and the communication log line every ``steps_per_print`` steps;
4. **mark**: where the data stands (random generators, loader position) is remembered, for a
   save before the next step (:mod:`~hybridfc.runtime.data`).

One save (``engine.save_checkpoint``, :mod:`~hybridfc.runtime.checkpoints`):

1. rank 0 clears ``<tag>.partial`` left by an interrupted save; every rank waits;
2. every rank writes each registered state part (:mod:`hybridfc.state`) into ``<tag>.partial``,
   one fsynced file a part: head rows, head optimizer, selection, grad_topk residual, plateau
   rule, loader position, random generators (the last two as of the last step), any part a user
   registered (:meth:`HybridEngine.register_state`); an error on one rank raises on every rank;
3. DeepSpeed saves the backbone into the same directory; every rank waits;
4. rank 0 publishes: fsync, ``<tag>.partial`` becomes ``<tag>`` (an existing ``<tag>`` swapped in
   one step), then ``latest`` (:mod:`hybridfc.checkpoint.publish`).

One load reads and merges every part (another number of ranks, more classes) and checks them
against this run before DeepSpeed loads anything, then puts the parts back.

==================  ==========================================================================
module              what it holds
==================  ==========================================================================
``initialize``      ``initialize`` and the checks that need the launched job
``engine``          ``HybridEngine``, the facade: forward, backward, step, state, checkpoints
``checkpoints``     the order of a save and of a load, DeepSpeed's files and the state parts
``lr``              the lr multipliers (batch scaling, plateau) and the head following the backbone
``data``            the data's position as state parts: random generators, loader
``warm_start``      when to imprint, and the batches to imprint from
==================  ==========================================================================
"""

from hybridfc.runtime.engine import FORWARDED, HybridEngine
from hybridfc.runtime.initialize import initialize

__all__ = ["FORWARDED", "HybridEngine", "initialize"]
