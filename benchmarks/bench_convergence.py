"""How fast training converges: a plain recipe against its pieces, each on and off.

Two tasks (``--task``):

* ``synthetic``: the main job. Its *plain recipe* is the main job as it stood before the
  fast-convergence work (``ds_configs/cpu.json`` with ``examples/train.py --hidden-layers 2``:
  a 0.36M-parameter MLP, cosface s = 32, m = 0.2, no warm start); 10,000 classes x 16 samples,
  2,500 steps of global batch 256, held-out top-1 on 20,000 samples every 125 steps.
* ``digits``: a small real image set shipped in the repo (``benchmarks/data/digits``, written by
  ``make_digits.py``: UCI handwritten digits, 1,433 training and 364 held-out 8x8 images of 10
  classes), resized to 16 px, resnet20 at width 0.5, ``ds_configs/cpu_images.json`` (the plain
  recipe: cosface s = 32, m = 0.2, no warm start), 40 epochs (480 steps of global batch 128),
  held-out top-1 every 10 steps; random shifts, no flips (a mirrored digit is another glyph;
  ``--flips`` measures the flipped pipeline examples/train.py had before ``--no-flip``).

The pieces, each switched on alone and switched off from the whole:

* ``linear`` (synthetic only): the backbone without hidden layers (``--hidden-layers 0``). The
  task's classes are Gaussians with one shared covariance, so the best rule is linear in x;
  hidden ReLU layers fit the 16 training samples of each class instead.
* ``margin``: cosface s = 16, m = 0.1 instead of s = 32, m = 0.2.
* ``imprint``: ``warm_start.imprint``, the class rows set from the first backbone's mean features.
* ``plateau``: ``schedule.plateau`` (patience 2, factor 0.1) on the held-out top-1.
* ``warmup`` (digits only): DeepSpeed's lr warm-up, which both backbone and head follow, over 50
  steps instead of ``cpu_images.json``'s 200.
* ``refresh`` (digits only): ``warm_start.refresh_interval`` 40, the rows imprinted again from the
  current backbone every 40 steps.
* ``lars`` (digits only): the head's SGD layer-wise adaptive, ``lars_coefficient`` 0.05 (what each
  step adds to the momentum is at most 0.05 of the head's norm, so at lr 0.2 it moves the head by
  at most 1 % of its norm, before momentum).

Every run: 2 ranks under the deepspeed launcher, seeds 0, 1, 2. Per seed the target is 0.9x the
plain recipe's final top-1 on that seed; a run's *steps to target* is the first evaluation at or
above it. Printed per variant: final top-1 and steps to target (mean over seeds), and steps
against the plain recipe's on the same seeds.

    python benchmarks/bench_convergence.py                   # about 2 minutes per run on 2 cores
    python benchmarks/bench_convergence.py --task digits     # about 1 minute per run
    python benchmarks/bench_convergence.py --task digits --flips --variants plain   # digits flipped
    python benchmarks/bench_convergence.py --variants plain,all --seeds 0

Results: ``--out`` (JSON, runs added to what is there), ``--plot`` (top-1 against steps, mean
over seeds); ``benchmarks/RESULTS.md`` keeps the tables.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from main_job import run_main_job  # noqa: E402

PLAIN_MARGIN = {"type": "cosface", "scale": 32.0, "margin": 0.2}
TUNED_MARGIN = {"type": "cosface", "scale": 16.0, "margin": 0.1}
PLATEAU = {"patience": 2, "factor": 0.1}
SHORT_WARMUP = 50
REFRESH = 40
LARS = 0.05
DIGITS = REPO / "benchmarks" / "data" / "digits"


@dataclasses.dataclass(frozen=True)
class Task:
    """What a task's runs share: the ds_config they start from, the pieces that apply, how often
    they evaluate and the arguments of ``examples/train.py`` (without and with ``linear``)."""

    config: str
    pieces: tuple[str, ...]
    evaluation_interval: int
    args: tuple[str, ...]
    title: str

    def arguments(self, pieces: frozenset[str]) -> tuple[str, ...]:
        if "linear" not in self.pieces:
            return self.args
        return (*self.args, "--hidden-layers", "0" if "linear" in pieces else "2")


TASKS = {
    "synthetic": Task("cpu.json", ("linear", "margin", "imprint", "plateau"), 125, (),
                      "main job: 10,000 classes x 16 samples, 2 ranks"),
    "digits": Task("cpu_images.json", ("margin", "imprint", "plateau", "warmup", "refresh", "lars"), 10,
                   ("--data", str(DIGITS / "train.rec"), "--test-data", str(DIGITS / "test.rec"), "--image-size", "16",
                    "--backbone", "resnet20", "--width", "0.5", "--no-flip", "--epochs", "40"),
                   "UCI digits (1,433 images, 10 classes) at 16 px, resnet20 x 0.5, 2 ranks"),
}


def variants(pieces: tuple[str, ...]) -> dict[str, frozenset[str]]:
    """Variant name -> the pieces it switches on: plain, each piece alone, the main job's default
    (linear+margin, where linear applies), all, all but each."""
    table = {"plain": frozenset()}
    table.update({f"+{piece}": frozenset({piece}) for piece in pieces})
    if "linear" in pieces:
        table["linear+margin"] = frozenset({"linear", "margin"})
    table["all"] = frozenset(pieces)
    table.update({f"all -{piece}": frozenset(pieces) - {piece} for piece in pieces})
    return table


def job(task: Task, pieces: frozenset[str]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The ds_config and the extra arguments of ``examples/train.py`` with ``pieces`` on."""
    config = json.loads((REPO / "ds_configs" / task.config).read_text())
    section = config["hybridfc"]
    section["margin"] = copy.deepcopy(TUNED_MARGIN if "margin" in pieces else PLAIN_MARGIN)
    section["warm_start"] = {"imprint": "imprint" in pieces, "refresh_interval": REFRESH if "refresh" in pieces else 0}
    if "lars" in pieces:
        section["optimizer"]["params"]["lars_coefficient"] = LARS
    if "warmup" in pieces:
        config["scheduler"]["params"]["warmup_num_steps"] = SHORT_WARMUP
    section["schedule"] = {"plateau": copy.deepcopy(PLATEAU) if "plateau" in pieces else None}
    section["evaluation"] = {"interval": task.evaluation_interval, "top_k": [1]}
    return config, task.arguments(pieces)


