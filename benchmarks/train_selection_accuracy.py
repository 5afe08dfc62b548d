"""Held-out accuracy of each class selection (partial, knn, hf) against full softmax, by budget.

Protocol
--------
Task: :class:`hybridfc.data.SyntheticClasses` (families of 8 confusable classes, input_dim 64,
default spread and noise), ``--classes`` C classes, ``--samples-per-class`` training samples per
class (a finite training set, reshuffled every epoch, last partial batch dropped) and
``--test-samples-per-class`` held-out samples per class from the independent ``"test"`` split
(the same samples for every run).

Sizes (defaults): C = 5000, B = 16, 2 training and 4 held-out samples per class (20,000 held-out
samples), S = 24,000 steps (about 38 epochs), F = 4000. Why: the 1 % budget (50 rows) must be
well above the positives of a batch (at most 16), i.e. C >= ~300 B; with these hyper-parameters
held-out accuracy grows with the number of steps much more than with the batch size (16 and 32
gave the same curves), so the smallest batch and class count meeting that ratio buy the most
steps per second. With 2 samples per class full softmax fits its training set (train loss 0.13
at S) and its held-out accuracy levels off: a 40,000-step schedule ended at 0.2736, 0.3 points
below the 24,000-step one (0.2768), so training longer does not help. (With 4 samples per class
it was still gaining 1.5 points over the last 20 % of a 30,000-step schedule.)
knn and hf: k = 32 (the library's example value; a class has 7 confusable siblings, so the
lists cover the family with room to spare) and a rebuild every T = 250 steps (0.4 epoch; 96
rebuilds per run; a graph build at C = 5000 takes well under a second); the library's
``hard_fraction`` (0.5: at 10 % the 16 labels' 512 neighbours would otherwise fill the budget
and leave no random row to stand for the other classes in the softmax).

Model and hyper-parameters: the main job's when this was measured (``examples/train.py
--hidden-layers 2``, ``ds_configs/cpu.json`` with cosface s = 32, m = 0.2 and no warm start),
without DeepSpeed. Backbone: ``build_backbone`` (MLP 64 -> 512 -> 512 -> 128 with BatchNorm), AdamW
lr 2e-3, weight decay 1e-4. Head: ``hybridfc.ClassParallelFC(C, 128)`` with CosFace s = 32,
m = 0.2, SGD lr 0.2, momentum 0.9, weight decay 1e-4 (``hybridfc.build_head_optimizer``). Both
learning rates follow DeepSpeed's ``WarmupDecayLR`` as the engine applies it: factor
``t / 100`` for steps t <= 100 (linear warm-up), then ``(S - t) / (S - 100)`` (linear decay to 0
at the last step S); the head's lr is its base lr times the same factor. One step is::

    loss = head(backbone(x), y); loss.backward()
    backbone_opt.step(); head_opt.step(); backbone_opt.zero_grad(); head_opt.zero_grad()

Runs: full softmax, then every method of ``--methods`` at every budget of ``--budgets``; all
runs use the same seed, i.e. the same task instance, backbone and head initialisation and the
same sequence of batches, and share every hyper-parameter (knn and hf also share ``--k`` and
``--rebuild-interval``; the rebuild delay is the library default, a tenth of the interval, and
``late_rebuild`` is ``wait``, so that a build longer than the delay makes its swap step wait
rather than swap later: every run is reproducible, whatever the machine's load).
Nothing is tuned per selection. Then, for the convergence check, full softmax and every method
at 10 % again on each of ``--replicate-seeds`` (default 1 and 2): a new task instance,
initialisation and batch order each. One seed is not enough to decide a 1 % criterion: the
ratio to full at S of one selection moves by several points from seed to seed (partial at
10 %: 0.957, 0.998 and 1.017 on seeds 0, 1 and 2). ``--jobs`` trains runs at once in worker
processes (each on ``--threads`` threads; the results do not depend on it). The budget is a
rate of the shard; the positives of the batch count towards it; a step whose positives fill
the budget uses the positives only (counted).

One process, world size 1 (no torch.distributed): the whole class matrix is rank 0's shard. The
selection logic runs per shard, so what is measured here is what each rank of a multi-rank job
does on its own shard (except that knn's neighbour lists span all shards there). Torch runs on
``--threads`` intra-op threads (default 1: the batch is small, one thread is as fast as two,
and the other core is left to the knn/hf background rebuilds, which run in a thread of the
same process, and to the machine's other users).

Evaluation: held-out top-1 accuracy, ``hybridfc.eval.topk_accuracy`` (argmax over the cosines of
the head's rows) on the backbone's embeddings in eval mode (BatchNorm running statistics), every
``--eval-every`` steps and at the fixed step F, at 0.8 S and at S.

Reported numbers:
(a) fixed step count: accuracy at step F = ``--fixed-step``, a step at which full softmax is still
    improving, shown by the accuracy full gains after F (to 0.8 S and to S) and in its last
    evaluation interval before F;
(b) convergence: accuracy at the last step S = ``--steps``. Full softmax counts as converged at S
    when its held-out accuracy at S exceeds the one at 0.8 S by less than 0.5 points (improves
    by < 0.5 points over the last 20 % of the steps). Note that the lr decays to 0 at S, so the
    last 20 % of the steps are also the end of the annealing, which by itself still adds a few
    tenths of a point (24,000 steps: +0.61; 40,000 steps: +0.50).

Checks (printed with ✓/✗, nothing is changed to make them pass):
* at F and a 10 % budget: max(knn, hf) >= 0.97 x full, and knn >= partial;
* at S: every selection at 10 % >= 0.99 x full, the ratio averaged over the seeds;
* at 1 % and 5 % (at F and at S): the better hard-negative selection (knn or hf) beats partial.

Outputs: a table on stdout, every number in ``--json`` and a plot (``--plot``): held-out accuracy
against budget, one line per selection and a horizontal line for full, one panel at F and one at
S, plus a third panel with the learning curves (full and the 10 % runs).

    python benchmarks/train_selection_accuracy.py --jobs 2       # the full protocol (18 runs, ~35 min on 2 cores)
    python benchmarks/train_selection_accuracy.py --quick        # smoke test, < 2 min
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from torch import nn

import hybridfc
from hybridfc.data import SyntheticClasses
from hybridfc.eval import topk_accuracy

# the main job's recipe when these figures were measured (now examples/train.py --hidden-layers 2 with
# cosface s = 32, m = 0.2 and no warm start)
INPUT_DIM, HIDDEN, EMBEDDING = 64, 512, 128
MARGIN = {"type": "cosface", "scale": 32.0, "margin": 0.2}
HEAD_OPT = {"type": "sgd", "params": {"lr": 0.2, "momentum": 0.9, "weight_decay": 1e-4}}
BACKBONE_LR, BACKBONE_WD, WARMUP_STEPS = 2e-3, 1e-4, 100
CONVERGED_POINTS = 0.5   # full is converged at S when acc(S) - acc(0.8 S) < 0.5 points
REPLICATED_BUDGET = 0.1  # the budget of the convergence check, run again on every replicate seed


def build_backbone(input_dim: int, hidden: int, embedding_size: int) -> nn.Module:
    """The MLP of examples/train.py (importing it would import DeepSpeed)."""
    return nn.Sequential(
        nn.Linear(input_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, embedding_size), nn.BatchNorm1d(embedding_size),
    )


def lr_factor(step: int, total: int) -> float:
    """WarmupDecayLR (linear warm-up from 0, linear decay to 0 at ``total``) at step (from 1)."""
    if step <= WARMUP_STEPS:
        return step / WARMUP_STEPS
    return max(0.0, (total - step) / max(1, total - WARMUP_STEPS))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=5000, help="number of classes C")
    p.add_argument("--batch", type=int, default=16, help="batch size B")
    p.add_argument("--steps", type=int, default=24_000, help="total steps S (the convergence point)")
    p.add_argument("--fixed-step", type=int, default=4000, help="the fixed step count F (< S)")
    p.add_argument("--eval-every", type=int, default=2000, help="steps between held-out evaluations")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.01, 0.05, 0.1], help="budgets (rates of the shard)")
    p.add_argument("--methods", nargs="*", default=["partial", "knn", "hf"], choices=["partial", "knn", "hf"])
    p.add_argument("--k", type=int, default=32, help="neighbours per class (knn) / per sample (hf)")
    p.add_argument("--rebuild-interval", type=int, default=250, help="knn/hf rebuild interval T (steps)")
    p.add_argument("--samples-per-class", type=int, default=2, help="training samples per class")
    p.add_argument("--test-samples-per-class", type=int, default=4, help="held-out samples per class")
    p.add_argument("--no-sampling-correction", dest="sampling_correction", action="store_false",
                   help="selection key sampling_correction false (PartialFC's loss; default: the library's, true)")
    p.add_argument("--hard-fraction", type=float, default=None,
                   help="knn/hf selection key hard_fraction (default: the library's, 0.5)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the task, the initialisation and the batches")
    p.add_argument("--replicate-seeds", type=int, nargs="*", default=[1, 2],
                   help="further seeds (each a new task instance) on which full and every method run at a "
                        "10%% budget (when 10%% is among --budgets), for the convergence check's mean over seeds")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, in worker processes")
    p.add_argument("--quick", action="store_true", help="tiny smoke test (< 2 min)")
    p.add_argument("--json", default="benchmarks/selection_accuracy.json")
    p.add_argument("--plot", default="benchmarks/selection_accuracy.png")
    args = p.parse_args()
    if args.quick:
        args.classes, args.batch, args.steps, args.fixed_step, args.eval_every = 3000, 8, 300, 100, 100
        args.rebuild_interval, args.k, args.replicate_seeds = 50, 16, args.replicate_seeds[:1]
        if args.json == p.get_default("json"):
            args.json = "/tmp/selection_accuracy_quick.json"
        if args.plot == p.get_default("plot"):
            args.plot = "/tmp/selection_accuracy_quick.png"
    if not 0 < args.fixed_step < args.steps:
        p.error("--fixed-step must lie strictly between 0 and --steps")
    return args


def selection_spec(method: str, budget: float | None, args: argparse.Namespace) -> dict:
    if method == "full":
        return {"type": "full"}
    spec = {"type": method, "budget": budget, "sampling_correction": args.sampling_correction}
    if method in ("knn", "hf"):
        spec.update(k=args.k, rebuild_interval=args.rebuild_interval, late_rebuild="wait")
        if args.hard_fraction is not None:
            spec.update(hard_fraction=args.hard_fraction)
    return spec


def batches(train: SyntheticClasses, batch: int, seed: int):
    """Endless batches of index, each epoch a fresh permutation (same sequence for every run)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(train), generator=generator)
        for begin in range(0, len(order) - batch + 1, batch):   # drop the last partial batch
            yield train.batch(order[begin : begin + batch])


