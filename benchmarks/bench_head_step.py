"""One head training step: ``hybridfc.ClassParallelFC`` against a naive DDP-replicated classifier.

What is timed, per step and per rank: forward + backward + optimizer update + ``zero_grad``, with a
barrier before and after (the step time is the max over ranks; the table shows the median over
the timed steps, after warm-up steps). Beside the wall time, the CPU time of each rank's process
(all its threads) over the same interval: it does not count time spent waiting or descheduled, so
it stays meaningful when other jobs share the machine (compare the two: equal means no contention).

* ``store`` and ``recompute``: ``ClassParallelFC(C, d, margin, logits=...)`` (rank r holds ~C/N
  rows) with ``build_head_optimizer(head, {"type": "sgd", "params": {lr 0.1, momentum 0.9, wd 5e-4}})``;
  each rank passes its local batch b = B/N, the head all-gathers the B features. ``store`` keeps
  the (B × C_r) logits between forward and backward, ``recompute`` keeps a tile and computes them
  again in the backward pass (a fourth GEMM: its floor is 4/3 of the three-GEMM floor).
* ``naive``: what a user writes without hybridfc: every rank holds all of W in an
  ``nn.Linear(d, C, bias=False)`` inside a DDP-wrapped module (default DDP settings), normalises
  features and W with ``F.normalize``, applies the same margin at the target logit with a
  ``scatter``, ``F.cross_entropy`` over its own local batch; DDP all-reduces the C×d gradient;
  ``torch.optim.SGD`` with the same hyper-parameters.

Both start from the same weights (the head's seeded init) and see the same batches, so their
losses must agree step by step (printed as a sanity check).

Arithmetic floor: the three GEMMs of the step (logits, dE, dW), each 2·M·N·d FLOPs per rank
(ours: M = B, N = C/N; naive: M = b, N = C), at the rate that plain ``torch.mm`` of exactly those
shapes and layouts reaches in the same process, single-threaded, with the other rank doing the
same at the same time. Two floors are measured: ``torch.mm(a, b, out=buf)`` into a pre-allocated
output (the pure GEMM rate; the floor the ratio uses), and ``torch.mm(a, b)`` allocating its output
(includes first-touch page faults of a fresh (B×C_r) buffer, as a step that allocates pays them).

Memory: each configuration (method × C) runs in its own freshly spawned process group. Per rank:
baseline = VmRSS after imports, process-group init and a tiny warm-up (a small autograd step, SGD
step and DDP step: they page in kernels and trigger torch's lazy imports, e.g. torch.optim pulls in
torch._dynamo, ~65 MiB) and ``malloc_trim(0)``, before the model exists. Peak = the kernel's RSS
high-water mark (VmHWM of /proc/self/status), *reset to the current RSS* (``echo 5 > /proc/self/clear_refs``) after the model and optimizer are
built (and ``malloc_trim(0)`` has returned construction garbage to the OS), right before the
first step, and read after the last one: so ``peak − baseline`` is the
largest RSS above the pre-model baseline during the steps, exact (kernel-tracked, no sampling
gap), and not inflated by anything before the baseline or by one-off construction transients.
A thread sampling VmRSS every 5 ms gives a cross-check (it can miss short peaks, never
over-reports). (``getrusage().ru_maxrss`` was not used: it is a high-water mark since exec that
cannot be reset, so a baseline taken from it is only valid if the baseline is the maximum so far,
and construction transients would be counted as step memory.) Tensors below glibc's mmap threshold
(up to 32 MiB) live in the malloc heap, whose freed memory stays resident, so at small C the
peak includes allocator retention; from C ~ 10^6 every large tensor is its own mapping.

On a GPU (``--device cuda``): rank r runs on GPU r; the ranks start on gloo as on the CPU (for
barriers) and the head and DDP communicate over an NCCL group of the same ranks. Clocks are read
after ``torch.cuda.synchronize()``, so a phase counts its kernels; the memory columns are the bytes
torch's CUDA allocator hands out to tensors (``memory_allocated``; peak: ``max_memory_allocated``,
reset after the build), not RSS; the CPU-time columns only show the host's share. Options left at
their defaults take a preset sized for a 1-2 minute run on one H100/H200: C = 2M, global batch
1024 (an 8 GB logits buffer for ``store``), the three methods, 20 timed steps, 1 rank; the CUDA
tiles are a chunk's rows × the shard (``store``) or × 16,384 columns (``recompute``), and the
GEMMs follow torch's TF32 setting.

The library measured is whatever ``import hybridfc`` finds (printed in the report, with its git
commit); to pin a commit while the tree changes, put a clone first on ``PYTHONPATH``.

    python benchmarks/bench_head_step.py --classes 100000 1000000 --dim 128 --batch 256 --steps 10
    python benchmarks/bench_head_step.py --device cuda      # the GPU preset
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from memory_probe import RssSampler, hwm_bytes, release_free_heap, reset_hwm, rss_bytes
from ranks import run_on_ranks

MIB = 1024 * 1024
SGD_PARAMS = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
GPU_PRESET = {"classes": [2_000_000], "batch": 1024, "steps": 20, "world_size": 1}


# ----------------------------------------------------------------------------- the device
def synchronize(device: str) -> None:
    """Wait for the kernels queued on ``device``, so that a clock read next counts them (CPU: no-op)."""
    if device == "cuda":
        torch.cuda.synchronize()


def head_group(device: str, rank: int):
    """The process group of the head and of DDP: the ranks' own gloo world (``None``) on the CPU;
    on CUDA rank r drives GPU r and an NCCL group of the same ranks carries the collectives."""
    if device == "cpu":
        return None
    torch.cuda.set_device(rank)
    return dist.new_group(backend="nccl")


def wrap_ddp(module: nn.Module, device: str, group) -> DDP:
    """``module`` on ``device`` in DDP with its default settings (CUDA: this rank's GPU, the NCCL group)."""
    if device == "cpu":
        return DDP(module)
    return DDP(module.to(device), device_ids=[torch.cuda.current_device()], process_group=group)


class MemoryProbes(NamedTuple):
    """What the memory columns read, in bytes: ``now()``, ``reset_peak() -> bool``, ``peak()`` and a
    ``sampler(period)`` thread (``start()``, ``stop() -> largest value seen``)."""

    now: Callable[[], int]
    reset_peak: Callable[[], bool]
    peak: Callable[[], int]
    sampler: Callable[[float], RssSampler]


class CudaSampler(RssSampler):
    """The sampled cross-check on a GPU: the CUDA allocator's bytes in tensors every ``period`` s."""

    def __init__(self, period: float = 0.005) -> None:
        super().__init__(period)
        self.device = torch.cuda.current_device()  # the sampling thread has a current device of its own

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, torch.cuda.memory_allocated(self.device))
            time.sleep(self.period)

    def stop(self) -> int:
        self.done.set()
        self.join()
        return max(self.peak, torch.cuda.memory_allocated(self.device))


