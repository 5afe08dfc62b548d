"""Top-k sparsified backbone gradients (``communication.grad_topk``) against DeepSpeed's dense
reduction: bytes on the wire, step time on a shaped link, and the main job's accuracy.

Three parts:

* ``link``: two ranks, each in its own network namespace (``netlink.NetLink``), train the
  8.8M-parameter MLP of ``bench_communication.py`` with the main job's head (``ds_configs/cpu.json``:
  10,000 classes, d = 128, 128 samples per rank, cosface; ZeRO-0 fp32). Four engines live in each
  rank, the same backbone under DeepSpeed's dense reduction and under grad_topk 0.1 / 0.01 / 0.001
  with fp32 values and 0.01 with bf16 values (no warm-up: the steps measured are the steps after
  it); their steps are interleaved (dense, 0.1, 0.01, …, dense, …), so a slow moment of the
  machine hits them all. Per engine and link
  rate: the bytes this rank's veth sent per step (head traffic, indices, TCP/IP framing included),
  what the layer counted, and the median step time.
* ``bytes4``: the same on four hosts, bytes only (four ranks on two cores make times meaningless).
* ``convergence``: the main job as it was measured (``examples/train.py --hidden-layers 2``: its
  former 0.36M-parameter MLP, with cosface s = 32, m = 0.2 and no warm start; 2,500 steps) dense and with grad_topk
  0.01 (fp32 or bf16 values, with or without a 250-step warm-up: ``--variants``), seeds 0, 1, 2,
  under the deepspeed launcher; held-out top-1.

    python benchmarks/bench_grad_topk.py                         # about 25 minutes on 2 cores
    python benchmarks/bench_grad_topk.py --parts link --steps 10 --rates 1gbit   # a quick look

Needs root for ``link`` and ``bytes4`` (network namespaces); without, those parts say why and are
skipped. Results: ``--out`` (JSON) and the tables printed; ``benchmarks/RESULTS.md`` keeps them.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import netlink  # noqa: E402
from main_job import run_main_job  # noqa: E402
from bench_communication import INPUT_DIM, _backbone, _synchronised_counter  # noqa: E402

LINK_VARIANTS = {"dense": None, "0.1": (0.1, "fp32"), "0.01": (0.01, "fp32"), "0.001": (0.001, "fp32"),
                 "0.01 bf16": (0.01, "bf16")}
"""The engines of the ``link`` part: (density, value dtype), no warm-up; ``bytes4`` takes dense and
the two at 0.01."""
BYTES4_VARIANTS = ("dense", "0.01", "0.01 bf16")
HIDDEN, LAYERS = 2048, 3
RATES = ("none", "1gbit")
SEEDS = (0, 1, 2)
VARIANTS = {
    "dense": None,
    "0.01": {"grad_topk": 0.01, "grad_topk_warmup_steps": 0, "grad_topk_value_dtype": "fp32"},
    "0.01 bf16": {"grad_topk": 0.01, "grad_topk_warmup_steps": 0, "grad_topk_value_dtype": "bf16"},
    "0.01 warm-up 250": {"grad_topk": 0.01, "grad_topk_warmup_steps": 250, "grad_topk_value_dtype": "fp32"},
    "0.01 bf16 warm-up 250": {"grad_topk": 0.01, "grad_topk_warmup_steps": 250, "grad_topk_value_dtype": "bf16"},
}
"""The main job's ``communication`` section per variant of the convergence part (None: dense)."""
PLAIN_MARGIN = {"type": "cosface", "scale": 32.0, "margin": 0.2}
"""The main job's margin when this benchmark was measured (with its 2-hidden-layer MLP, no warm start)."""
PARTS = ("link", "bytes4", "convergence")


# --- inside a rank -------------------------------------------------------------------------------

def _config(variant: tuple[float, str] | None) -> dict[str, Any]:
    """The main job's ds_config, without its schedule and evaluation, dense (None) or with
    grad_topk (density, value dtype) and no warm-up."""
    from hybridfc.config import load_ds_config

    config = load_ds_config(str(REPO / "ds_configs" / "cpu.json"))
    config.pop("scheduler")
    for key in ("evaluation", "warm_start"):   # no held-out set, no training data given to imprint from
        config["hybridfc"].pop(key, None)
    if variant is not None:
        density, value_dtype = variant
        config["hybridfc"]["communication"] = {"grad_topk": density, "grad_topk_warmup_steps": 0,
                                               "grad_topk_value_dtype": value_dtype}
    return config