@torch.no_grad()
def evaluate(backbone: nn.Module, head: hybridfc.ClassParallelFC, test_x: torch.Tensor, test_y: torch.Tensor) -> float:
    backbone.eval()
    embeddings = torch.cat([backbone(chunk) for chunk in test_x.split(4096)])
    backbone.train()
    return topk_accuracy(head, embeddings, test_y, ks=(1,))[1]


def rebuild_stats(head: hybridfc.ClassParallelFC) -> dict | None:
    structure = getattr(head.selection, "graph", None) or getattr(head.selection, "index", None)
    if structure is None or not hasattr(structure, "waits"):
        return None
    return {"builds": len(structure.build_seconds), "build_seconds": [round(s, 3) for s in structure.build_seconds],
            "mean_build_seconds": sum(structure.build_seconds) / max(1, len(structure.build_seconds)),
            "swaps": len(structure.waits), "total_wait_seconds": sum(structure.waits),
            "max_wait_seconds": max(structure.waits, default=0.0),
            "waits_over_50ms": sum(w > 0.05 for w in structure.waits)}


@functools.lru_cache(maxsize=1)
def task(classes: int, samples_per_class: int, test_samples_per_class: int, seed: int):
    """The training set and the held-out ``(x, y)`` of the task instance ``seed``."""
    train = SyntheticClasses(classes, samples_per_class, INPUT_DIM, seed=seed, split="train")
    test = SyntheticClasses(classes, test_samples_per_class, INPUT_DIM, seed=seed, split="test")
    return train, *test.batch(torch.arange(len(test)))