def steps_to(history: list[dict], target: float) -> Optional[int]:
    """The first evaluated step whose top-1 reaches ``target`` (None: never)."""
    return next((point["step"] for point in history if point["top1"] >= target), None)


def run(task: Task, names: list[str], seeds: list[int], results: dict[str, Any], out: Path) -> None:
    """Each variant on each seed (seeds outermost, so a stopped run leaves every variant some);
    the results file is rewritten after every run."""
    table = variants(task.pieces)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for name in names:
                started = time.perf_counter()
                config, args = job(task, table[name])
                result = run_main_job(config, f"{name.replace(' ', '_')}_seed{seed}", seed, Path(tmp), args)
                results.setdefault("runs", {}).setdefault(name, {})[str(seed)] = result
                out.write_text(json.dumps(results, indent=1))
                print(f"  {name:>14s} seed {seed}: final top-1 {result['top1']:.4f} "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)


def report(task: Task, results: dict[str, Any]) -> str:
    """Final top-1 and steps to 0.9x the plain recipe's final top-1, per variant, mean over seeds."""
    runs = results["runs"]
    plain = runs.get("plain", {})
    lines = [f"{task.title}; target per seed = 0.9 x the plain recipe's final top-1; "
             f"evaluated every {task.evaluation_interval} steps",
             f"{'variant':>14s}{'seeds':>7s}{'final top-1':>13s}{'steps to target':>17s}{'vs plain':>10s}"]
    for name in variants(task.pieces):
        if name not in runs:
            continue
        seeds = sorted(set(runs[name]) & set(plain), key=int)
        if not seeds:
            continue
        final = statistics.mean(runs[name][seed]["top1"] for seed in seeds)
        steps = _mean_steps({seed: runs[name][seed] for seed in seeds}, plain)
        plain_steps = _mean_steps({seed: plain[seed] for seed in seeds}, plain)
        ratio = f"{steps / plain_steps:.2f}" if steps is not None and plain_steps else "-"
        shown = "never" if steps is None else f"{steps:.0f}"
        lines.append(f"{name:>14s}{len(seeds):>7d}{final:>13.4f}{shown:>17s}{ratio:>10s}")
    return "\n".join(lines)