def _engines(names: tuple[str, ...]) -> dict[str, Callable[[], None]]:
    """A training step per engine: the same backbone, under each of ``LINK_VARIANTS[names]``."""
    import torch

    import hybridfc
    from hybridfc.data import SyntheticClasses
    from hybridfc.parallel import group_rank

    steps = {}
    for name in names:
        config = _config(LINK_VARIANTS[name])
        torch.manual_seed(0)
        backbone = _backbone(HIDDEN, LAYERS, config["hybridfc"]["embedding_size"])
        engine, _, _, _ = hybridfc.initialize(model=backbone, model_parameters=backbone.parameters(),
                                              config=copy.deepcopy(config))
        data = SyntheticClasses(config["hybridfc"]["num_classes"], 16, INPUT_DIM, seed=0)
        generator = torch.Generator().manual_seed(group_rank())

        def step(engine=engine, data=data, generator=generator, batch=config["train_micro_batch_size_per_gpu"]) -> None:
            x, y = data.batch(torch.randint(len(data), (batch,), generator=generator))
            engine.backward(engine(x, y))
            engine.step()

        steps[name] = step
    return steps


def _wire_bytes(step: Callable[[], None], repeats: int) -> dict[str, float]:
    """Wire and layer bytes per step of ``step``."""
    from hybridfc.parallel import StatsCursor

    cursor = StatsCursor()
    start = _synchronised_counter()
    for _ in range(repeats):
        step()
    wire = (_synchronised_counter() - start) / repeats
    return {"wire": wire, "layer": cursor.take().total.bytes_sent / repeats}


def _interleaved_seconds(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds per step of each engine, the engines' steps interleaved."""
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            began = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - began)
    return {name: statistics.median(values) for name, values in seconds.items()}


def rank_job(part: str, rates: list[str], steps: int, out: str) -> None:
    """``link`` or ``bytes4`` on one rank; rank 0 writes the results to ``out``."""
    import deepspeed
    import torch

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    engines = _engines(tuple(LINK_VARIANTS) if part == "link" else BYTES4_VARIANTS)
    parameters = sum(p.numel() for p in _backbone(HIDDEN, LAYERS, 128).parameters())
    results: dict[str, Any] = {"parameters": parameters, "world_size": torch.distributed.get_world_size()}
    for rate in rates if part == "link" else ["none"]:
        netlink.shape(None if rate == "none" else rate)
        for step in engines.values():
            step()
            step()
        measured = {name: _wire_bytes(step, 3 if part == "bytes4" else 5) for name, step in engines.items()}
        if part == "link":
            for name, seconds in _interleaved_seconds(engines, steps).items():
                measured[name]["seconds"] = seconds
        results[rate] = measured
    netlink.shape(None)
    if torch.distributed.get_rank() == 0:
        Path(out).write_text(json.dumps(results, indent=1))
    torch.distributed.barrier()


# --- the parent ----------------------------------------------------------------------------------

def _run_on_link(part: str, hosts: int, rates: list[str], steps: int) -> dict[str, Any] | None:
    available, reason = netlink.namespaces_available()
    if not available:
        print(f"bench_grad_topk {part}: skipped, network namespaces cannot be made here: {reason}")
        return None
    with tempfile.TemporaryDirectory() as tmp, netlink.NetLink(hosts=hosts) as link:
        raw = os.path.join(tmp, "results.json")
        command = [sys.executable, __file__, "--rank-job", part, "--rates", ",".join(rates), "--steps", str(steps),
                   "--out", raw]
        env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        for rank, done in enumerate(link.run_ranks(command, world_size=hosts, timeout=3600, env=env)):
            if done.returncode:
                raise RuntimeError(f"rank {rank} failed:\n{done.stdout}\n{done.stderr}")
        return json.loads(Path(raw).read_text())


def _main_job(variant: str, seed: int, directory: Path) -> dict[str, float]:
    """One run of the main job (its MLP backbone) under the deepspeed launcher; its result JSON."""
    config = json.loads((REPO / "ds_configs" / "cpu.json").read_text())
    config["hybridfc"]["margin"] = PLAIN_MARGIN
    config["hybridfc"]["warm_start"] = {"imprint": False}
    if VARIANTS[variant] is not None:
        config["hybridfc"]["communication"] = VARIANTS[variant]
    name = f"{variant.replace(' ', '_')}_seed{seed}"
    return run_main_job(config, name, seed, directory, ("--hidden-layers", "2"))