def train_one(seed: int, method: str, budget: float | None, args, eval_steps, tag, t0) -> dict:
    torch.set_num_threads(args.threads)
    logging.getLogger("hybridfc").setLevel(logging.WARNING)   # keep rebuild waits and positives-only warnings
    train, test_x, test_y = task(args.classes, args.samples_per_class, args.test_samples_per_class, seed)
    torch.manual_seed(seed)
    backbone = build_backbone(INPUT_DIM, HIDDEN, EMBEDDING)
    head = hybridfc.ClassParallelFC(args.classes, EMBEDDING, margin=MARGIN, seed=seed,
                                    selection=selection_spec(method, budget, args))
    head_opt = hybridfc.build_head_optimizer(head, HEAD_OPT)
    backbone_opt = torch.optim.AdamW(backbone.parameters(), lr=BACKBONE_LR, weight_decay=BACKBONE_WD)
    head_lr = head_opt.param_groups[0]["lr"]
    rows = args.classes if head.selection.dense else head.selection.budget
    curve, losses, data = [], [], batches(train, args.batch, seed)
    distinct = torch.zeros(args.steps, dtype=torch.int32)
    run_start = time.perf_counter()
    train_seconds = 0.0
    print(f"{tag} {method:7s} {fmt_budget(budget):>5s}: {rows} active rows/step of {args.classes}"
          f"{'' if head.selection.dense else ' (positives included)'}", flush=True)
    for step in range(1, args.steps + 1):
        tick = time.perf_counter()
        factor = lr_factor(step, args.steps)
        for group in backbone_opt.param_groups:
            group["lr"] = BACKBONE_LR * factor
        for group in head_opt.param_groups:
            group["lr"] = head_lr * factor
        x, y = next(data)
        distinct[step - 1] = torch.unique(y).numel()
        loss = head(backbone(x), y)
        loss.backward()
        backbone_opt.step()
        head_opt.step()
        backbone_opt.zero_grad(set_to_none=True)
        head_opt.zero_grad()
        losses.append(loss.item())
        train_seconds += time.perf_counter() - tick
        if step in eval_steps:
            acc = evaluate(backbone, head, test_x, test_y)
            window = losses[-min(len(losses), args.eval_every):]
            curve.append({"step": step, "top1": acc, "train_loss": sum(window) / len(window),
                          "elapsed_s": time.perf_counter() - t0})
            print(f"{tag} {method:7s} {fmt_budget(budget):>5s} step {step:6d}/{args.steps}  top1 {acc:.4f}  "
                  f"loss {curve[-1]['train_loss']:.3f}  {1000 * train_seconds / step:5.1f} ms/step  "
                  f"elapsed {time.perf_counter() - t0:6.0f} s", flush=True)
    return {"seed": seed, "method": method, "budget": budget, "selection": selection_spec(method, budget, args),
            "active_rows": rows, "curve": curve,
            "positives_only_steps": head.selection.positives_only_steps,
            "max_distinct_labels_per_batch": int(distinct.max()),
            "mean_distinct_labels_per_batch": float(distinct.float().mean()),
            "non_finite_batches": head.non_finite_batches,
            "train_ms_per_step": 1000 * train_seconds / args.steps,
            "run_seconds": time.perf_counter() - run_start, "rebuild": rebuild_stats(head)}


