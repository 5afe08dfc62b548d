"""What keeps the default process group alive at exit, and hybridfc's two defences.

The abort: a gloo worker thread (``pt_gloo_runloop``) drops a finished collective's work object,
and with it the last reference to a tensor whose Python object must be released under the GIL.
If the interpreter is already finalising, taking the GIL ends that thread (``pthread_exit``) inside
a noexcept C++ destructor: ``std::terminate``, SIGABRT, "terminate called without an active
exception" (core dump: ``take_gil`` -> ``PyThread_exit_thread`` under
``c10d::ProcessGroupGloo::AsyncWork::~AsyncWork``, on ``ProcessGroupGloo::runLoop``). A group
freed before finalisation cannot do this: ``~ProcessGroupGloo`` joins its worker threads.

1. **Stale references** (:func:`release_stale_group_references`). A few modules give a
   collective's ``group`` argument the default ``group.WORLD``, which Python evaluates once, when
   the module is first imported (torch 2.13):

   * ``torch/distributed/nn/functional.py``: ``broadcast`` (line 32), ``gather``, ``scatter``,
     ``reduce``, ``reduce_scatter``, ``all_gather``, ``_all_gather_base``, ``all_to_all``,
     ``all_to_all_single`` and ``all_reduce`` (line 267), 10 functions;
   * ``torch/distributed/optim/zero_redundancy_optimizer.py`` (``_broadcast_object``, line 76) and
     ``torch/distributed/fsdp/sharded_grad_scaler.py`` (``ShardedGradScaler.__init__``, line 103);
   * DeepSpeed's ``deepspeed/comm/torch.py`` (``TorchBackend.barrier`` and ``monitored_barrier``,
     lines 516 and 522 in 0.19).

   ``group.WORLD`` is ``_world.default_pg`` (``torch/distributed/distributed_c10d.py``, line 818):
   None before ``init_process_group``, the live default ``ProcessGroup`` after it. ``torch._dynamo``
   imports ``torch.distributed.nn.functional``, and ``torch.optim`` imports ``torch._dynamo`` with
   the first optimizer, so a script that imports hybridfc (or builds an optimizer, or imports
   DeepSpeed) after ``init_process_group`` held 10 (or more) extra references to the default group
   and ``destroy_process_group()`` could not free it. These defaults are put back to None: what they
   hold when the module is imported before ``init_process_group``, and what each of these functions
   already takes to mean the default group (they hand ``group`` to ``torch.distributed``, where
   None is the default group; DeepSpeed's two map None to ``GroupMember.WORLD``). Done once hybridfc
   has imported ``torch._dynamo`` (:mod:`hybridfc.parallel.groups`) and again at exit, for modules
   imported after hybridfc.

2. **A group never destroyed** (:func:`destroy_default_group_at_exit`). A script that simply ends,
   or ends by an uncaught exception, leaves the default group in ``torch.distributed``'s module
   state. That is cleared during finalisation (``finalize_modules``), which frees the group and
   joins its worker threads there, after the interpreter has begun finalising: the race above is
   open whatever the import order (measured: 4 of 80 rank exits aborted for a 2-rank script ending
   right after ``dist.all_reduce(torch.ones(1))``, 1 of 80 when it then raised). So at exit a gloo
   default group still initialised is destroyed here, before finalisation, as the script could
   have done itself (through DeepSpeed's ``comm`` when DeepSpeed initialised it, which also drops
   DeepSpeed's references).

   It cannot make the exit wait longer: ``destroy_process_group()`` does not block for gloo
   (``shutdown()`` returns at once); only the release of the group's last reference joins its
   threads, and that join happens anyway in ``finalize_modules``. A peer inside a collective, or
   gone, does not hold it up (with no collective of this rank in flight the threads are idle). A
   collective of this rank left in flight that no peer matches (an uncaught exception between an
   async call and its wait) holds it until the peers exit or the group's timeout, in this hook as
   it did in finalisation (measured: 34 s for a peer living 30 s, with and without the hook).

   Not covered: NCCL (and mixed) groups, left to torch and the script; groups the script's own
   objects still reference (under :func:`hybridfc.initialize`, DeepSpeed's data-parallel group, held
   by the engine and the head), freed with those objects in finalisation as before. An ``atexit``
   hook registered before hybridfc was imported runs after this one and finds the group destroyed.
"""

from __future__ import annotations

import atexit
import sys
import types
from typing import Any, Iterator

import torch.distributed as dist

MODULES_WITH_WORLD_DEFAULTS = (
    "torch.distributed.nn.functional",
    "torch.distributed.optim.zero_redundancy_optimizer",
    "torch.distributed.fsdp.sharded_grad_scaler",
    "deepspeed.comm.torch",
)
"""Modules whose functions (or methods) default a ``group`` argument to ``group.WORLD``; only those
already imported are visited."""


def _functions_of(module: types.ModuleType) -> Iterator[types.FunctionType]:
    """The functions defined in ``module``: at its top level and in its classes (unwrapped)."""
    for value in list(vars(module).values()):
        own_class = isinstance(value, type) and value.__module__ == module.__name__
        members = list(vars(value).values()) if own_class else [value]
        for member in members:
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            while isinstance(member, types.FunctionType):
                if member.__module__ == module.__name__:
                    yield member
                member = getattr(member, "__wrapped__", None)


def release_stale_group_references() -> int:
    """Replace by None every ``ProcessGroup`` default argument of the functions of
    :data:`MODULES_WITH_WORLD_DEFAULTS` that are imported. Returns how many were replaced (0 when
    they were imported before ``init_process_group``, or already released)."""
    if not dist.is_available():
        return 0
    replaced = 0

    def released(value: Any) -> Any:
        nonlocal replaced
        if isinstance(value, dist.ProcessGroup):
            replaced += 1
            return None
        return value

    for name in MODULES_WITH_WORLD_DEFAULTS:
        module = sys.modules.get(name)
        if module is None:
            continue
        for function in _functions_of(module):
            if function.__defaults__ and any(isinstance(v, dist.ProcessGroup) for v in function.__defaults__):
                function.__defaults__ = tuple(released(value) for value in function.__defaults__)
            if function.__kwdefaults__ and any(isinstance(v, dist.ProcessGroup)
                                               for v in function.__kwdefaults__.values()):
                function.__kwdefaults__ = {key: released(value) for key, value in function.__kwdefaults__.items()}
    return replaced


def destroy_default_group_at_exit() -> bool:
    """Destroy the default process group if it is still initialised and gloo (see the module's
    docstring). Returns whether it did."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    if str(dist.get_backend()).lower() != "gloo":
        return False
    deepspeed_comm = sys.modules.get("deepspeed.comm")
    if deepspeed_comm is not None and deepspeed_comm.is_initialized():
        deepspeed_comm.destroy_process_group()
    else:
        dist.destroy_process_group()
    return True


def _at_exit() -> None:
    try:
        release_stale_group_references()
    finally:
        destroy_default_group_at_exit()


# Registered when hybridfc is imported, so it runs after the hooks registered later (atexit runs the
# last registered first): hybridfc.selection.rebuild's, which stops the background builds, included.
atexit.register(_at_exit)