def reset_cuda_peak() -> bool:
    """Start the CUDA allocator's peak afresh; True, as ``reset_hwm`` answers where it can."""
    torch.cuda.reset_peak_memory_stats()
    return True


def memory_probes(device: str) -> MemoryProbes:
    """The process's RSS and the kernel's high-water mark on the CPU; on a GPU, where the head's
    tensors live, the bytes torch's CUDA allocator hands out and their peak (exact, like VmHWM)."""
    if device == "cuda":
        return MemoryProbes(torch.cuda.memory_allocated, reset_cuda_peak, torch.cuda.max_memory_allocated,
                            CudaSampler)
    return MemoryProbes(rss_bytes, reset_hwm, hwm_bytes, RssSampler)


# ----------------------------------------------------------------------------- the naive head
class NaiveMarginHead(nn.Module):
    """Full W on every rank: normalised features × normalised W, margin at the target, CE."""

    def __init__(self, num_classes: int, dim: int, margin: dict):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes, bias=False)
        self.kind, self.scale, self.m = margin["type"], float(margin["scale"]), float(margin["margin"])

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cos = F.linear(F.normalize(x, dim=1), F.normalize(self.fc.weight, dim=1))
        target = cos.gather(1, y[:, None])
        if self.kind == "cosface":
            target = target - self.m
        else:  # arcface: cos(θ + m), original fallback cos θ − m·sin m beyond θ + m > π
            theta = torch.acos(target.clamp(-1 + 1e-7, 1 - 1e-7))
            target = torch.where(theta + self.m <= math.pi, torch.cos(theta + self.m),
                                 target - self.m * math.sin(self.m))
        logits = cos.scatter(1, y[:, None], target)
        return F.cross_entropy(self.scale * logits, y)