def fmt_budget(budget: float | None) -> str:
    return "full" if budget is None else f"{100 * budget:g}%"


def acc_at(run: dict, step: int) -> float:
    return next(point["top1"] for point in run["curve"] if point["step"] == step)


def mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def seed_ratios(runs: list[dict], args) -> dict[int, dict[str, float]]:
    """Per seed (the main one and the replicates): full's top-1 at S and each method's at 10 % / full's."""
    S, out = args.steps, {}
    for seed in [args.seed, *args.replicate_seeds]:
        full = next(r for r in runs if r["seed"] == seed and r["method"] == "full")
        out[seed] = {"full": acc_at(full, S)}
        for run in runs:
            if run["seed"] == seed and run["budget"] == REPLICATED_BUDGET:
                out[seed][run["method"]] = acc_at(run, S) / acc_at(full, S)
    return out


def analyse(all_runs: list[dict], args) -> dict:
    S, F, S80 = args.steps, args.fixed_step, math.ceil(0.8 * args.steps)
    runs = [r for r in all_runs if r["seed"] == args.seed]
    full = runs[0]
    steps = [p["step"] for p in full["curve"]]
    before_f = max(s for s in steps if s < F) if any(s < F for s in steps) else None
    full_f, full_s, full_80 = acc_at(full, F), acc_at(full, S), acc_at(full, S80)
    protocol = {
        "fixed_step": F, "final_step": S, "step_80pct": S80,
        "full_top1_at_fixed": full_f, "full_top1_at_80pct": full_80, "full_top1_final": full_s,
        "full_gain_fixed_to_final_points": 100 * (full_s - full_f),
        "full_gain_fixed_to_80pct_points": 100 * (full_80 - full_f),
        "full_gain_last_interval_before_fixed_points": None if before_f is None else 100 * (full_f - acc_at(full, before_f)),
        "full_gain_last_20pct_points": 100 * (full_s - full_80),
    }
    protocol["full_still_rising_at_fixed"] = bool(protocol["full_gain_fixed_to_80pct_points"] >= 1.0
                                                  and (before_f is None or full_f > acc_at(full, before_f)))
    protocol["full_converged_at_final"] = bool(protocol["full_gain_last_20pct_points"] < CONVERGED_POINTS)
    # first evaluation step from which full stays within CONVERGED_POINTS of its final accuracy
    protocol["full_within_half_point_of_final_from_step"] = next(
        s for s in steps if all(full_s - acc_at(full, t) < CONVERGED_POINTS / 100 for t in steps if t >= s))

    table = {}
    for run in runs[1:]:
        table[(run["method"], run["budget"])] = run

    def get(method, budget, step):
        run = table.get((method, budget))
        return None if run is None else acc_at(run, step)

    checks = []

    def check(name, ok, detail):
        checks.append({"check": name, "pass": None if ok is None else bool(ok), "detail": detail})

    top = REPLICATED_BUDGET if REPLICATED_BUDGET in args.budgets else None
    ratios = seed_ratios(all_runs, args) if top is not None else {}
    if top is not None:
        knn, hf, partial = get("knn", top, F), get("hf", top, F), get("partial", top, F)
        hard = [v for v in (knn, hf) if v is not None]
        if hard:
            best = max(hard)
            check(f"step {F}, 10%: max(knn, hf) >= 0.97 x full", best >= 0.97 * full_f,
                  f"{best:.4f} vs 0.97 x {full_f:.4f} = {0.97 * full_f:.4f} (ratio {best / full_f:.3f})")
        if knn is not None and partial is not None:
            check(f"step {F}, 10%: knn >= partial", knn >= partial, f"knn {knn:.4f} vs partial {partial:.4f}")
        for method in args.methods:
            per_seed = [ratios[seed][method] for seed in ratios]
            mean = sum(per_seed) / len(per_seed)
            check(f"step {S}, 10%: {method} >= 0.99 x full, mean over seeds {list(ratios)}", mean >= 0.99,
                  f"mean ratio {mean:.3f} (per seed " + ", ".join(f"{r:.3f}" for r in per_seed) + ")")
    for budget in args.budgets:
        if budget == top:
            continue
        for step in (F, S):
            partial = get("partial", budget, step)
            hard = {m: get(m, budget, step) for m in ("knn", "hf") if get(m, budget, step) is not None}
            if partial is None or not hard:
                continue
            best_method = max(hard, key=hard.get)
            check(f"step {step}, {fmt_budget(budget)}: max(knn, hf) > partial", hard[best_method] > partial,
                  ", ".join(f"{m} {v:.4f}" for m, v in hard.items()) + f" vs partial {partial:.4f}")
    return {"protocol": protocol, "checks": checks,
            "seed_ratios_at_final": {str(seed): values for seed, values in ratios.items()}}


