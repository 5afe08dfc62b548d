"""Recall@k of the approximate knn graph, at the index's own breadth and with ``min_recall``, on
three kinds of class centres, beside what its search costs and what exact search costs.

For every C (``--classes``) and kind of centres (``bench_selection.class_centres``: (a) ``init``,
the head's initial rows, isotropic; (b) ``struct``, the synthetic task's families of 8, isotropic
beyond the 7 siblings; (c) ``lowdim``, intrinsic dimension 16 plus a little noise, as trained
centres are: deep face and image embeddings of 512 dimensions were measured at an intrinsic
dimension of 16 to 19, Gong, Boddeti and Jain, CVPR 2019), a fresh ``--world-size``-rank gloo
group (one thread per rank) does what ``build_knn_graph`` does before its ring, and times it:

1. each rank builds the ``ShardIndex`` over its shard (``--kinds``: ``ivf``, the kind ``auto``
   picks at these sizes, and optionally ``hnsw``);
2. *default*: searches the ``--queries`` sampled classes (``bench_selection.sample_classes``)
   for their k + 1 nearest rows at the index's own breadth;
3. *fitted*: ``fit_shard_search(..., min_recall=--min-recall)``, the call ``build_knn_graph``
   makes (the same sampled classes from all shards, the same collective; its per-shard
   estimate is reported), then the same search at the widened breadth;
4. *exact*: ``exact_search`` of the sampled classes over the shard.

The parent merges each rank's lists as ``build_knn_graph`` merges the ring's
(``bench_selection.merge_shard_lists``: by score, ties to the smaller id, the class itself
dropped), so the rows are the graph's rows of the sampled classes (``bench_selection.py``
checked this emulation against whole 1M graphs: 100 % of entries equal), and compares them with
exact neighbours over all C centres. The graph's search time is estimated as µs per query (max
over ranks) × the ⌈C/N⌉ × N queries a rank answers around the ring; the index build and the
fitting come on top and are printed.

    python benchmarks/bench_graph_recall.py --json benchmarks/graph_recall.json   # C = 1M, ~10 minutes
    python benchmarks/bench_graph_recall.py --quick                                # C = 100k, 500 queries
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch starts OpenMP; the spawned ranks inherit it

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from bench_head_step import cpu_model, library_version  # noqa: E402
from bench_selection import (CENTRES, class_centres, exact_reference, family_recall,  # noqa: E402
                             merge_shard_lists, sample_classes)
from ranks import run_on_ranks  # noqa: E402

RECALL_TARGET = 0.9


def timed_search(index, queries: torch.Tensor, k: int, class_start: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The index's ``k + 1`` nearest rows of ``(q, d)`` queries as (scores, global ids), and
    the seconds per query."""
    t0 = time.perf_counter()
    scores, rows = index.search(queries, k + 1)
    per_query = (time.perf_counter() - t0) / max(1, queries.shape[0])
    return scores, torch.where(rows >= 0, rows + class_start, rows), per_query


def recall_worker(rank: int, cfg: dict) -> dict:
    """Steps 1-4 of the module docstring on one rank."""
    from hybridfc.parallel.groups import shard_range
    from hybridfc.selection.graph import fit_shard_search
    from hybridfc.selection.exact import exact_search
    from hybridfc.selection.index import ShardIndex

    C, d, k, world = cfg["classes"], cfg["dim"], cfg["k"], cfg["world_size"]
    start, count = shard_range(C, world, rank)
    rows = class_centres(cfg["centres"], C, start, count, d)
    queries = cfg["queries"]
    t0 = time.perf_counter()
    index = ShardIndex(rows, kind=cfg["kind"], seed=0)
    out = {"build_s": time.perf_counter() - t0, "default_breadth": index.describe(k)}
    out["default"] = timed_search(index, queries, k, start)
    t0 = time.perf_counter()
    out["estimate"], out["sampled"] = fit_shard_search(index, rows, C, k, seed=0, min_recall=cfg["min_recall"])
    out["fit_s"], out["fitted_breadth"] = time.perf_counter() - t0, index.describe(k)
    out["fitted"] = timed_search(index, queries, k, start)
    t0 = time.perf_counter()
    exact_search(queries, rows, k + 1)
    out["exact_per_query"] = (time.perf_counter() - t0) / max(1, queries.shape[0])
    return out