# ----------------------------------------------------------------------------- per-rank worker
def batch_for_step(step: int, batch: int, dim: int, num_classes: int):
    g = torch.Generator().manual_seed(12345 + step)
    return torch.randn(batch, dim, generator=g), torch.randint(num_classes, (batch,), generator=g)


def timed_step(model, opt, rank: int, step: int, batch: int, dim: int, num_classes: int, device: str = "cpu"):
    """Forward, backward, ``opt.step()`` and ``opt.zero_grad()`` on this rank's part of step
    ``step``'s batch, between two barriers: ``(loss, wall s, CPU s, (forward, backward, optimizer) s)``."""
    b = batch // dist.get_world_size()
    xg, yg = batch_for_step(step, batch, dim, num_classes)
    x = xg[rank * b:(rank + 1) * b].to(device).clone().requires_grad_(True)
    y = yg[rank * b:(rank + 1) * b].to(device).clone()
    synchronize(device)
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    loss = model(x, y)
    synchronize(device)
    t1 = time.perf_counter()
    loss.backward()
    synchronize(device)
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad()
    synchronize(device)
    t3 = time.perf_counter()
    dist.barrier()
    t4, c4 = time.perf_counter(), time.process_time()
    return loss.detach(), t4 - t0, c4 - c0, (t1 - t0, t2 - t1, t3 - t2)


def time_mm(a, b, out, reps: int, device: str) -> dict:
    """Median wall and CPU seconds of torch.mm(a, b, out=out) and of torch.mm(a, b) (allocating);
    both ranks in lock-step, like in the step."""
    res = {}
    for name, fn in (("out", lambda: torch.mm(a, b, out=out)), ("alloc", lambda: torch.mm(a, b))):
        walls, cpus = [], []
        for i in range(reps + 1):
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            r = fn()
            synchronize(device)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            del r
            if i:  # the first one is a warm-up
                walls.append(wall)
                cpus.append(cpu)
        res[name] = (statistics.median(walls), statistics.median(cpus))
    return res


def gemm_floor(m: int, n: int, d: int, reps: int, device: str) -> dict:
    """The step's three GEMMs with the head's layouts: E(m×d)@Wᵀ, G(m×n)@W, Gᵀ@E."""
    g = torch.Generator(device).manual_seed(7)
    E, W = torch.randn(m, d, generator=g, device=device), torch.randn(n, d, generator=g, device=device)
    G = torch.randn(m, n, generator=g, device=device)
    L, dE, dW = (torch.empty(m, n, device=device), torch.empty(m, d, device=device),
                 torch.empty(n, d, device=device))
    shapes = {"logits": (E, W.t(), L), "dE": (G, W, dE), "dW": (G.t(), E, dW)}
    t = {k: time_mm(a, b, o, reps, device) for k, (a, b, o) in shapes.items()}
    one = 2 * m * n * d
    return {"flops": 3 * one,
            "wall": sum(v["out"][0] for v in t.values()),
            "cpu": sum(v["out"][1] for v in t.values()),
            "wall_alloc": sum(v["alloc"][0] for v in t.values()),
            "gflops": {k: one / v["out"][0] / 1e9 for k, v in t.items()}}


