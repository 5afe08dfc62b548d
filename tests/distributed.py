"""Run a function on N local ranks (gloo, one process each) and collect what each returns.

>>> results = run_distributed(worker, world_size=3, args=(seed,))   # worker(rank, world_size, seed)

A worker that raises makes the call raise with that rank's traceback; a worker that hangs makes
it raise after ``timeout`` seconds (every process is killed), so a hang is a failure, not a stall.
"""

from __future__ import annotations

import multiprocessing as mp
import io
import os
import queue
import tempfile
import traceback
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist


class RankFailed(RuntimeError):
    """A rank raised (``errors`` maps rank -> traceback text) or the group timed out."""

    def __init__(self, message: str, errors: dict[int, str]):
        super().__init__(message)
        self.errors = errors


def _entry(fn, rank, world_size, init_file, args, results):
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        dist.barrier()
        out = fn(rank, world_size, *args)
        buffer = io.BytesIO()
        torch.save(out, buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException as exc:
        results.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _context() -> mp.context.BaseContext:
    """Ranks are forked from a server that has imported torch and hybridfc once (a spawned rank
    spends about two seconds importing them); set ``HYBRIDFC_TEST_START=spawn`` for fresh interpreters."""
    method = os.environ.get("HYBRIDFC_TEST_START", "forkserver")
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["torch", "hybridfc", "distributed", "reference"])
    return ctx


def run_distributed(fn: Callable[..., Any], world_size: int, args: Sequence[Any] = (),
                    timeout: float = 180.0, allow_errors: bool = False) -> list[Any]:
    """``[fn(rank, world_size, *args) for rank in range(world_size)]``, each in its own process.

    With ``allow_errors``, a rank that raised contributes ``RankFailed`` (with its text) to the
    list instead of failing the call; a timeout always fails.
    """
    ctx = _context()
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_entry, args=(fn, r, world_size, init_file, tuple(args), results))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        collected: dict[int, tuple[str, Any]] = {}
        try:
            for _ in range(world_size):
                rank, status, out = results.get(timeout=timeout)
                if status == "ok":
                    out = torch.load(io.BytesIO(out), weights_only=False)
                collected[rank] = (status, out)
        except queue.Empty:
            raise RankFailed(f"ranks {sorted(set(range(world_size)) - set(collected))} did not finish "
                             f"within {timeout}s (hang?)", {}) from None
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    errors = {r: out for r, (status, out) in collected.items() if status == "error"}
    if errors and not allow_errors:
        raise RankFailed("\n".join(f"--- rank {r}:\n{t}" for r, t in sorted(errors.items())), errors)
    return [RankFailed(collected[r][1], {r: collected[r][1]}) if collected[r][0] == "error"
            else collected[r][1] for r in range(world_size)]