def _mean_steps(runs: dict[str, dict], plain: dict[str, dict]) -> Optional[float]:
    """Mean over the seeds of the steps to 0.9x that seed's plain final top-1 (None if a seed never gets there)."""
    steps = [steps_to(result["history"], 0.9 * plain[seed]["top1"]) for seed, result in runs.items() if seed in plain]
    if not steps or any(s is None for s in steps):
        return None
    return statistics.mean(steps)


def plot(task: Task, results: dict[str, Any], path: Path) -> None:
    """Held-out top-1 against steps, mean over the seeds each variant ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 5.5))
    colours = plt.get_cmap("tab20").colors
    for index, (name, runs) in enumerate(results["runs"].items()):
        curves = [run["history"] for run in runs.values()]
        steps = [point["step"] for point in min(curves, key=len)]
        mean = [statistics.mean(curve[i]["top1"] for curve in curves) for i in range(len(steps))]
        style = {"linewidth": 2.5} if name in ("plain", "all") else {"linewidth": 1.1,
                                                                    "linestyle": "--" if name.startswith("+") else "-"}
        colour = "black" if name == "plain" else colours[index % len(colours)]
        axes.plot(steps, mean, label=f"{name} ({len(curves)} seeds)", color=colour, **style)
    plain = results["runs"].get("plain")
    if plain:
        target = 0.9 * statistics.mean(run["top1"] for run in plain.values())
        axes.axhline(target, color="grey", linestyle=":", label="0.9 x plain's final")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("held-out top-1")
    axes.set_title(task.title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, default="synthetic", help="the main job's synthetic task, or "
                        "the UCI digits (benchmarks/make_digits.py)")
    parser.add_argument("--variants", help="comma separated (default: all of the task's); synthetic: "
                        f"{', '.join(variants(TASKS['synthetic'].pieces))}")
    parser.add_argument("--seeds", default="0,1,2", help="comma separated")
    parser.add_argument("--out", help="results (JSON; default benchmarks/convergence[_TASK].json)")
    parser.add_argument("--plot", help="the chart (PNG; default benchmarks/convergence[_TASK].png)")
    parser.add_argument("--report-only", action="store_true", help="print the tables and plot from --out")
    parser.add_argument("--flips", action="store_true", help="digits: train with random horizontal flips, as "
                        "examples/train.py did before --no-flip (default out: convergence_digits_flips.json)")
    args = parser.parse_args()
    task = TASKS[args.task]
    if args.flips:
        if args.task != "digits":
            parser.error("--flips: only with --task digits")
        task = dataclasses.replace(task, args=tuple(a for a in task.args if a != "--no-flip"),
                                   title=f"{task.title}, random flips")
    table = variants(task.pieces)
    names = [name for name in (args.variants or ",".join(table)).split(",") if name]
    unknown = [name for name in names if name not in table]
    if unknown:
        parser.error(f"unknown variants {unknown}; known for {args.task}: {', '.join(table)}")
    suffix = ("" if args.task == "synthetic" else f"_{args.task}") + ("_flips" if args.flips else "")
    out = Path(args.out or REPO / "benchmarks" / f"convergence{suffix}.json")
    chart = Path(args.plot or REPO / "benchmarks" / f"convergence{suffix}.png")
    results = json.loads(out.read_text()) if out.exists() else {}
    if args.report_only and "runs" not in results:
        parser.error(f"--report-only: no runs in {out}")
    results["machine"] = {"cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    if not args.report_only:
        run(task, names, [int(seed) for seed in args.seeds.split(",")], results, out)
    print(report(task, results))
    plot(task, results, chart)
    print(f"chart: {chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