def worker(rank: int, cfg: dict) -> dict:
    world, C, d, B, device = cfg["world_size"], cfg["classes"], cfg["dim"], cfg["batch"], cfg["device"]
    b = B // world
    import hybridfc
    import hybridfc.config  # imported lazily by the head's builders: load it before the baseline
    from hybridfc.head.class_parallel_fc import init_class_rows

    group, probes = head_group(device, rank), memory_probes(device)
    # tiny warm-up before the baseline: pages in the GEMM / autograd / gloo code, and lets
    # torch.optim import what it imports lazily on first use (torch._dynamo, ~65 MiB of RSS)
    x = torch.randn(8, d, device=device, requires_grad=True)
    F.cross_entropy(F.normalize(x, dim=1) @ torch.randn(d, 16, device=device),
                    torch.zeros(8, dtype=torch.long, device=device)).backward()
    tiny = torch.optim.SGD([x], **SGD_PARAMS)
    tiny.step()
    tiny.zero_grad()
    # and a tiny DDP step: the backbone of either method is DDP anyway; what DDP loads and keeps
    # per process independently of C is not the head's memory
    tiny_ddp = wrap_ddp(nn.Linear(d, 16, bias=False), device, group)
    tiny_ddp(x.detach()).sum().backward()
    dist.all_reduce(torch.ones(1024))
    del x, tiny, tiny_ddp
    release_free_heap()
    dist.barrier()

    baseline = probes.now()
    if cfg["method"] in OURS:
        model = hybridfc.ClassParallelFC(C, d, margin=cfg["margin"], seed=0, device=device, group=group,
                                         logits=cfg["method"])
        opt = hybridfc.build_head_optimizer(model, {"type": "sgd", "params": dict(SGD_PARAMS)})
        gemm_m, gemm_n = B, model.num_local
    else:
        head = NaiveMarginHead(C, d, cfg["margin"])
        with torch.no_grad():  # the same initial weights as ClassParallelFC(seed=0)
            head.fc.weight.copy_(init_class_rows(0, C, d, seed=0, std=0.01))
        model = wrap_ddp(head, device, group)
        opt = torch.optim.SGD(model.parameters(), **SGD_PARAMS)
        gemm_m, gemm_n = b, C
    release_free_heap()
    after_build = probes.now()

    sampler = probes.sampler(0.005)
    dist.barrier()
    if not probes.reset_peak():
        raise RuntimeError("/proc/self/clear_refs is not writable: the kernel peak cannot be reset")
    sampler.start()
    walls, cpus, phases, losses = [], [], [], []
    for step in range(cfg["warmup"] + cfg["steps"]):
        loss, wall, cpu, phase = timed_step(model, opt, rank, step, B, d, C, device)
        value = loss.clone().cpu()  # the sanity check's all-reduce below runs on the gloo world
        if cfg["method"] == "naive":  # local mean -> global mean, for the sanity check only
            dist.all_reduce(value)
            value /= world
        losses.append(float(value))
        if step >= cfg["warmup"]:
            walls.append(wall)
            cpus.append(cpu)
            phases.append(phase)
    peak_sampled = sampler.stop()
    peak_hwm = probes.peak()

    del model, opt, loss
    if cfg["method"] == "naive":
        del head
    floor = gemm_floor(gemm_m, gemm_n, d, cfg["mm_reps"], device)
    return {"walls": walls, "cpus": cpus, "phases": phases, "losses": losses, "baseline": baseline,
            "after_build": after_build, "peak_hwm": peak_hwm, "peak_sampled": peak_sampled,
            "floor": floor, "gemm_shape": (gemm_m, gemm_n)}


