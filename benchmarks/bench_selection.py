"""Class selection side by side: ``full``, ``partial``, ``knn`` and ``hf`` head steps, graph and index
builds, and the recall of the approximate class graph.

Four measurements in one run, each configuration in its own freshly spawned process group of
``--world-size`` ranks (gloo, CPU, ``OMP_NUM_THREADS=1`` and ``torch.set_num_threads(1)`` per rank):

1. **Head step** (as in ``bench_head_step.py``): ``ClassParallelFC(C, d, margin, seed=0,
   selection=SPEC)`` with ``build_head_optimizer(head, {"type": "sgd", "params": {lr 0.1,
   momentum 0.9, wd 5e-4}})``; timed per step and rank: forward + backward + ``opt.step()`` +
   ``opt.zero_grad()`` between two barriers; the step time is the max over ranks, the table the
   median over the timed steps. SPEC is ``{"type": "full"}`` (once per C) and, for every budget
   (``--budgets``: a rate such as 0.1 = 10 % of each shard, or a row count such as 8192),
   ``partial``, ``knn`` (k = 32, ``rebuild_interval`` 0: built once, never rebuilt) and ``hf``
   (k = 32, idem), index ``auto``. Every method sees the same synthetic batches
   (``bench_head_step.batch_for_step``: Gaussian features, uniform labels). The time the
   selection itself takes (``head.selection.select``, inside the forward) is shown apart.
   ``knn`` and ``hf`` build their graph / index at their first forward, i.e. in the first warm-up
   step: it is not part of the step time, the table reports it (the library's own
   ``build_seconds``) and the first step's time. The knn graph depends only on the initial rows
   and the seed, so by default the first knn configuration of each C saves it and the knn
   configurations of the other budgets at that C load it (``selection.load_state_dict``, as from
   a checkpoint) instead of building the identical graph again (``--rebuild-each`` builds it in
   every one).

   Memory per rank, as in ``bench_head_step.py`` (``memory_probe``): baseline = RSS after
   imports (faiss included), process-group init, a tiny autograd / SGD / faiss warm-up and
   ``malloc_trim``, before the head exists. Two kernel high-water marks (VmHWM, reset with
   ``clear_refs``): *warm-up peak* from right before the first warm-up step to the end of the
   warm-up (holds the first-forward build of the graph / index), and *step peak*, reset after
   the warm-up (and a ``malloc_trim``) and read after the last timed step: the steady-state
   peak of a training step, with whatever the selection keeps (graph, index) resident. Both are
   reported above the baseline; a 5 ms RSS sampler cross-checks each.

2. **Ratios**, marked ✓/✗ against their targets: at the largest C, full's step time / each
   sparse method's at the 10 % budget (target ≥ 8×) and each one's step peak / full's (target ≤
   0.6×); for the fixed row budget (8192), each method's step time at the largest C / at the
   smallest (target ≤ 1.3×: a fixed budget should cost the same whatever C). Time checks use the
   wall-clock medians; the same ratio of CPU times is printed beside them (the one to trust when
   the machine is shared: the time table's cpu/wall column shows it).

3. **Graph and index builds**: the knn graph (``build_knn_graph``, all ranks, ring exchange)
   from the head's initial rows with the ``ivf`` and ``hnsw`` indexes at every C, and ``exact``
   where the estimate (the rank's exact-search rate on its own rows × the queries it must
   answer) is below ``--exact-limit`` seconds, else skipped with the estimate printed. The
   ``auto`` kind's graph is the one the knn head step built (reused, not built twice). The hf
   index build comes from the hf head steps. Wall and CPU time (max over ranks) and the build's
   peak RSS above the RSS before it.

4. **Recall@k** (k = 32) of the approximate graph against exact neighbours, on ``--queries``
   (2000) query classes drawn once per C (seeded): exact = ``exact_neighbours`` over all C
   centres, blockwise matmul in the parent process. Three kinds of centres: (a) ``init``: the
   head's initial rows (isotropic Gaussian, normalised; the hardest case for IVF) - the graph's
   own rows; (b) ``struct``: the synthetic task's centres, families of 8 classes (family centre
   N(0, I) + 0.15·N(0, I), ``hybridfc.data.SyntheticClasses.centres``), normalised: isotropic
   beyond the 7 siblings; (c) ``lowdim``: points of a random 16-dimensional subspace plus
   0.05·N(0, I), normalised (trained centres concentrate near a low-dimensional set). The
   recall is that of the index's own breadth (no ``min_recall``; ``bench_graph_recall.py``
   measures the graph with it and checks the target). For (b) and (c), and for the ``ivf``
   nprobe sweep, the graph's rows of the sampled classes are computed without building the
   whole graph: each rank builds the same ``ShardIndex`` over its shard that
   ``build_knn_graph`` builds, searches it for the sampled classes' k + 1 nearest rows, and the parent merges the ranks' lists by score (ties
   to the smaller id) and drops the class itself, as ``build_knn_graph`` does for every row.
   On (a) the emulation at the library's nprobe is printed beside the real graph's recall as a
   check. The sweep sets ``ShardIndex.num_probes`` on the benchmark's own index instance (it is
   read per search); nlist is fixed by ``index.ivf_lists`` and is not swept. Its estimate of the
   graph's search time at each nprobe (µs per query × the ⌈C/N⌉ × N queries a rank answers) is
   printed beside the exact graph's time (built or estimated). The ``family`` column of (b) is
   the fraction of each class's 7 family siblings (its nearest classes by construction) in its
   list. ``--struct-graphs build`` builds the whole graph for (b) too (its build time then
   appears in the build table).

On a GPU (``--device cuda``) the head steps (1, 2) run as ``bench_head_step.py --device cuda``
runs them: rank r on GPU r, the head's collectives on an NCCL group, clocks read after
``torch.cuda.synchronize()``, memory = the CUDA allocator's bytes in tensors instead of RSS; the
graph builds and the recall (3, 4) stay on the CPU. Options left at their defaults take a preset
sized for a 1-2 minute run on one H100/H200: C = 1M, budget 10 %, global batch 1024, 10 timed
steps, 1 rank, no graph builds (``--graph-kinds`` brings them back).

The library measured is whatever ``import hybridfc`` finds (printed, with its git state).
Duration on an idle 2-CPU machine: ``--quick`` about 3 minutes; the command below about 17
minutes, 9 of them the knn graph at 1M (ivf, in the knn head step's first forward); ``hnsw`` in
``--graph-kinds`` adds about 12 minutes at 1M; the exact graph at 1M (estimated ~90 min) is
skipped by ``--exact-limit``.

    python benchmarks/bench_selection.py --classes 100000 1000000 --budgets 0.1 8192 \\
        --graph-kinds ivf exact --json benchmarks/selection_step.json
    python benchmarks/bench_selection.py --quick          # smoke test: small C, few steps
    python benchmarks/bench_selection.py --device cuda    # the GPU preset
    python benchmarks/bench_selection.py --report benchmarks/selection_step.json   # reprint
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch / faiss start OpenMP; the spawned ranks inherit it

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench_head_step import (MARGINS, cpu_model, head_group, library_version, memory_basis,  # noqa: E402
                             memory_probes, placement, print_cuda_memory_note, synchronize, timed_step, use_gpus)
from memory_probe import hwm_bytes, release_free_heap, reset_hwm, rss_bytes  # noqa: E402
from ranks import run_on_ranks  # noqa: E402

MIB = 1024 * 1024
SGD_PARAMS = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
SPARSE = ("partial", "knn", "hf")
CENTRES = {"init": "(a) head's initial rows", "struct": "(b) families of 8 (0.15 spread)",
           "lowdim": "(c) intrinsic dimension 16 (+0.05 noise)"}
STRUCTURED = ("struct", "lowdim")
LOWDIM_RANK, LOWDIM_NOISE, LOWDIM_BLOCK = 16, 0.05, 32768
TIME_TARGET, MEMORY_TARGET, FIXED_TARGET, RECALL_TARGET = 8.0, 0.6, 1.3, 0.9
GPU_PRESET = {"classes": [1_000_000], "budgets": [0.1], "batch": 1024, "steps": 10, "world_size": 1,
              "graph_kinds": []}


# ----------------------------------------------------------------------------- shared helpers
def parse_budget(text: str) -> "int | float":
    """``"0.1"`` -> 0.1 (a rate of each shard), ``"8192"`` -> 8192 (rows)."""
    return float(text) if any(ch in text for ch in ".eE") else int(text)


def budget_label(budget) -> str:
    if budget is None:
        return "all"
    return f"{budget * 100:g}%" if isinstance(budget, float) else str(budget)


def class_centres(kind: str, num_classes: int, start: int, count: int, dim: int) -> torch.Tensor:
    """L2-normalised fp32 centres of classes ``[start, start + count)``.

    ``init``: the head's initial rows (``ClassParallelFC(seed=0)``), exactly what the knn
    selection snapshots at its first forward. ``struct``: ``SyntheticClasses`` centres, families
    of 8 classes, a family centre N(0, I) plus 0.15 N(0, I) per class."""
    from hybridfc.head.class_parallel_fc import init_class_rows

    if kind == "init":
        return F.normalize(init_class_rows(start, count, dim, seed=0, std=0.01), dim=1)
    if kind == "lowdim":
        return lowdim_centres(start, count, dim)
    from hybridfc.data import SyntheticClasses

    data = SyntheticClasses(num_classes=num_classes, samples_per_class=1, input_dim=dim, family_size=8,
                            family_spread=0.15, seed=0)
    out = torch.empty(count, dim)
    block = 32768
    for begin in range(0, count, block):
        ids = torch.arange(start + begin, start + min(begin + block, count))
        out[begin:begin + ids.numel()] = F.normalize(data.centres(ids), dim=1)
    return out


def lowdim_centres(start: int, count: int, dim: int) -> torch.Tensor:
    """``lowdim`` centres: a point of a fixed random 16-dimensional subspace plus 0.05 N(0, I) noise,
    normalised; class c's row depends on c only (drawn by aligned blocks of ids)."""
    basis = torch.linalg.qr(torch.randn(dim, LOWDIM_RANK, generator=torch.Generator().manual_seed(7)))[0]
    out = torch.empty(count, dim)
    for block in range(start // LOWDIM_BLOCK, -(-(start + count) // LOWDIM_BLOCK)):
        g = torch.Generator().manual_seed(1000 + block)
        rows = torch.randn(LOWDIM_BLOCK, LOWDIM_RANK, generator=g) @ basis.t() / LOWDIM_RANK**0.5
        rows += LOWDIM_NOISE * torch.randn(LOWDIM_BLOCK, dim, generator=g)
        lo, hi = max(start, block * LOWDIM_BLOCK), min(start + count, (block + 1) * LOWDIM_BLOCK)
        out[lo - start:hi - start] = F.normalize(rows[lo - block * LOWDIM_BLOCK:hi - block * LOWDIM_BLOCK], dim=1)
    return out


def sample_classes(num_classes: int, count: int) -> torch.Tensor:
    """The query classes of the recall measurement, sorted, the same for every method and kind."""
    g = torch.Generator().manual_seed(2024)
    return torch.randperm(num_classes, generator=g)[:min(count, num_classes)].sort().values


def rows_of_sample(graph: torch.Tensor, sample: torch.Tensor, class_start: int) -> tuple[list, torch.Tensor]:
    """This rank's graph rows of the sampled classes it owns: (their ids, (n, k) int64)."""
    local = sample - class_start
    mine = (local >= 0) & (local < graph.shape[0])
    return sample[mine].tolist(), graph[local[mine]].to(torch.int64)


def gather_sample_rows(ranks: list[dict], sample: torch.Tensor, k: int) -> torch.Tensor:
    """(q, k) graph rows of the sampled classes, from the ranks that own them."""
    rows = torch.full((sample.numel(), k), -1, dtype=torch.int64)
    where = {int(c): i for i, c in enumerate(sample.tolist())}
    for r in ranks:
        ids, part = r["sample_rows"]
        for j, c in enumerate(ids):
            rows[where[c]] = part[j]
    return rows


def family_recall(rows: torch.Tensor, sample: torch.Tensor, num_classes: int, family: int = 8) -> float:
    """Mean fraction of each sampled class's family siblings (``struct`` centres: its nearest
    classes by construction) that its ``(q, k)`` list holds."""
    first = sample // family * family
    siblings = first.unsqueeze(1) + torch.arange(family)
    valid = (siblings != sample.unsqueeze(1)) & (siblings < num_classes)
    found = (rows.unsqueeze(1) == siblings.unsqueeze(2)).any(dim=2) & valid
    return float(found.sum() / valid.sum())


def merge_shard_lists(parts: list[tuple[torch.Tensor, torch.Tensor]], query_ids: torch.Tensor,
                      k: int) -> torch.Tensor:
    """What ``build_knn_graph`` makes of the queries' per-shard lists: every shard's ``k + 1``
    nearest (scores, global ids) merged by score, ties to the smaller id, then the class itself
    dropped (or, where it is not in the list, the last entry). ``(q, k)`` int64."""
    scores = torch.cat([s for s, _ in parts], dim=1)
    ids = torch.cat([i for _, i in parts], dim=1)
    by_id = ids.argsort(dim=1, stable=True)
    scores, ids = scores.gather(1, by_id), ids.gather(1, by_id)
    best = scores.argsort(dim=1, descending=True, stable=True)[:, :k + 1]
    ids = ids.gather(1, best)
    keep = ids != query_ids.unsqueeze(1)
    keep[keep.all(dim=1), -1] = False
    return ids[keep].view(ids.shape[0], k)


def import_faiss():
    try:
        import faiss
    except ImportError:
        return None
    faiss.omp_set_num_threads(1)
    return faiss


def warm_up_process(dim: int, device: str = "cpu") -> None:
    """Before the baseline: page in the autograd / GEMM / gloo / faiss code and let torch.optim
    do its lazy imports (torch._dynamo), so none of it counts as the head's memory."""
    import numpy as np

    x = torch.randn(8, dim, device=device, requires_grad=True)
    F.cross_entropy(F.normalize(x, dim=1) @ torch.randn(dim, 16, device=device),
                    torch.zeros(8, dtype=torch.long, device=device)).backward()
    tiny = torch.optim.SGD([x], **SGD_PARAMS)
    tiny.step()
    tiny.zero_grad()
    dist.all_reduce(torch.ones(1024))
    faiss = import_faiss()
    if faiss is not None:
        flat = faiss.IndexFlatIP(8)
        flat.add(np.ones((4, 8), dtype=np.float32))
        flat.search(np.ones((2, 8), dtype=np.float32), 2)
    del x, tiny
    release_free_heap()
    dist.barrier()


def max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


# ----------------------------------------------------------------------------- step worker
def step_worker(rank: int, cfg: dict) -> dict:
    C, d, B, device = cfg["classes"], cfg["dim"], cfg["batch"], cfg["device"]
    import hybridfc
    import hybridfc.config  # noqa: F401  (imported lazily by the head's builders: load it before the baseline)
    from hybridfc.selection.index import GRAPH_EXACT_MAX_ROWS, choose_index_kind

    group, probes = head_group(device, rank), memory_probes(device)
    warm_up_process(d, device)
    baseline = probes.now()
    head = hybridfc.ClassParallelFC(C, d, margin=cfg["margin"], seed=0, selection=cfg["spec"], device=device,
                                    group=group)
    opt = hybridfc.build_head_optimizer(head, {"type": "sgd", "params": dict(SGD_PARAMS)})
    sel = head.selection
    if cfg.get("load_graph"):
        graph = torch.load(cfg["load_graph"].format(rank=rank))
        sel.load_state_dict({"positives_only_steps": 0, "graph": graph, "built_from_step": 0, "pending": None})
        del graph
    release_free_heap()
    after_build = probes.now()

    select_times = []
    select = sel.select

    def timed_select(*args, **kwargs):
        synchronize(device)
        start = time.perf_counter()
        out = select(*args, **kwargs)
        synchronize(device)
        select_times.append(time.perf_counter() - start)
        return out

    sel.select = timed_select
    if not probes.reset_peak():
        raise RuntimeError("/proc/self/clear_refs is not writable: the kernel peak cannot be reset")

    def run_steps(first: int, count: int, record: dict) -> None:
        for step in range(first, first + count):
            loss, wall, cpu, phase = timed_step(head, opt, rank, step, B, d, C, device)
            record["walls"].append(wall)
            record["cpus"].append(cpu)
            record["phases"].append((select_times[-1], *phase))
            record["losses"].append(float(loss))

    dist.barrier()
    sampler = probes.sampler(0.005)
    sampler.start()
    warm = {"walls": [], "cpus": [], "phases": [], "losses": []}
    run_steps(0, cfg["warmup"], warm)
    warm_sampled, warm_hwm = sampler.stop(), probes.peak()

    release_free_heap()
    dist.barrier()
    before_steps = probes.now()
    probes.reset_peak()
    sampler = probes.sampler(0.005)
    sampler.start()
    timed = {"walls": [], "cpus": [], "phases": [], "losses": []}
    run_steps(cfg["warmup"], cfg["steps"], timed)
    step_sampled, step_hwm = sampler.stop(), probes.peak()

    out = {"timed": timed, "warm": warm, "baseline": baseline, "after_build": after_build,
           "before_steps": before_steps, "warm_hwm": warm_hwm, "warm_sampled": warm_sampled,
           "step_hwm": step_hwm, "step_sampled": step_sampled, "active_rows": int(sel.budget),
           "positives_only_steps": sel.positives_only_steps, "build_seconds": None, "index_kind": None,
           "ivf": None, "sample_rows": None}
    method = cfg["spec"]["type"]
    if method == "knn":
        out["build_seconds"] = sel.graph.build_seconds[0] if sel.graph.build_seconds else None
        out["index_kind"] = choose_index_kind(head.num_local, sel.kind, GRAPH_EXACT_MAX_ROWS)
        graph = sel.graph.current
        out["sample_rows"] = rows_of_sample(graph, cfg["sample"], head.class_start)
        if cfg.get("save_graph"):
            torch.save(graph.clone(), cfg["save_graph"].format(rank=rank))
    elif method == "hf":
        out["build_seconds"] = sel.index.build_seconds[0] if sel.index.build_seconds else None
        out["index_kind"] = sel.kind
        index = sel.index.current
        if getattr(index, "num_lists", None) is not None:
            out["ivf"] = (index.num_lists, getattr(index, "num_probes", None))
    return out


# ----------------------------------------------------------------------------- graph worker
def graph_worker(rank: int, cfg: dict) -> dict:
    """``build``: the whole knn graph (``build_knn_graph`` over all ranks), timed; ``sampled``: this
    rank's ``ShardIndex`` searched for the sampled classes only (at several nprobe for ivf)."""
    world, C, d, k, kind = cfg["world_size"], cfg["classes"], cfg["dim"], cfg["k"], cfg["kind"]
    from hybridfc.parallel.groups import shard_range
    from hybridfc.selection.graph import build_knn_graph
    from hybridfc.selection.exact import exact_search
    from hybridfc.selection.index import ShardIndex

    warm_up_process(d)
    start, count = shard_range(C, world, rank)
    rows = class_centres(cfg["centres"], C, start, count, d)
    release_free_heap()
    dist.barrier()
    before = rss_bytes()
    reset_hwm()
    out = {"rank": rank, "class_start": start}
    if cfg["mode"] == "build":
        if kind == "exact":  # estimate first: every rank answers ceil(C/N) queries on its rows, N times
            probe = rows[:min(256, count)]
            t0 = time.perf_counter()
            exact_search(probe, rows, k + 1)
            per_query = (time.perf_counter() - t0) / probe.shape[0]
            estimate = max_over_ranks(per_query * -(-C // world) * world)
            out["estimate_s"] = estimate
            if estimate > cfg["exact_limit"]:
                out["skipped"] = True
                return out
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        graph = build_knn_graph(rows, start, C, k, group=None, kind=kind, seed=0)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        dist.barrier()
        out.update(wall=wall, cpu=cpu, peak=hwm_bytes() - before,
                   sample_rows=rows_of_sample(graph, cfg["sample"], start))
        return out

    queries = cfg["queries"]
    t0, c0 = time.perf_counter(), time.process_time()
    index = ShardIndex(rows, kind=kind, seed=0)
    out.update(index_wall=time.perf_counter() - t0, index_cpu=time.process_time() - c0,
               index_peak=hwm_bytes() - before, num_lists=getattr(index, "num_lists", None),
               default_probes=getattr(index, "num_probes", None), searches={})
    probes = [None]
    if kind == "ivf" and out["num_lists"] and out["default_probes"]:
        nlist = out["num_lists"]
        probes = sorted({out["default_probes"], nlist}
                        | {max(1, nlist // f) for f in (64, 32, 16, 8, 4, 2)})
    for p in probes:
        if p is not None:
            index.num_probes = p
        t0 = time.perf_counter()
        scores, found = index.search(queries, k + 1)
        per_query = (time.perf_counter() - t0) / max(1, queries.shape[0])
        ids = torch.where(found >= 0, found + start, found)
        out["searches"][p if p is not None else "default"] = (scores, ids, per_query)
    return out


# ----------------------------------------------------------------------------- process groups
def rank_worker(rank: int, cfg: dict):
    """A head-step or graph configuration on one rank."""
    return (step_worker if cfg["phase"] == "step" else graph_worker)(rank, cfg)


def run_group(cfg: dict, timeout: float, name: str) -> list[dict]:
    """One configuration on a fresh process group; the per-rank results."""
    return run_on_ranks(rank_worker, cfg, cfg["world_size"], timeout, name)


# ----------------------------------------------------------------------------- summaries
def summarize_step(cfg: dict, ranks: list[dict]) -> dict:
    n = cfg["steps"]

    def per_step_max(part, key):
        return [max(r[part][key][i] for r in ranks) for i in range(len(ranks[0][part][key]))]

    walls, cpus = per_step_max("timed", "walls"), per_step_max("timed", "cpus")
    phases = [statistics.median(max(r["timed"]["phases"][i][j] for r in ranks) for i in range(n)) * 1e3
              for j in range(4)]
    first = per_step_max("warm", "walls")
    builds = [r["build_seconds"] for r in ranks if r["build_seconds"] is not None]

    def above(key):
        return max(r[key] - r["baseline"] for r in ranks) / MIB

    spec = cfg["spec"]
    return {
        "method": spec["type"], "C": cfg["classes"], "budget": spec.get("budget"),
        "active_rows": max(r["active_rows"] for r in ranks),
        "ms": statistics.median(walls) * 1e3, "ms_min": min(walls) * 1e3, "ms_max": max(walls) * 1e3,
        "cpu_ms": statistics.median(cpus) * 1e3, "phase_ms": phases,
        "first_step_s": first[0] if first else None,
        "build_s": max(builds) if builds else None, "graph_reused": bool(cfg.get("load_graph")),
        "index_kind": ranks[0]["index_kind"], "ivf": ranks[0]["ivf"],
        "baseline_mib": max(r["baseline"] for r in ranks) / MIB,
        "model_mib": above("after_build"), "resident_mib": above("before_steps"),
        "warm_peak_mib": above("warm_hwm"), "warm_sampled_mib": above("warm_sampled"),
        "peak_mib": above("step_hwm"), "sampled_mib": above("step_sampled"),
        "positives_only_steps": max(r["positives_only_steps"] for r in ranks),
        "losses": ranks[0]["warm"]["losses"] + ranks[0]["timed"]["losses"],
        "load": cfg["load"],
    }


def exact_reference(C: int, d: int, centres_kind: str, sample: torch.Tensor, k: int,
                    cache: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampled classes' centres ``(q, d)`` and their exact neighbours ``(q, k)`` over all C
    centres (parent process, blockwise matmul)."""
    from hybridfc.selection.graph import exact_neighbours

    key = (C, centres_kind)
    if key not in cache:
        t0 = time.perf_counter()
        centres = class_centres(centres_kind, C, 0, C, d)
        queries = centres[sample].clone()
        cache[key] = (queries, exact_neighbours(queries, sample, centres, k))
        del centres
        release_free_heap()
        print(f"    exact neighbours of {sample.numel()} classes over {C:,} {centres_kind} centres: "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    return cache[key]


# ----------------------------------------------------------------------------- reporting
def fmt(value, spec: str, missing: str = "-") -> str:
    """``format(value, spec)``, or ``missing`` aligned to the same width."""
    if value is None:
        width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
        return format(missing, f">{width}" if width else "")
    return format(value, spec)


def print_report(args, steps: list[dict], builds: list[dict], recalls: list[dict], sweeps: list[dict]) -> list[dict]:
    margin = MARGINS[args.margin]
    print()
    print(f"head step = forward + backward + SGD step + zero_grad; {args.world_size} ranks, {placement(args)}; "
          f"global batch {args.batch} ({args.batch // args.world_size}/rank); d={args.dim}; fp32; "
          f"margin {args.margin} s={margin['scale']} m={margin['margin']}; knn/hf k={args.k}, rebuild_interval 0, "
          f"index auto")
    print(f"median over {args.steps} steps after {args.warmup} warm-up (the first warm-up step builds the knn "
          f"graph / hf index); per step the max over ranks; torch {torch.__version__}; load average (1 min) "
          f"{args.load_start:.2f} at start, {getattr(args, 'load_end', None) or os.getloadavg()[0]:.2f} at end, "
          f"{os.cpu_count()} CPUs")
    print(args.version)
    print()
    print("TIME (ms per step, per rank)")
    hdr = (f"{'C':>9} {'method':>7} {'budget':>6} {'rows/rk':>7} | {'wall':>8} {'min':>7} {'max':>7} | "
           f"{'select':>7} {'fwd':>7} {'bwd':>7} {'opt':>6} | {'cpu':>8} {'cpu/wall':>8} | {'1st step':>8} "
           f"{'build':>7} {'index':>5} | {'load':>4}")
    print(hdr)
    print("-" * len(hdr))
    for r in steps:
        s, f, b_, o = r["phase_ms"]
        build = fmt(r["build_s"], ">6.1f") + "s" if r["build_s"] is not None else (
            "reused" if r["graph_reused"] else "-")
        print(f"{r['C']:>9,} {r['method']:>7} {budget_label(r['budget']):>6} {r['active_rows']:>7,} | "
              f"{r['ms']:>8.1f} {r['ms_min']:>7.1f} {r['ms_max']:>7.1f} | {s:>7.1f} {f:>7.1f} {b_:>7.1f} {o:>6.1f} | "
              f"{r['cpu_ms']:>8.1f} {r['cpu_ms'] / r['ms']:>8.2f} | {fmt(r['first_step_s'], '>7.1f')}s "
              f"{build:>7} {r['index_kind'] or '-':>5} | {r['load']:>4.1f}")
    print()
    print(f"MEMORY (MiB per rank, max over ranks, {memory_basis(args, 'head')})")
    hdr = (f"{'C':>9} {'method':>7} {'budget':>6} | {'baseline':>8} {'model':>6} {'warm-up':>7} {'sampled':>7} | "
           f"{'resident':>8} {'step':>6} {'sampled':>7} | {'step/full':>9}")
    print(hdr)
    print("-" * len(hdr))
    full_peak = {r["C"]: r["peak_mib"] for r in steps if r["method"] == "full"}
    for r in steps:
        ratio = r["peak_mib"] / full_peak[r["C"]] if r["C"] in full_peak else None
        print(f"{r['C']:>9,} {r['method']:>7} {budget_label(r['budget']):>6} | {r['baseline_mib']:>8.0f} "
              f"{r['model_mib']:>6.0f} {r['warm_peak_mib']:>7.0f} {r['warm_sampled_mib']:>7.0f} | "
              f"{r['resident_mib']:>8.0f} {r['peak_mib']:>6.0f} {r['sampled_mib']:>7.0f} | {fmt(ratio, '>9.2f')}")
    print()
    print("rows/rk = active rows per rank and step (the whole shard for full); select = head.selection.select")
    print("  (inside fwd); cpu = CPU time of the rank's process in the step (cpu/wall well below 1: the rank")
    print("  waited or was descheduled); 1st step = the first warm-up step, build included; build = the")
    print("  library's build_seconds of the knn graph / hf index (max over ranks; 'reused': loaded from the")
    print("  first knn run at this C); index = the index kind 'auto' chose for the shard; load = 1-min load")
    print("  average when the configuration started. model = RSS after building head + optimizer; warm-up =")
    print("  kernel peak (VmHWM) over the warm-up steps (first-forward build included), sampled = 5 ms RSS")
    print("  samples (cross-check); resident = RSS after the warm-up (graph / index / momentum resident);")
    print("  step = kernel peak over the timed steps (VmHWM reset after the warm-up); step/full = that peak")
    print("  over full's at the same C")
    print_cuda_memory_note(args)

    if builds:
        print()
        print("GRAPH / INDEX BUILDS (wall and CPU: max over ranks; peak: RSS above that before the build, per rank)")
        hdr = (f"{'C':>9} {'centres':>7} {'what':<34} {'kind':>5} {'nlist':>6} {'nprobe':>6} | {'wall s':>8} "
               f"{'cpu s':>8} {'peak MiB':>8} | note")
        print(hdr)
        print("-" * len(hdr))
        for r in builds:
            print(f"{r['C']:>9,} {r['centres']:>7} {r['what']:<34} {r['kind']:>5} {fmt(r.get('nlist'), '>6')} "
                  f"{fmt(r.get('nprobe'), '>6')} | {fmt(r.get('wall'), '>8.1f')} {fmt(r.get('cpu'), '>8.1f')} "
                  f"{fmt(r.get('peak_mib'), '>8.0f')} | {r.get('note', '')}")

    if recalls:
        print()
        print(f"RECALL@{args.k} of the knn graph vs exact neighbours ({args.queries} sampled query classes per C; "
              f"at the index's own breadth; ✓/✗: >= {RECALL_TARGET} on (b) and (c); with min_recall: "
              f"bench_graph_recall.py)")
        hdr = f"{'C':>9} {'centres':>7} {'kind':>5} {'nprobe':>6} | {'recall':>8} {'family':>6} | source"
        print(hdr)
        print("-" * len(hdr))
        for r in recalls:
            mark = ""
            if r["centres"] in STRUCTURED and r["kind"] != "exact":
                mark = " ✓" if r["recall"] >= RECALL_TARGET else " ✗"
            print(f"{r['C']:>9,} {r['centres']:>7} {r['kind']:>5} {fmt(r.get('nprobe'), '>6')} | "
                  f"{r['recall']:>6.3f}{mark or '  '} {fmt(r.get('family'), '>6.3f')} | {r['source']}")
        print("  recall = mean |approximate list ∩ exact list| / k; family = fraction of the 7 family siblings of a")
        print("  (b) class (its nearest classes by construction) in its list; ✓/✗ against the target on (b), (c)")

    exact_time = {}
    for b in builds:
        if b["kind"] == "exact" and b["what"].startswith("knn graph") and b["centres"] == "init":
            if b.get("wall") is not None:
                exact_time[b["C"]] = f"the exact graph (recall 1) took {b['wall']:.0f} s"
            elif "estimated" in b.get("note", ""):
                exact_time[b["C"]] = "the exact graph (recall 1) is " + b["note"].split(" > ")[0].replace(
                    "skipped: ", "")
    if sweeps:
        print()
        print("IVF nprobe SWEEP (same per-shard index as build_knn_graph's; recall of the sampled classes' rows;")
        print("  search = per query and shard, 1 thread; graph search est. = that x ceil(C/N) queries x N hops,")
        print("  per rank, plus the index build)")
        hdr = (f"{'C':>9} {'centres':>7} {'nlist':>6} {'nprobe':>6} {'scan':>6} | {'recall':>6} | "
               f"{'us/query':>8} {'graph search est.':>17}")
        print(hdr)
        print("-" * len(hdr))
        for r in sweeps:
            tag = " (library default)" if r["default"] else ""
            print(f"{r['C']:>9,} {r['centres']:>7} {r['nlist']:>6} {r['nprobe']:>6} {r['nprobe'] / r['nlist']:>6.1%} | "
                  f"{r['recall']:>6.3f} | {r['us_per_query']:>8.0f} {r['graph_search_est_s']:>16.0f}s{tag}")
        for (C, centres), group in _group(sweeps, ("C", "centres")).items():
            reach = [r for r in group if r["recall"] >= RECALL_TARGET]
            default = next((r for r in group if r["default"]), None)
            if C in exact_time and centres == "init":
                print(f"  C={C:,}: {exact_time[C]}")
            if reach:
                best = min(reach, key=lambda r: r["nprobe"])
                print(f"  C={C:,} {centres}: nprobe {best['nprobe']} of {best['nlist']} lists "
                      f"({best['nprobe'] / best['nlist']:.1%} scanned) is the smallest in the sweep with recall >= "
                      f"{RECALL_TARGET} ({best['recall']:.3f}; est. graph search {best['graph_search_est_s']:.0f} s"
                      + (f" vs {default['graph_search_est_s']:.0f} s at the default {default['nprobe']})" if default
                         else ")"))
            else:
                print(f"  C={C:,} {centres}: no nprobe in the sweep reaches recall {RECALL_TARGET} "
                      f"(best {max(r['recall'] for r in group):.3f})")

    return print_ratios(args, steps)


def _group(rows: list[dict], keys: tuple) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def print_ratios(args, steps: list[dict]) -> list[dict]:
    by = {(r["C"], r["method"], r["budget"]): r for r in steps}
    big, small = max(args.classes), min(args.classes)
    rate = next((b for b in args.budgets if isinstance(b, float)), None)
    fixed = next((b for b in args.budgets if isinstance(b, int)), None)
    checks = []

    def check(label: str, value: float, target: float, higher: bool, cpu: "float | None" = None) -> None:
        def ok(v):
            return v >= target if higher else v <= target

        checks.append({"check": label, "value": value, "target": ("≥ " if higher else "≤ ") + f"{target:g}",
                       "pass": ok(value), "cpu_value": cpu, "cpu_pass": None if cpu is None else ok(cpu)})

    full = by.get((big, "full", None))
    if full and rate is not None:
        for m in SPARSE:
            r = by.get((big, m, rate))
            if r:
                check(f"C={big:,} full / {m} {budget_label(rate)} step time", full["ms"] / r["ms"], TIME_TARGET, True,
                      full["cpu_ms"] / r["cpu_ms"])
        for m in SPARSE:
            r = by.get((big, m, rate))
            if r:
                check(f"C={big:,} {m} {budget_label(rate)} / full step peak memory", r["peak_mib"] / full["peak_mib"],
                      MEMORY_TARGET, False)
    if fixed is not None and big != small:
        for m in SPARSE:
            hi, lo = by.get((big, m, fixed)), by.get((small, m, fixed))
            if hi and lo:
                check(f"{m} {fixed} rows: step time C={big:,} / C={small:,}", hi["ms"] / lo["ms"], FIXED_TARGET, False,
                      hi["cpu_ms"] / lo["cpu_ms"])
    if checks:
        print()
        print("TARGETS")
        width = max(len(c["check"]) for c in checks)
        for c in checks:
            cpu = "" if c["cpu_value"] is None else f"   (cpu time: {c['cpu_value']:.3f} {'✓' if c['cpu_pass'] else '✗'})"
            print(f"  {c['check']:<{width}} : {c['value']:>7.3f}   target {c['target']:<5} {'✓' if c['pass'] else '✗'}{cpu}")
        print("  time checks use the wall-clock medians; the CPU-time ratio beside them is the one to trust when")
        print("  the machine was shared (cpu/wall well below 1 in the time table); the recall target (with")
        print("  min_recall) is checked by bench_graph_recall.py")
    return checks


# ----------------------------------------------------------------------------- the run
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--methods", nargs="+", choices=["full", *SPARSE], default=["full", *SPARSE])
    p.add_argument("--budgets", type=parse_budget, nargs="+", default=[0.1, 8192],
                   help="rates (0.1: 10%% of each shard) and/or rows per rank (8192)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=256, help="global batch (split evenly over ranks)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps (the first one builds graph / index)")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--margin", choices=sorted(MARGINS), default="arcface")
    p.add_argument("--k", type=int, default=32, help="neighbours per class (knn) / per sample (hf), and recall@k")
    p.add_argument("--queries", type=int, default=2000, help="sampled query classes for the recall")
    p.add_argument("--graph-kinds", nargs="*", choices=["ivf", "hnsw", "exact"], default=["ivf", "hnsw", "exact"],
                   help="knn graph builds to time and measure the recall of (none: skip parts 3-4)")
    p.add_argument("--exact-limit", type=float, default=300.0,
                   help="skip an exact graph build whose estimate exceeds this many seconds")
    p.add_argument("--struct-graphs", choices=["sampled", "build"], default="sampled",
                   help="(b) recall: search per-shard indexes for the sampled classes, or build the whole graph")
    p.add_argument("--rebuild-each", action="store_true",
                   help="build the knn graph in every knn configuration instead of reusing the first one's")
    p.add_argument("--timeout", type=float, default=4 * 3600.0, help="seconds per configuration")
    p.add_argument("--json", type=str, default=None, help="also write the results as JSON")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: C = 20k and 80k, 3 steps after 2 warm-up, 500 recall queries")
    p.add_argument("--report", type=str, default=None, metavar="JSON",
                   help="print the report of a JSON written by --json, and run nothing")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the head steps run (cuda: rank r on GPU r, NCCL; options left at their defaults "
                        f"take the GPU preset {GPU_PRESET})")
    args = p.parse_args(argv)
    if args.report:
        reprint(args.report)
        return
    if args.device == "cuda":
        use_gpus(p, args, GPU_PRESET)
    if args.quick:
        args.classes = [20_000, 80_000] if args.classes == p.get_default("classes") else args.classes
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 2)
        args.queries = min(args.queries, 500)
    if args.batch % args.world_size:
        p.error("--batch must be divisible by --world-size")
    if args.warmup < 1:
        p.error("--warmup must be >= 1: the first warm-up step builds the knn graph / hf index")
    args.classes = sorted(args.classes)
    args.version = library_version()
    args.load_start = os.getloadavg()[0]
    margin = MARGINS[args.margin]

    steps_cfg = []
    for C in args.classes:
        if "full" in args.methods:
            steps_cfg.append((C, {"type": "full"}))
        for budget in args.budgets:
            for m in SPARSE:
                if m in args.methods:
                    spec = {"type": m, "budget": budget}
                    if m in ("knn", "hf"):
                        spec.update(k=args.k, rebuild_interval=0)
                    steps_cfg.append((C, spec))

    started = time.perf_counter()
    t_wall = time.strftime("%H:%M:%S")
    print(f"{args.version}\nstart {t_wall}, load {args.load_start:.2f}; {len(steps_cfg)} head-step configurations, "
          f"then graph builds and recall for C = {', '.join(f'{c:,}' for c in args.classes)}", flush=True)

    def elapsed() -> str:
        return f"{time.perf_counter() - started:.0f} s elapsed"

    steps, builds, recalls, sweeps = [], [], [], []
    samples = {C: sample_classes(C, args.queries) for C in args.classes}
    knn_graphs: dict = {}  # C -> (index kind, its rows of the sampled classes): the knn head step's own graph
    with tempfile.TemporaryDirectory(prefix="bench_selection_") as tmp:
        for i, (C, spec) in enumerate(steps_cfg, 1):
            cfg = dict(phase="step", classes=C, dim=args.dim, batch=args.batch, steps=args.steps,
                       warmup=args.warmup, world_size=args.world_size, margin=margin, spec=spec,
                       sample=samples[C], load=os.getloadavg()[0], device=args.device)
            graph_file = os.path.join(tmp, f"knn_graph_C{C}_rank{{rank}}.pt")
            if spec["type"] == "knn" and not args.rebuild_each:
                if C in knn_graphs:
                    cfg["load_graph"] = graph_file
                else:
                    cfg["save_graph"] = graph_file
            name = f"{spec['type']} C={C:,} budget={budget_label(spec.get('budget'))}"
            note = " (builds its knn graph / hf index in the first warm-up step)" if spec["type"] in ("knn", "hf") \
                and not cfg.get("load_graph") else (" (knn graph loaded from the first knn run)"
                                                    if cfg.get("load_graph") else "")
            print(f"[step {i}/{len(steps_cfg)}] {name}{note} ... (start {time.strftime('%H:%M:%S')}, "
                  f"load {cfg['load']:.2f})", flush=True)
            ranks = run_group(cfg, args.timeout, name)
            r = summarize_step(cfg, ranks)
            steps.append(r)
            extra = f", build {r['build_s']:.1f} s ({r['index_kind']})" if r["build_s"] is not None else ""
            print(f"    {r['ms']:.1f} ms/step (cpu {r['cpu_ms']:.1f}), select {r['phase_ms'][0]:.1f} ms, "
                  f"step peak {r['peak_mib']:.0f} MiB/rank{extra}  ({elapsed()})", flush=True)
            if spec["type"] == "knn" and C not in knn_graphs and r["build_s"] is not None:
                knn_graphs[C] = (r["index_kind"], gather_sample_rows(ranks, samples[C], args.k))
            if spec["type"] == "hf" and r["build_s"] is not None and not any(
                    b["C"] == C and b["what"].startswith("hf index") for b in builds):
                nlist, nprobe = r["ivf"] if r["ivf"] else (None, None)
                builds.append({"C": C, "centres": "init", "what": "hf index (per rank, first forward)",
                               "kind": r["index_kind"], "nlist": nlist, "nprobe": nprobe, "wall": r["build_s"],
                               "peak_mib": r["warm_peak_mib"],
                               "note": f"from the hf {budget_label(spec['budget'])} head step; peak = its warm-up "
                                       f"peak above the baseline"})
            if spec["type"] == "knn" and r["build_s"] is not None:
                builds.append({"C": C, "centres": "init", "what": "knn graph (first forward)",
                               "kind": r["index_kind"], "wall": r["build_s"], "peak_mib": r["warm_peak_mib"],
                               "note": f"from the knn {budget_label(spec['budget'])} head step (includes the "
                                       f"snapshot); peak = its warm-up peak above the baseline"})

    run_graph_phase(args, samples, knn_graphs, builds, recalls, sweeps, elapsed)
    print(f"\ntotal {elapsed()}")
    checks = print_report(args, steps, builds, recalls, sweeps)
    if args.json:
        write_json(args, steps, builds, recalls, sweeps, checks, time.perf_counter() - started)


def run_graph_phase(args, samples: dict, knn_graphs: dict, builds: list, recalls: list, sweeps: list,
                    elapsed) -> None:
    """Parts 3 and 4: knn graph builds, and the recall of the graph's rows of the sampled classes."""
    runs = []
    for C in args.classes:
        runs += [(C, "init", kind, "build") for kind in args.graph_kinds]
        runs += [(C, "struct", kind, args.struct_graphs) for kind in args.graph_kinds if kind != "exact"]
        runs += [(C, "lowdim", kind, "sampled") for kind in args.graph_kinds if kind != "exact"]
        if "ivf" in args.graph_kinds:  # the nprobe sweep on (a) (and (b)), and a check of the emulation
            runs.append((C, "init", "ivf", "sampled"))
            if args.struct_graphs == "build":
                runs.append((C, "struct", "ivf", "sampled"))
    runs.sort(key=lambda g: (g[0], g[1] != "init", g[3] != "build"))
    exact_cache: dict = {}

    def family(rows: torch.Tensor, centres: str, C: int):
        return family_recall(rows, samples[C], C) if centres == "struct" else None

    real_rows: dict = {}  # (C, centres, kind) -> the whole graph's rows of the sampled classes
    for i, (C, centres, kind, mode) in enumerate(runs, 1):
        sample = samples[C]
        tag = f"[graph {i}/{len(runs)}] C={C:,} {centres} {kind}"
        if mode == "build" and centres == "init" and C in knn_graphs and knn_graphs[C][0] == kind:
            print(f"{tag}: the knn head step's own graph (built at its first forward)", flush=True)
            queries, exact = exact_reference(C, args.dim, centres, sample, args.k, exact_cache)
            real_rows[(C, centres, kind)] = knn_graphs[C][1]
            recalls.append({"C": C, "centres": centres, "kind": kind, "recall": graph_recall(knn_graphs[C][1], exact),
                            "source": "the whole graph (the knn head step's, first forward)"})
            print(f"    recall {recalls[-1]['recall']:.3f}", flush=True)
            continue
        what = "whole knn graph (build_knn_graph)" if mode == "build" else "per-shard index, sampled queries"
        print(f"{tag}: {what} ... (start {time.strftime('%H:%M:%S')}, load {os.getloadavg()[0]:.2f})", flush=True)
        queries, exact = exact_reference(C, args.dim, centres, sample, args.k, exact_cache)
        cfg = dict(phase="graph", classes=C, dim=args.dim, k=args.k, kind=kind, centres=centres, mode=mode,
                   world_size=args.world_size, sample=sample, exact_limit=args.exact_limit, queries=queries)
        ranks = run_group(cfg, args.timeout, f"graph C={C} {centres} {kind} {mode}")
        if mode == "build":
            record = {"C": C, "centres": centres, "what": "knn graph (build_knn_graph)", "kind": kind}
            if ranks[0].get("skipped"):
                record["note"] = (f"skipped: estimated {ranks[0]['estimate_s']:.0f} s > --exact-limit "
                                  f"{args.exact_limit:.0f} s")
                builds.append(record)
                print(f"    {record['note']}", flush=True)
                continue
            record.update(wall=max(r["wall"] for r in ranks), cpu=max(r["cpu"] for r in ranks),
                          peak_mib=max(r["peak"] for r in ranks) / MIB,
                          note=f"estimated {ranks[0]['estimate_s']:.0f} s" if "estimate_s" in ranks[0] else "")
            builds.append(record)
            rows = gather_sample_rows(ranks, sample, args.k)
            real_rows[(C, centres, kind)] = rows
            recalls.append({"C": C, "centres": centres, "kind": kind, "recall": graph_recall(rows, exact),
                            "family": family(rows, centres, C), "source": "the whole graph (build_knn_graph)"})
            print(f"    built in {record['wall']:.1f} s (cpu {record['cpu']:.1f} s), recall "
                  f"{recalls[-1]['recall']:.3f}  ({elapsed()})", flush=True)
            continue

        nlist, default = ranks[0]["num_lists"], ranks[0]["default_probes"]
        builds.append({"C": C, "centres": centres, "what": "per-shard index only (sampled)", "kind": kind,
                       "nlist": nlist, "nprobe": default, "wall": max(r["index_wall"] for r in ranks),
                       "cpu": max(r["index_cpu"] for r in ranks), "peak_mib": max(r["index_peak"] for r in ranks) / MIB,
                       "note": "the ShardIndex build_knn_graph builds first"})
        for key in ranks[0]["searches"]:
            rows = merge_shard_lists([(r["searches"][key][0], r["searches"][key][1]) for r in ranks], sample, args.k)
            recall = graph_recall(rows, exact)
            per_query = max(r["searches"][key][2] for r in ranks)
            nprobe = default if key == "default" else key
            is_default = key == "default" or key == default
            if kind == "ivf":
                sweeps.append({"C": C, "centres": centres, "nlist": nlist, "nprobe": nprobe, "default": is_default,
                               "recall": recall, "us_per_query": per_query * 1e6,
                               "graph_search_est_s": per_query * -(-C // args.world_size) * args.world_size})
            if not is_default:
                continue
            source = "graph rows of the sampled classes from per-shard searches"
            real = real_rows.get((C, centres, kind))
            if real is not None:
                same = float((real == rows).float().mean())
                source = (f"emulation check: {same:.1%} of entries equal to the whole graph's rows, recall "
                          f"{graph_recall(real, exact):.3f} there")
            recalls.append({"C": C, "centres": centres, "kind": kind, "nprobe": nprobe, "recall": recall,
                            "family": family(rows, centres, C), "source": source})
        best = max((s["recall"] for s in sweeps if s["C"] == C and s["centres"] == centres), default=None)
        print(f"    index built in {builds[-1]['wall']:.1f} s; recall {recalls[-1]['recall']:.3f} at the default "
              f"{'nprobe ' + str(default) if default else 'settings'}"
              + (f", best in the nprobe sweep {best:.3f}" if best is not None and kind == "ivf" else "")
              + f"  ({elapsed()})", flush=True)


def graph_recall(approx: torch.Tensor, exact: torch.Tensor) -> float:
    from hybridfc.selection.index import recall_at_k

    return recall_at_k(approx, exact)


def reprint(path: str) -> None:
    """The tables and checks of a saved run (``--json``), without running anything."""
    with open(path) as f:
        saved = json.load(f)
    args = argparse.Namespace(**saved["args"])
    args.version = saved["machine"].split("; ")[-1]
    args.load_end = saved.get("load_average", [None, None])[1]
    steps = [{**r, "method": r["selection"], "C": r["classes"]} for r in saved["results"]]
    print(f"(report of {path}: {saved['machine']}; the run took {saved.get('seconds', 0):.0f} s)")
    print_report(args, steps, saved["builds"], saved["recall"], saved["nprobe_sweep"])


def write_json(args, steps, builds, recalls, sweeps, checks, seconds: float) -> None:
    """``{"machine", "results": [{"method", "classes", "samples_per_s", "peak_mib", ...}], "builds",
    "recall", "nprobe_sweep", "targets"}``; ``results`` is what ``plot_results.py`` plots (one line
    per method and budget)."""
    ranks = "gloo, 1 thread each" if args.device == "cpu" else placement(args)
    machine = (f"{cpu_model()}, {os.cpu_count()} CPUs; torch {torch.__version__}; {args.world_size} ranks {ranks}; "
               f"B={args.batch}, d={args.dim}, {args.margin}; {args.version}")
    results = [{"method": r["method"] if r["budget"] is None else f"{r['method']} {budget_label(r['budget'])}",
                "selection": r["method"], "budget": r["budget"], "classes": r["C"],
                "samples_per_s": args.batch / (r["ms"] / 1e3), "peak_mib": r["peak_mib"],
                **{k: v for k, v in r.items() if k not in ("method", "budget", "C", "peak_mib")}}
               for r in steps]
    with open(args.json, "w") as f:
        json.dump({"machine": machine, "load_average": [args.load_start, os.getloadavg()[0]],
                   "seconds": seconds, "args": {k: v for k, v in vars(args).items()
                            if k != "version" and (k, v) != ("device", "cpu")},  # a CPU run's JSON as before
                   "results": results, "builds": builds, "recall": recalls, "nprobe_sweep": sweeps,
                   "targets": checks}, f, indent=1, default=str)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
