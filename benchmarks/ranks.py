"""Run one benchmark configuration on fresh gloo ranks, each in its own spawned process.

>>> results = run_on_ranks(step_worker, cfg, world_size=2, timeout=900.0, name="full C=1M")

``worker(rank, cfg)`` runs on every rank once the process group is up (``torch.set_num_threads(1)``)
and returns something picklable; the results come back in rank order, their tensors copied by
value (torch's queue would share a tensor's storage with a process about to exit). A rank that
raises or hangs makes the call raise with its traceback or the timeout, and no process is left
behind.
"""

from __future__ import annotations

import os
import queue
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class _Array:
    """A tensor sent by value."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.array = tensor.detach().cpu().numpy().copy()


def _by_value(obj):
    if isinstance(obj, torch.Tensor):
        return _Array(obj)
    if isinstance(obj, dict):
        return {k: _by_value(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_by_value(v) for v in obj)
    return obj


def _as_tensors(obj):
    if isinstance(obj, _Array):
        return torch.from_numpy(obj.array)
    if isinstance(obj, dict):
        return {k: _as_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_as_tensors(v) for v in obj)
    return obj


def _entry(worker: Callable[[int, dict], Any], rank: int, world_size: int, cfg: dict, store: str,
           results) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
        results.put((rank, "ok", _by_value(worker(rank, cfg))))
    except BaseException as exc:  # report, so the parent does not wait for a dead rank
        results.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(worker: Callable[[int, dict], Any], cfg: dict, world_size: int, timeout: float,
                 name: str) -> list:
    """``worker(rank, cfg)`` on ``world_size`` fresh ranks; their results in rank order."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_entry, args=(worker, r, world_size, cfg, store, results))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        collected = {}
        try:
            for _ in procs:
                rank, status, out = results.get(timeout=timeout)
                if status != "ok":
                    raise RuntimeError(f"{name}: rank {rank} failed:\n{out}")
                collected[rank] = _as_tensors(out)
        except queue.Empty:
            raise RuntimeError(f"{name}: no result within {timeout:.0f} s") from None
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    return [collected[r] for r in range(world_size)]