def print_report(all_runs: list[dict], analysis: dict, args) -> None:
    S, F = args.steps, args.fixed_step
    runs = [r for r in all_runs if r["seed"] == args.seed]
    full = runs[0]
    full_f, full_s = acc_at(full, F), acc_at(full, S)
    print()
    print(f"C={args.classes} classes, B={args.batch}, {args.samples_per_class} train / "
          f"{args.test_samples_per_class} held-out samples per class ({args.classes * args.test_samples_per_class} "
          f"held-out samples), S={S} steps ({S * args.batch / (args.classes * args.samples_per_class):.2f} epochs), "
          f"F={F}; knn/hf k={args.k}, rebuild every {args.rebuild_interval} steps; {args.threads} threads")
    header = (f"{'method':8s} {'budget':>6s} {'rows':>6s} {'pos-only':>8s} | {'top1@F':>7s} {'/full':>6s} | "
              f"{'top1@S':>7s} {'/full':>6s} | {'ms/step':>7s} {'rebuild wait s':>14s}")
    print(header)
    print("-" * len(header))
    for run in runs:
        a_f, a_s = acc_at(run, F), acc_at(run, S)
        wait = "" if run["rebuild"] is None else f"{run['rebuild']['total_wait_seconds']:.1f}"
        print(f"{run['method']:8s} {fmt_budget(run['budget']):>6s} {run['active_rows']:6d} "
              f"{run['positives_only_steps']:8d} | {a_f:7.4f} {a_f / full_f:6.3f} | {a_s:7.4f} {a_s / full_s:6.3f} | "
              f"{run['train_ms_per_step']:7.1f} {wait:>14s}")
    ratios = analysis["seed_ratios_at_final"]
    if ratios:
        print(f"\nat S, {fmt_budget(REPLICATED_BUDGET)}, per seed (a new task instance each): full's top-1 and "
              "each method's / full's")
        print(f"{'seed':>6s} {'full':>7s} " + " ".join(f"{m:>7s}" for m in args.methods))
        for seed, values in ratios.items():
            print(f"{seed:>6s} {values['full']:7.4f} " + " ".join(f"{values[m]:7.3f}" for m in args.methods))
        means = {m: sum(v[m] for v in ratios.values()) / len(ratios) for m in args.methods}
        print(f"{'mean':>6s} {'':7s} " + " ".join(f"{means[m]:7.3f}" for m in args.methods))
    p = analysis["protocol"]
    print()
    rising = (f"full at F={F}: {full_f:.4f}; gains {p['full_gain_fixed_to_80pct_points']:+.2f} points by step "
              f"{p['step_80pct']} and {p['full_gain_fixed_to_final_points']:+.2f} by S")
    if p["full_gain_last_interval_before_fixed_points"] is not None:
        rising += f"; {p['full_gain_last_interval_before_fixed_points']:+.2f} points in the interval before F"
    print(f"{mark(p['full_still_rising_at_fixed'])} full softmax still improving at F: {rising}")
    print(f"{mark(p['full_converged_at_final'])} full softmax converged at S={S}: {full_s:.4f}, "
          f"{p['full_gain_last_20pct_points']:+.2f} points over the last 20 % of the steps "
          f"(criterion < {CONVERGED_POINTS}); within {CONVERGED_POINTS} points of its final accuracy from step "
          f"{p['full_within_half_point_of_final_from_step']} on")
    print()
    for c in analysis["checks"]:
        print(f"{mark(c['pass'])} {c['check']}: {c['detail']}")