# ----------------------------------------------------------------------------- reporting
def expected_parts(method: str, C: int, d: int, B: int, world: int) -> dict:
    """Arithmetic memory per rank (the largest shard), bytes: weight, grad, momentum, logits."""
    rows = -(-C // world) if method in OURS else C
    w = rows * d * 4
    logits = 0 if method == "recompute" else (B if method in OURS else B // world) * rows * 4
    return {"weight": w, "grad": w, "momentum": w, "logits": logits}


def planned_bytes(cfg: dict) -> int:
    """What ``hybridfc plan`` predicts for this configuration's peak, per rank."""
    from hybridfc.plan import PlanInputs, make_plan

    world = cfg["world_size"]
    logits = cfg["method"] if cfg["method"] in OURS else "store"
    inputs = PlanInputs(num_classes=cfg["classes"], embedding_size=cfg["dim"], world_size=world,
                        local_batch=cfg["batch"] // world, logits=logits)
    return make_plan(inputs).method("model_parallel" if cfg["method"] in OURS else "data_parallel").memory.total


def summarize(cfg: dict, ranks: list[dict]) -> dict:
    n = cfg["steps"]

    def per_step_max(key):
        return [max(r[key][i] for r in ranks) for i in range(n)]

    walls, cpus = per_step_max("walls"), per_step_max("cpus")
    exp = expected_parts(cfg["method"], cfg["classes"], cfg["dim"], cfg["batch"], cfg["world_size"])
    return {
        "method": cfg["method"], "C": cfg["classes"],
        "ms": statistics.median(walls) * 1e3, "ms_min": min(walls) * 1e3, "ms_max": max(walls) * 1e3,
        "cpu_ms": statistics.median(cpus) * 1e3,
        "phase_ms": [statistics.median(max(r["phases"][i][k] for r in ranks) for i in range(n)) * 1e3
                     for k in range(3)],
        "floor_ms": max(r["floor"]["wall"] for r in ranks) * 1e3,
        "floor_cpu_ms": max(r["floor"]["cpu"] for r in ranks) * 1e3,
        "floor_alloc_ms": max(r["floor"]["wall_alloc"] for r in ranks) * 1e3,
        "gflops": ranks[0]["floor"]["flops"] / max(r["floor"]["wall"] for r in ranks) / 1e9,
        "gemm_gflops": ranks[0]["floor"]["gflops"],
        "peak_mib": max(r["peak_hwm"] - r["baseline"] for r in ranks) / MIB,
        "sampled_mib": max(r["peak_sampled"] - r["baseline"] for r in ranks) / MIB,
        "model_mib": max(r["after_build"] - r["baseline"] for r in ranks) / MIB,
        "baseline_mib": max(r["baseline"] for r in ranks) / MIB,
        "expected_mib": sum(exp.values()) / MIB, "expected_parts": {k: v / MIB for k, v in exp.items()},
        "plan_mib": planned_bytes(cfg) / MIB,
        "losses": ranks[0]["losses"], "gemm_shape": ranks[0]["gemm_shape"],
    }


def library_version() -> str:
    """Where hybridfc was imported from, and its git commit (+ "dirty" with uncommitted edits)."""
    import subprocess

    import hybridfc

    where = os.path.dirname(os.path.abspath(hybridfc.__file__))
    try:
        git = ["git", "-C", where]
        commit = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(git + ["status", "--porcelain", "--", "."], capture_output=True, text=True,
                               check=True).stdout.strip()
        state = f"git {commit}" + (" + uncommitted changes in hybridfc/" if dirty else " (clean)")
    except (OSError, subprocess.CalledProcessError):
        state = "not a git checkout"
    return f"hybridfc {hybridfc.__version__} from {where}, {state}"


def placement(args) -> str:
    """How the ranks ran, for the reports: ``gloo, 1 thread/rank`` on the CPU."""
    if getattr(args, "device", "cpu") == "cpu":
        return "gloo, 1 thread/rank"
    return f"NCCL, one {args.gpu_name} per rank"


def memory_basis(args, before: str) -> str:
    """What the memory tables count, above what (their title)."""
    if getattr(args, "device", "cpu") == "cpu":
        return f"above the RSS baseline taken before the {before}"
    return f"CUDA memory allocated to tensors, above that before the {before}"


def print_cuda_memory_note(args) -> None:
    """On a GPU the memory columns are the CUDA allocator's, not RSS: say so under the tables."""
    if getattr(args, "device", "cpu") == "cuda":
        print("  on cuda every memory column is torch.cuda.memory_allocated (kernel peak: max_memory_allocated,")
        print("  reset where VmHWM is reset; sampled: memory_allocated every 5 ms); cpu = the host's share only")


def share_the_floor(rows: list[dict]) -> None:
    """``store`` and ``recompute`` run the same GEMM shapes: both take the faster of their two
    measurements of the floor (the ratios against it are then the higher, never flattered by a
    floor measured while the machine was slower)."""
    for C in {r["C"] for r in rows}:
        ours = [r for r in rows if r["C"] == C and r["method"] in OURS]
        if len(ours) > 1:
            best = min(ours, key=lambda r: r["floor_ms"])
            for r in ours:
                for key in ("floor_ms", "floor_cpu_ms", "floor_alloc_ms", "gflops", "gemm_gflops"):
                    r[key] = best[key]


def print_report(args, rows: list[dict]) -> None:
    share_the_floor(rows)
    margin = MARGINS[args.margin]
    print()
    print(f"head step = forward + backward + SGD step + zero_grad; {args.world_size} ranks, {placement(args)}; "
          f"global batch {args.batch} ({args.batch // args.world_size}/rank); d={args.dim}; fp32; "
          f"margin {args.margin} s={margin['scale']} m={margin['margin']}")
    print(f"median over {args.steps} steps after {args.warmup} warm-up; per step the max over ranks; torch "
          f"{torch.__version__}; load average (1 min) {args.load_start:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} at end, {os.cpu_count()} CPUs")
    print(args.version)
    print()
    print("TIME (ms per step, per rank)")
    hdr = (f"{'C':>9} {'method':>9} | {'wall':>8} {'min':>7} {'max':>7} | {'fwd':>7} {'bwd':>7} {'opt':>6} | "
           f"{'floor':>6} {'GF/s':>4} {'wall/fl':>7} | {'cpu':>8} {'cpu fl':>6} {'cpu/fl':>6} | {'fl alloc':>8}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        f, b_, o = r["phase_ms"]
        print(f"{r['C']:>9,} {r['method']:>9} | {r['ms']:>8.1f} {r['ms_min']:>7.1f} {r['ms_max']:>7.1f} | "
              f"{f:>7.1f} {b_:>7.1f} {o:>6.1f} | {r['floor_ms']:>6.1f} {r['gflops']:>4.0f} "
              f"{r['ms'] / r['floor_ms']:>7.2f} | {r['cpu_ms']:>8.1f} {r['floor_cpu_ms']:>6.1f} "
              f"{r['cpu_ms'] / r['floor_cpu_ms']:>6.2f} | {r['floor_alloc_ms']:>8.1f}")
    print()
    print(f"MEMORY (MiB per rank, max over ranks, {memory_basis(args, 'model')})")
    hdr = (f"{'C':>9} {'method':>9} | {'baseline':>8} {'model':>6} {'peak':>6} {'sampled':>7} | "
           f"{'expect':>6} {'peak/exp':>8} {'plan':>6} {'peak/plan':>9} | expect = weight + grad + momentum + logits buffer")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        p = r["expected_parts"]
        m, n = r["gemm_shape"]
        print(f"{r['C']:>9,} {r['method']:>9} | {r['baseline_mib']:>8.0f} {r['model_mib']:>6.0f} "
              f"{r['peak_mib']:>6.0f} {r['sampled_mib']:>7.0f} | {r['expected_mib']:>6.0f} "
              f"{r['peak_mib'] / r['expected_mib']:>8.2f} {r['plan_mib']:>6.0f} {r['peak_mib'] / r['plan_mib']:>9.2f} | "
              f"{p['weight']:.0f} + {p['grad']:.0f} + "
              f"{p['momentum']:.0f} + {p['logits']:.0f} ({m}x{n})")
    print()
    print("wall = median step time between barriers; cpu = CPU time of the rank's process (all threads) in the")
    print("  step, blind to time the rank waits or is descheduled; fwd/bwd/opt = wall time of the phases;")
    print("  floor = the step's 3 GEMMs (logits E@W^T, dE = G@W, dW = G^T@E; 3 x 2*M*N*d FLOPs per rank) at the")
    print("  rate plain torch.mm of those shapes reaches into a preallocated output in the same process, 1")
    print("  thread, both ranks at once (wall, GF/s; and CPU time); fl alloc = the same GEMMs with torch.mm")
    print("  allocating its output, as a step does (fresh pages, page faults); model = RSS after building")
    print("  model + optimizer; peak = kernel RSS high-water mark (VmHWM, reset after the build) during the")
    print("  steps; sampled = max of 5 ms RSS samples (cross-check); plan = what `hybridfc plan` predicts for the")
    print("  peak (model-parallel with the method's logits mode; naive: data-parallel); store and recompute run the same GEMM")
    print("  shapes and share the faster of their two floor measurements")
    print_cuda_memory_note(args)
    print("  GEMM GF/s (logits/dE/dW): " + "; ".join(
        f"{r['C']:,} {r['method']} " + "/".join(f"{v:.0f}" for v in r["gemm_gflops"].values()) for r in rows))
    print()
    by = {(r["C"], r["method"]): r for r in rows}
    for C in args.classes:
        store, recompute, naive = (by.get((C, m)) for m in METHODS)
        if store and naive:
            diff = max(abs(a - b) for a, b in zip(store["losses"], naive["losses"]))
            print(f"C={C:,}: naive/store time {naive['ms'] / store['ms']:.2f}x wall, "
                  f"{naive['cpu_ms'] / store['cpu_ms']:.2f}x cpu | store/naive peak memory "
                  f"{store['peak_mib'] / naive['peak_mib']:.2f} | loss store/naive step 0 "
                  f"{store['losses'][0]:.4f}/{naive['losses'][0]:.4f}, max |diff| {diff:.1e}")
        if store and recompute:
            diff = max(abs(a - b) for a, b in zip(store["losses"], recompute["losses"]))
            print(f"C={C:,}: recompute/store time {recompute['ms'] / store['ms']:.2f}x wall | peak beyond weight, "
                  f"gradient and momentum {beyond(recompute):.0f} / {beyond(store):.0f} MiB = "
                  f"{beyond(recompute) / beyond(store):.3f} | loss max |diff| {diff:.1e}")
    print()
    print("targets:")
    for r in rows:
        if r["method"] in OURS:
            bound = FLOOR_TARGETS[r["method"]]
            ratio = r["ms"] / r["floor_ms"]
            print(f"  C={r['C']:,} {r['method']:>9} <= {bound} x three-GEMM floor (wall / cpu): {ratio:.2f} / "
                  f"{r['cpu_ms'] / r['floor_cpu_ms']:.2f}  {'PASS' if ratio <= bound else 'FAIL'}")
    for C in args.classes:
        store, recompute, naive = (by.get((C, m)) for m in METHODS)
        if store and naive:
            print(f"  C={C:,} store peak <= 0.6 x naive peak: {store['peak_mib'] / naive['peak_mib']:.2f}  "
                  f"{'PASS' if store['peak_mib'] <= 0.6 * naive['peak_mib'] else 'FAIL'}")
        if store and recompute:
            share = beyond(recompute) / beyond(store)
            print(f"  C={C:,} recompute's peak beyond the dense step's state <= 0.1 x store's: {share:.3f}  "
                  f"{'PASS' if share <= 0.1 else 'FAIL'}")


def beyond(row: dict) -> float:
    """The peak above the baseline less the shard, its dense gradient and its momentum, MiB."""
    parts = row["expected_parts"]
    return row["peak_mib"] - parts["weight"] - parts["grad"] - parts["momentum"]

OURS = ("store", "recompute")
FLOOR_TARGETS = {"store": 1.3, "recompute": 1.5}
METHODS = (*OURS, "naive")
MARGINS = {"cosface": {"type": "cosface", "scale": 64.0, "margin": 0.35},
           "arcface": {"type": "arcface", "scale": 64.0, "margin": 0.5}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=256, help="global batch (split evenly over ranks)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--margin", choices=sorted(MARGINS), default="cosface")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--mm-reps", type=int, default=3, help="timed repetitions of each floor GEMM")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
    p.add_argument("--json", type=str, default=None,
                   help="also write the results as JSON (read by benchmarks/plot_results.py)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the ranks run (cuda: rank r on GPU r, NCCL; options left at their defaults "
                        f"take the GPU preset {GPU_PRESET})")
    args = p.parse_args(argv)
    if args.device == "cuda":
        use_gpus(p, args, GPU_PRESET)
    if args.batch % args.world_size:
        p.error("--batch must be divisible by --world-size")

    configs = [dict(method=m, classes=C, dim=args.dim, batch=args.batch, steps=args.steps,
                    warmup=args.warmup, world_size=args.world_size, margin=MARGINS[args.margin],
                    mm_reps=args.mm_reps, device=args.device)
               for C in args.classes for m in args.methods]
    args.version = library_version()  # before the runs: the code the spawned ranks import
    args.load_start = os.getloadavg()[0]
    rows, start = [], time.perf_counter()
    for i, cfg in enumerate(configs, 1):
        r = summarize(cfg, run_on_ranks(worker, cfg, cfg["world_size"], args.timeout,
                                        f"{cfg['method']} C={cfg['classes']}"))
        rows.append(r)
        print(f"[{i}/{len(configs)}] {cfg['method']:>5} C={cfg['classes']:,}: {r['ms']:.1f} ms/step, "
              f"peak {r['peak_mib']:.0f} MiB/rank  ({time.perf_counter() - start:.0f} s elapsed)", flush=True)
    print_report(args, rows)
    if args.json:
        write_json(args, rows)


def use_gpus(parser: argparse.ArgumentParser, args, preset: dict) -> None:
    """``--device cuda``: the options left at their defaults take ``preset``; one GPU per rank;
    the GPU's name goes into the report."""
    for name, value in preset.items():
        if getattr(args, name) == parser.get_default(name):
            setattr(args, name, value)
    if not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.world_size > torch.cuda.device_count():
        parser.error(f"--world-size {args.world_size}: one GPU per rank, and there are {torch.cuda.device_count()}")
    args.gpu_name = torch.cuda.get_device_name(0)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def write_json(args, rows: list[dict]) -> None:
    """``{"machine", "results": [{"method", "classes", "samples_per_s", "peak_mib", ...}]}``."""
    import json

    ranks = "gloo, 1 thread each" if args.device == "cpu" else placement(args)
    machine = (f"{cpu_model()}, {os.cpu_count()} CPUs; torch {torch.__version__}; {args.world_size} ranks "
               f"{ranks}; B={args.batch}, d={args.dim}, {args.margin}; {args.version}")
    results = [{"method": r["method"], "classes": r["C"],
                "samples_per_s": args.batch / (r["ms"] / 1e3),
                "peak_mib": r["peak_mib"], "ms_per_step": r["ms"], "cpu_ms_per_step": r["cpu_ms"],
                "floor_ms": r["floor_ms"], "floor_alloc_ms": r["floor_alloc_ms"],
                "expected_mib": r["expected_mib"], "sampled_peak_mib": r["sampled_mib"],
                "losses": r["losses"]} for r in rows]
    with open(args.json, "w") as f:
        json.dump({"machine": machine, "results": results}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
