"""The head's measured peak memory per rank beside ``hybridfc plan``'s prediction.

    python benchmarks/check_plan_memory.py                      # C = 1,000,000 and 2,000,000
    python benchmarks/check_plan_memory.py --classes 1000000 --json

Each C runs in 2 freshly spawned gloo ranks (``torch.set_num_threads(1)``) that build
``hybridfc.ClassParallelFC(C, d, margin=arcface)`` and ``hybridfc.build_head_optimizer`` (momentum
SGD, lr 0.1, momentum 0.9, weight decay 5e-4) and run a few steps (forward, backward, optimizer
step, ``zero_grad``) on fresh random batches. Per rank:

* baseline: RSS after imports, process-group init and one step of a tiny head (which pages in the
  GEMM, autograd and gloo code and the modules ``torch.optim`` imports on first use), before the
  head is built;
* peak (sampled): the largest RSS read by a thread (``psutil``) every 2 ms during the steps;
* peak (kernel): the kernel's RSS high-water mark (VmHWM), reset to the current RSS right before
  the steps; exact, shown as a cross-check where ``/proc/self/clear_refs`` is writable.

Measured = peak − baseline. Predicted = ``hybridfc plan``'s total memory per rank for
model-parallel (selection ``full``) with the same C, d, N and local batch. The check passes when
predicted/measured (sampled) is within ``--tolerance`` (15%) of 1 on every rank; the exit status
says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

import psutil
import torch
import torch.distributed as dist

from hybridfc.plan import PlanInputs, make_plan
from memory_probe import RssSampler, hwm_bytes, release_free_heap, reset_hwm
from ranks import run_on_ranks

MARGIN = {"type": "arcface", "scale": 64.0, "margin": 0.5}
OPTIMIZER = {"type": "sgd", "params": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}}
GIB = 2**30


def _steps(head, optimizer, steps: int, batch: int, dim: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(batch, dim, generator=g)
        y = torch.randint(head.num_classes, (batch,), generator=g)
        head(x, y).backward()
        optimizer.step()
        optimizer.zero_grad()


def _warm_up(world_size: int, dim: int, batch: int) -> None:
    import hybridfc

    head = hybridfc.ClassParallelFC(16 * world_size, dim, margin=MARGIN)
    _steps(head, hybridfc.build_head_optimizer(head, OPTIMIZER), 2, batch, dim, seed=1)


def measure_rank(rank: int, cfg: dict) -> dict:
    """One rank's baseline and peaks, in bytes."""
    import hybridfc

    _warm_up(dist.get_world_size(), cfg["dim"], cfg["local_batch"])
    release_free_heap()
    baseline = psutil.Process().memory_info().rss
    head = hybridfc.ClassParallelFC(cfg["classes"], cfg["dim"], margin=MARGIN)
    optimizer = hybridfc.build_head_optimizer(head, OPTIMIZER)
    release_free_heap()
    has_kernel_peak = reset_hwm()
    sampler = RssSampler(0.002)
    sampler.start()
    _steps(head, optimizer, cfg["steps"], cfg["local_batch"], cfg["dim"], seed=100 + rank)
    sampled = sampler.stop()
    kernel = hwm_bytes() - baseline if has_kernel_peak else None
    return {"rank": rank, "baseline": baseline, "sampled": sampled - baseline, "kernel": kernel}


def predicted_peak(classes: int, dim: int, world_size: int, local_batch: int) -> int:
    """``hybridfc plan``'s total memory per rank, model-parallel (selection full), fp32, sgd."""
    inputs = PlanInputs(num_classes=classes, embedding_size=dim, world_size=world_size, local_batch=local_batch)
    return make_plan(inputs).method("model_parallel").memory.total


def check(classes: int, dim: int, world_size: int, global_batch: int, steps: int, timeout: float) -> list[dict]:
    """Measured and predicted peak per rank for one C, with predicted/measured."""
    cfg = {"classes": classes, "dim": dim, "local_batch": global_batch // world_size, "steps": steps}
    predicted = predicted_peak(classes, dim, world_size, cfg["local_batch"])
    return [{**r, "classes": classes, "predicted": predicted, "ratio": predicted / r["sampled"]}
            for r in run_on_ranks(measure_rank, cfg, world_size, timeout, f"C={cfg['classes']:,}")]


def _gib(nbytes: Optional[int]) -> str:
    return "n/a" if nbytes is None else f"{nbytes / GIB:.3f}"


def table(rows: list[dict]) -> str:
    head = (f"{'C':>11} {'rank':>4} {'baseline':>9} {'measured':>9} {'kernel':>9} "
            f"{'predicted':>9} {'pred/meas':>9}")
    lines = ["peak memory per rank above the baseline, GiB = 2^30 bytes "
             "(measured: sampled RSS; kernel: VmHWM cross-check)", head]
    lines += [f"{r['classes']:>11,} {r['rank']:>4} {_gib(r['baseline']):>9} {_gib(r['sampled']):>9} "
              f"{_gib(r['kernel']):>9} {_gib(r['predicted']):>9} {r['ratio']:>9.3f}" for r in rows]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[1_000_000, 2_000_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=0.15)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    rows = [row for c in args.classes
            for row in check(c, args.dim, args.world_size, args.global_batch, args.steps, args.timeout)]
    print(json.dumps(rows, indent=2) if args.json else table(rows))
    return 0 if all(abs(r["ratio"] - 1) <= args.tolerance for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