def convergence(variants: list[str], results: dict[str, Any]) -> dict[str, Any]:
    """Each variant on each seed (seeds outermost, so a stopped run leaves every variant some)."""
    with tempfile.TemporaryDirectory() as tmp:
        for seed in SEEDS:
            for variant in variants:
                results.setdefault(variant, {})[str(seed)] = _main_job(variant, seed, Path(tmp))
                print(f"  main job {variant}, seed {seed}: held-out top-1 {results[variant][str(seed)]['top1']:.4f}",
                      flush=True)
    return results


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.3f}"


def link_report(link: dict[str, Any], rates: list[str]) -> str:
    lines = [f"8.8M MLP ({link['parameters'] / 1e6:.2f}M parameters) + the main job's head, 2 ranks, ZeRO-0 fp32: "
             "per rank and step",
             f"{'link':8s}{'gradient':>10s}{'wire MB':>10s}{'layer MB':>10s}{'plan MB':>10s}{'dense:wire':>12s}"
             f"{'step ms':>10s}{'vs dense':>10s}"]
    for rate in rates:
        measured = link[rate]
        dense = measured["dense"]
        for name, r in measured.items():
            plan = _planned(link["parameters"], 2, name)
            lines.append(f"{rate:8s}{name:>10s}{_mb(r['wire']):>10s}{_mb(r['layer']):>10s}{_mb(plan):>10s}"
                         f"{dense['wire'] / r['wire']:>12.1f}{r['seconds'] * 1e3:>10.1f}"
                         f"{r['seconds'] / dense['seconds']:>10.2f}")
    return "\n".join(lines)


def _planned(parameters: int, world_size: int, name: str) -> int:
    """``hybridfc plan``'s bytes for the backbone's gradient under variant ``name``."""
    from hybridfc.plan import backbone_gradient_exchange

    variant = LINK_VARIANTS[name]
    exchange = backbone_gradient_exchange(parameters, world_size, *(variant or (1.0, "fp32")))
    return exchange.dense if variant is None else exchange.topk


def bytes4_report(result: dict[str, Any]) -> str:
    measured, world_size = result["none"], result["world_size"]
    dense = measured["dense"]["wire"]
    lines = [f"{world_size} ranks, bytes only, per rank and step: wire MB (plan MB for the gradient), dense:wire"]
    lines += [f"  {name:>10s}: {_mb(r['wire'])} ({_mb(_planned(result['parameters'], world_size, name))}), "
              f"{dense / r['wire']:.1f}x" for name, r in measured.items()]
    return "\n".join(lines)


def convergence_report(results: dict[str, Any]) -> str:
    lines = ["main job (examples/train.py, ds_configs/cpu.json, 2,500 steps), held-out top-1"]
    means = {}
    for name, runs in results.items():
        values = [runs[seed]["top1"] for seed in sorted(runs, key=int)]
        means[name] = statistics.mean(values)
        lines.append(f"  {name:>16s}: " + ", ".join(f"{v:.4f}" for v in values) + f"  mean {means[name]:.4f}")
    lines += [f"  {name} - dense: {100 * (mean - means['dense']):+.2f} points"
              for name, mean in means.items() if name != "dense"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma separated: {', '.join(PARTS)}")
    parser.add_argument("--rates", default=",".join(RATES), help="link rates for 'link' ('none': unshaped)")
    parser.add_argument("--steps", type=int, default=50, help="interleaved steps per engine and rate")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "grad_topk.json"), help="results (JSON)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"convergence variants, comma separated: {', '.join(VARIANTS)}")
    parser.add_argument("--rank-job", choices=("link", "bytes4"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    rates = args.rates.split(",")
    if args.rank_job:
        rank_job(args.rank_job, rates, args.steps, args.out)
        return 0
    parts = args.parts.split(",")
    results: dict[str, Any] = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    if "link" in parts and (link := _run_on_link("link", 2, rates, args.steps)) is not None:
        results["link"] = link
        print(link_report(link, rates), flush=True)
    if "bytes4" in parts and (four := _run_on_link("bytes4", 4, ["none"], args.steps)) is not None:
        results["bytes4"] = four
        print(bytes4_report(four), flush=True)
    if "convergence" in parts:
        results["convergence"] = convergence(args.variants.split(","), results.get("convergence", {}))
        print(convergence_report(results["convergence"]), flush=True)
    results["machine"] = {"cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