def measure(args, C: int, centres: str, kind: str, sample: torch.Tensor, cache: dict) -> dict:
    """One row of the table: recall and costs of one (C, centres, index kind)."""
    from hybridfc.selection.index import recall_at_k

    queries, exact = exact_reference(C, args.dim, centres, sample, args.k, cache)
    cfg = dict(classes=C, dim=args.dim, k=args.k, world_size=args.world_size, centres=centres, kind=kind,
               queries=queries, min_recall=args.min_recall)
    ranks = run_on_ranks(recall_worker, cfg, args.world_size, args.timeout, f"recall C={C} {centres} {kind}")
    graph_queries = -(-C // args.world_size) * args.world_size
    row = {"C": C, "centres": centres, "kind": kind, "build_s": max(r["build_s"] for r in ranks),
           "fit_s": max(r["fit_s"] for r in ranks), "sampled": ranks[0]["sampled"],
           "estimate": min(r["estimate"] for r in ranks),
           "exact_graph_s": max(r["exact_per_query"] for r in ranks) * graph_queries}
    for part in ("default", "fitted"):
        rows = merge_shard_lists([r[part][:2] for r in ranks], sample, args.k)
        row[part] = {"breadth": ranks[0][f"{part}_breadth"], "recall": recall_at_k(rows, exact),
                     "family": family_recall(rows, sample, C) if centres == "struct" else None,
                     "graph_s": max(r[part][2] for r in ranks) * graph_queries}
    return row


def print_report(args, rows: list[dict]) -> list[dict]:
    print()
    print(f"RECALL@{args.k} of the knn graph's rows of {args.queries} sampled classes vs exact neighbours; "
          f"{args.world_size} ranks, 1 thread each; d={args.dim}; min_recall {args.min_recall}")
    hdr = (f"{'C':>9} {'centres':>7} {'kind':>5} | {'breadth: default -> fitted':<62} | {'default':>7} "
           f"{'fitted':>8} {'est.':>6} {'family':>6} | {'graph search s: default':>23} {'fitted':>7} "
           f"{'exact':>7} {'fit/ex':>6}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        d, f = r["default"], r["fitted"]
        mark = "✓" if f["recall"] >= RECALL_TARGET else "✗"
        breadth = f"{d['breadth']} -> {f['breadth'].split(', ', 1)[-1]}"
        family = "-" if f["family"] is None else f"{f['family']:.3f}"
        print(f"{r['C']:>9,} {r['centres']:>7} {r['kind']:>5} | {breadth:<62} | {d['recall']:>7.3f} "
              f"{f['recall']:>6.3f} {mark} {r['estimate']:>6.3f} {family:>6} | {d['graph_s']:>23.0f} "
              f"{f['graph_s']:>7.0f} {r['exact_graph_s']:>7.0f} {f['graph_s'] / r['exact_graph_s']:>6.2f}")
    print("  default / fitted = recall of the merged lists at the index's own breadth / after fit_shard_search;")
    print("  est. = the fitting's own per-shard estimate on its sampled classes (min over ranks); family = the")
    print("  fraction of a (b) class's 7 siblings in its fitted list; graph search s = est. seconds per rank of")
    print("  the graph's searches (µs/query × ⌈C/N⌉·N); fit/ex = fitted over exact. Index build and fitting")
    print("  per rank (s): " + ", ".join(f"{r['centres']} {r['kind']} {r['build_s']:.0f} + {r['fit_s']:.0f}"
                                          for r in rows))
    big = max(r["C"] for r in rows)
    checks = [{"check": f"C={big:,} recall@{args.k} {r['kind']} min_recall {args.min_recall} on "
                        f"{CENTRES[r['centres']]}", "value": r["fitted"]["recall"], "target": f"≥ {RECALL_TARGET}",
               "pass": r["fitted"]["recall"] >= RECALL_TARGET} for r in rows if r["C"] == big]
    print()
    print("TARGETS")
    width = max(len(c["check"]) for c in checks)
    for c in checks:
        print(f"  {c['check']:<{width}} : {c['value']:>6.3f}   target {c['target']}  {'✓' if c['pass'] else '✗'}")
    return checks


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, nargs="+", default=[1_000_000])
    p.add_argument("--centres", nargs="+", choices=sorted(CENTRES), default=["lowdim", "struct", "init"])
    p.add_argument("--kinds", nargs="+", choices=["ivf", "hnsw"], default=["ivf"])
    p.add_argument("--min-recall", type=float, default=RECALL_TARGET)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--queries", type=int, default=2000, help="sampled query classes for the recall")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--timeout", type=float, default=3 * 3600.0, help="seconds per configuration")
    p.add_argument("--json", type=str, default=None, help="also write the results as JSON")
    p.add_argument("--quick", action="store_true", help="smoke test: C = 100k, 500 queries")
    args = p.parse_args(argv)
    if args.quick:
        args.classes, args.queries = [100_000], min(args.queries, 500)
    version, started = library_version(), time.perf_counter()
    print(f"{version}\nstart {time.strftime('%H:%M:%S')}, load {os.getloadavg()[0]:.2f}", flush=True)
    rows, cache = [], {}
    for C in sorted(args.classes):
        sample = sample_classes(C, args.queries)
        for centres in args.centres:
            for kind in args.kinds:
                print(f"C={C:,} {centres} {kind} ... ({time.strftime('%H:%M:%S')})", flush=True)
                rows.append(measure(args, C, centres, kind, sample, cache))
                f = rows[-1]["fitted"]
                print(f"    {f['breadth']}: recall {rows[-1]['default']['recall']:.3f} -> {f['recall']:.3f}, "
                      f"est. graph search {f['graph_s']:.0f} s (exact {rows[-1]['exact_graph_s']:.0f} s)", flush=True)
        cache.clear()
    checks = print_report(args, rows)
    seconds = time.perf_counter() - started
    print(f"\n{seconds / 60:.1f} minutes; load {os.getloadavg()[0]:.2f} at the end")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": f"{cpu_model()}, {os.cpu_count()} CPUs; torch {torch.__version__}; {version}",
                       "seconds": seconds, "args": vars(args), "rows": rows, "targets": checks}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