def plot(runs: list[dict], args, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    S, F = args.steps, args.fixed_step
    full = runs[0]
    budgets = sorted(args.budgets)
    colours = {"partial": "tab:blue", "knn": "tab:orange", "hf": "tab:green", "full": "black"}
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for ax, step, title in ((axes[0], F, f"fixed step count: step {F}"), (axes[1], S, f"convergence: step {S}")):
        ax.axhline(acc_at(full, step), color=colours["full"], linestyle="--", label=f"full ({acc_at(full, step):.3f})")
        for method in args.methods:
            xs, ys = [], []
            for budget in budgets:
                run = next((r for r in runs if r["method"] == method and r["budget"] == budget), None)
                if run is not None:
                    xs.append(100 * budget)
                    ys.append(acc_at(run, step))
            ax.plot(xs, ys, marker="o", color=colours[method], label=method)
        ax.set_xticks([100 * b for b in budgets])
        ax.set_xticklabels([f"{100 * b:g}%" for b in budgets])
        ax.set_xlabel("budget (active rows / classes)")
        ax.set_ylabel("held-out top-1 accuracy")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    ax = axes[2]
    top = max(budgets)
    for run in runs:
        if run["method"] != "full" and run["budget"] != top:
            continue
        xs = [p["step"] for p in run["curve"]]
        ys = [p["top1"] for p in run["curve"]]
        label = "full" if run["method"] == "full" else f"{run['method']} {fmt_budget(top)}"
        ax.plot(xs, ys, marker=".", color=colours[run["method"]], label=label,
                linestyle="--" if run["method"] == "full" else "-")
    ax.axvline(F, color="grey", linestyle=":", label=f"F = {F}")
    ax.axvline(math.ceil(0.8 * S), color="grey", linestyle="-.", label="0.8 S")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out top-1 accuracy")
    ax.set_title(f"learning curves (full and {fmt_budget(top)} budget)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.suptitle(f"hybridfc synthetic task: C={args.classes}, B={args.batch}, {args.samples_per_class} samples/class, "
                 f"cosface s=32 m=0.2; knn/hf k={args.k}, rebuild every {args.rebuild_interval} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_plan(plan: list[tuple], args, eval_steps: set[int], t0: float) -> list[dict]:
    """Train every ``(seed, method, budget)`` of ``plan``, ``--jobs`` at a time; results in plan order."""
    calls = [(seed, method, budget, args, eval_steps,
              f"[{i}/{len(plan)}]" + ("" if seed == args.seed else f" seed {seed}"), t0)
             for i, (seed, method, budget) in enumerate(plan, 1)]
    if args.jobs <= 1:
        return [train_one(*call) for call in calls]
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(train_one, *zip(*calls)))


def main() -> None:
    args = parse_args()
    S, F = args.steps, args.fixed_step
    eval_steps = set(range(args.eval_every, S + 1, args.eval_every)) | {F, math.ceil(0.8 * S), S}
    plan = [(args.seed, "full", None)] + [(args.seed, m, b) for b in args.budgets for m in args.methods]
    if REPLICATED_BUDGET in args.budgets:
        plan += [(seed, m, b) for seed in args.replicate_seeds
                 for m, b in [("full", None)] + [(m, REPLICATED_BUDGET) for m in args.methods]]
    else:
        args.replicate_seeds = []
    print(f"{len(plan)} runs of {S} steps, {args.jobs} at a time; evaluations at steps {sorted(eval_steps)}; budgets "
          + ", ".join(f"{fmt_budget(b)} = {max(1, math.floor(b * args.classes))} rows" for b in args.budgets)
          + f" (batch {args.batch}: at most {args.batch} positives); replicate seeds {args.replicate_seeds}",
          flush=True)
    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    runs = run_plan(plan, args, eval_steps, t0)
    total = time.perf_counter() - t0
    analysis = analyse(runs, args)
    print_report(runs, analysis, args)
    print(f"\ntotal {total:.0f} s; load average (1 min) {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end, "
          f"{os.cpu_count()} CPUs")
    result = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "config": {**vars(args), "input_dim": INPUT_DIM, "hidden": HIDDEN, "embedding_size": EMBEDDING,
                   "margin": MARGIN, "head_optimizer": HEAD_OPT, "backbone_optimizer":
                   {"type": "AdamW", "lr": BACKBONE_LR, "weight_decay": BACKBONE_WD},
                   "schedule": f"WarmupDecayLR: linear warm-up {WARMUP_STEPS} steps, linear decay to 0 at step {S}",
                   "world_size": 1, "convergence_criterion_points": CONVERGED_POINTS,
                   "held_out_samples": args.classes * args.test_samples_per_class,
                   "epochs": S * args.batch / (args.classes * args.samples_per_class)},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "hybridfc": hybridfc.__version__, "cpus": os.cpu_count(),
                        "load_average_start": load_start, "load_average_end": os.getloadavg()[0]},
        "total_seconds": total,
        "runs": runs,
        **analysis,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot([r for r in runs if r["seed"] == args.seed], args, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
