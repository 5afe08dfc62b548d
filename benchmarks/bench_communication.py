"""What a training step sends between two hosts, and what it costs: the wire against the models.

Two ranks, each in its own network namespace (``netlink.NetLink``), talk over a veth link that is
left unshaped or shaped to 1 Gbit/s and 160 Mbit/s. Every figure is one rank's, per step:

* **wire**: the bytes its veth counted (``tx_bytes``; TCP/IP framing and ACKs included, about
  0.2 % with veth's segmentation offload, ``netlink``'s docstring);
* **layer**: what hybridfc's communication layer counted (``communication_stats()``), payload only;
* **DeepSpeed (model)**: the backbone's dense gradient all-reduce, which DeepSpeed sends and the
  layer does not see: ``2(N−1)/N · 4 · parameters`` (``hybridfc.parallel.wire``), ZeRO-0 fp32;
* **planner**: ``hybridfc plan``'s communication for the head.

Three parts: the collectives alone (4 MiB fp32: the wire model, and gloo's reduce-scatter against
the all-to-all the layer uses instead), the head alone (plain ``torch.distributed``), and whole
``hybridfc.initialize`` jobs: the main job's former MLP (``examples/train.py --hidden-layers 2``) and an 8.8M-parameter
MLP (three hidden layers of 2048), both with the main job's head (``ds_configs/cpu.json``:
10,000 classes, d = 128, 128 samples per rank, cosface). Step time is the median over the
measured steps; ``exposed`` is the time the layer's collectives kept the step waiting.

    python benchmarks/bench_communication.py                 # about 4 minutes on 2 cores
    python benchmarks/bench_communication.py --steps 5 --rates none   # a quick look

Needs root (network namespaces); without, it says why and exits. Results: ``--out`` (JSON) and
the tables it prints; ``benchmarks/RESULTS.md`` keeps them.
"""

from __future__ import annotations

import argparse
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

RATES = ("none", "1gbit", "160mbit")
COLLECTIVE_BYTES = 4 * 2**20
BACKBONES = {"main job MLP": (512, 2), "8.8M MLP": (2048, 3)}   # hidden width, hidden layers
INPUT_DIM = 64
PIPELINE = {"global_batch": 4096, "dim": 256, "classes": 100_000, "chunks": (1, 2, 4, 8),
            "selection": {"type": "partial", "budget": 1000}}


# --- inside a rank -------------------------------------------------------------------------------

def _synchronised_counter() -> int:
    """This host's wire counter once every rank has finished what came before (tbf may still be
    sending a rank's last bytes when its collective returns)."""
    import torch.distributed as dist

    dist.barrier()
    return netlink.tx_bytes()


def _measure(run_once: Callable[[], None], repeats: int) -> dict[str, float]:
    """Wire bytes per repeat and the median seconds of ``run_once``."""
    from hybridfc.parallel import StatsCursor

    cursor = StatsCursor()
    start = _synchronised_counter()
    seconds = []
    for _ in range(repeats):
        began = time.perf_counter()
        run_once()
        seconds.append(time.perf_counter() - began)
    wire = (_synchronised_counter() - start) / repeats
    counted = cursor.take()
    return {"wire": wire, "layer": counted.total.bytes_sent / repeats, "seconds": statistics.median(seconds),
            "exposed": counted.total.exposed_seconds / repeats}


def _collectives(repeats: int) -> dict[str, dict[str, float]]:
    """Each collective on a 4 MiB fp32 tensor: wire bytes against the model, and time."""
    import torch
    import torch.distributed as dist

    from hybridfc.parallel import all_gather, all_reduce, reduce_scatter_padded, wire

    world = dist.get_world_size()
    full = torch.randn(COLLECTIVE_BYTES // 4)
    part = full[: full.numel() // world].clone()
    out = torch.empty_like(part)
    rows = [full.numel() // world] * world
    cases = {
        "all_gather (layer)": (lambda: all_gather(part), wire.all_gather_bytes(COLLECTIVE_BYTES // world, world)),
        "all_reduce (layer)": (lambda: all_reduce(full.clone()), wire.all_reduce_bytes(COLLECTIVE_BYTES, world)),
        "reduce_scatter: gloo's own": (lambda: dist.reduce_scatter_tensor(out, full),
                                       wire.reduce_scatter_bytes(COLLECTIVE_BYTES, world, "gloo")),
        "reduce_scatter (layer: all-to-all + sum)": (lambda: reduce_scatter_padded(full, rows),
                                                     wire.scatter_sum_bytes(COLLECTIVE_BYTES, world)),
    }
    results = {}
    for name, (run_once, model) in cases.items():
        run_once()
        results[name] = {**_measure(run_once, repeats), "model": model}
    return results


def _head_alone(steps: int) -> dict[str, float]:
    """The main job's head, plain torch.distributed: forward, backward, optimizer step."""
    import torch

    import hybridfc
    from hybridfc.config import load_ds_config
    from hybridfc.parallel import group_rank

    section = load_ds_config(str(REPO / "ds_configs" / "cpu.json"))["hybridfc"]
    head = hybridfc.ClassParallelFC(section["num_classes"], section["embedding_size"], margin=section["margin"])
    optimizer = hybridfc.build_head_optimizer(head, section["optimizer"])
    generator = torch.Generator().manual_seed(group_rank())

    def step() -> None:
        embeddings = torch.randn(128, head.embedding_size, generator=generator, requires_grad=True)
        labels = torch.randint(0, head.num_classes, (128,), generator=generator)
        head(embeddings, labels).backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    return _measure(step, steps)


def _pipelined_head(rates: list[str], steps: int) -> dict[str, dict[int, dict[str, float]]]:
    """The head step (forward, backward, optimizer step) with each chunk count, interleaved step
    by step so that they share the machine's state: global batch 4096, d = 256, C = 100,000,
    partial selection with 1,000 rows per rank."""
    import torch

    import hybridfc
    from hybridfc.parallel import StatsCursor, group_rank, group_size

    local_batch = PIPELINE["global_batch"] // group_size()
    head = hybridfc.ClassParallelFC(PIPELINE["classes"], PIPELINE["dim"], selection=PIPELINE["selection"])
    optimizer = hybridfc.build_head_optimizer(head, {"type": "sgd", "params": {"lr": 0.1, "momentum": 0.9}})
    generator = torch.Generator().manual_seed(group_rank())

    def step(chunks: int) -> float:
        head.chunks = chunks
        embeddings = torch.randn(local_batch, PIPELINE["dim"], generator=generator, requires_grad=True)
        labels = torch.randint(0, PIPELINE["classes"], (local_batch,), generator=generator)
        _synchronised_counter()
        began = time.perf_counter()
        head(embeddings, labels).backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - began

    results = {}
    for rate in rates:
        netlink.shape(None if rate == "none" else rate)
        for chunks in PIPELINE["chunks"]:
            step(chunks)
        seconds: dict[int, list[float]] = {chunks: [] for chunks in PIPELINE["chunks"]}
        exposed = {chunks: 0.0 for chunks in PIPELINE["chunks"]}
        for _ in range(steps):
            for chunks in PIPELINE["chunks"]:
                cursor = StatsCursor()
                seconds[chunks].append(step(chunks))
                exposed[chunks] += cursor.take().total.exposed_seconds
        results[rate] = {chunks: {"seconds": statistics.median(seconds[chunks]), "exposed": exposed[chunks] / steps}
                         for chunks in PIPELINE["chunks"]}
    netlink.shape(None)
    return results


def _backbone(hidden: int, layers: int, embedding_size: int):
    from torch import nn

    widths = [INPUT_DIM] + [hidden] * layers
    blocks = [module for a, b in zip(widths, widths[1:]) for module in (nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU())]
    return nn.Sequential(*blocks, nn.Linear(hidden, embedding_size), nn.BatchNorm1d(embedding_size))


def _engine_job(hidden: int, layers: int, rates: list[str], steps: int) -> dict[str, Any]:
    """A ``hybridfc.initialize`` job with the main job's config, measured at each rate."""
    import torch

    import hybridfc
    from hybridfc.config import load_ds_config
    from hybridfc.data import SyntheticClasses
    from hybridfc.parallel import group_rank, group_size, wire

    config = load_ds_config(str(REPO / "ds_configs" / "cpu.json"))
    config.pop("scheduler")
    for key in ("evaluation", "warm_start"):   # no held-out set, no training data given to imprint from
        config["hybridfc"].pop(key, None)
    section = config["hybridfc"]
    torch.manual_seed(0)
    backbone = _backbone(hidden, layers, section["embedding_size"])
    parameters = sum(p.numel() for p in backbone.parameters())
    engine, _, _, _ = hybridfc.initialize(model=backbone, model_parameters=backbone.parameters(), config=config)
    data = SyntheticClasses(section["num_classes"], 16, INPUT_DIM, seed=0)
    generator = torch.Generator().manual_seed(group_rank())

    def step() -> None:
        x, y = data.batch(torch.randint(len(data), (config["train_micro_batch_size_per_gpu"],), generator=generator))
        engine.backward(engine(x, y))
        engine.step()

    results = {"parameters": parameters, "deepspeed_model": wire.all_reduce_bytes(4 * parameters, group_size())}
    for rate in rates:
        netlink.shape(None if rate == "none" else rate)
        for _ in range(2):
            step()
        results[rate] = _measure(step, steps)
    netlink.shape(None)
    return results


PARTS = ("collectives", "head", "pipeline", "jobs")


def rank_job(rates: list[str], steps: int, parts: list[str], out: str) -> None:
    """Everything measured on one rank; rank 0 writes it to ``out``."""
    import deepspeed
    import torch

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    results: dict[str, Any] = {}
    for rate in rates:
        netlink.shape(None if rate == "none" else rate)
        if "collectives" in parts:
            results.setdefault("collectives", {})[rate] = _collectives(max(3, steps // 4))
        if "head" in parts:
            results.setdefault("head", {})[rate] = _head_alone(steps)
    netlink.shape(None)
    if "pipeline" in parts:
        results["pipeline"] = _pipelined_head(rates, steps)
    if "jobs" in parts:
        results["jobs"] = {name: _engine_job(hidden, layers, rates, steps) for name, (hidden, layers) in BACKBONES.items()}
    if torch.distributed.get_rank() == 0:
        Path(out).write_text(json.dumps(results, indent=1))
    torch.distributed.barrier()


# --- the parent: run the ranks, print the tables -------------------------------------------------

def _megabytes(nbytes: float) -> str:
    return f"{nbytes / 1e6:.3f}"


def _planned_head() -> int:
    from hybridfc.config import load_ds_config
    from hybridfc.plan import PlanInputs, make_plan

    section = load_ds_config(str(REPO / "ds_configs" / "cpu.json"))["hybridfc"]
    inputs = PlanInputs(section["num_classes"], section["embedding_size"], 2, 128)
    return make_plan(inputs).method("model_parallel").communication.total


def report(results: dict[str, Any], rates: list[str]) -> str:
    planned = _planned_head()
    lines: list[str] = []
    if "collectives" in results:
        lines += _collectives_report(results["collectives"], rates)
    if "head" in results:
        lines += _head_report(results["head"], rates, planned)
    if "pipeline" in results:
        lines += [pipeline_report(results["pipeline"], rates), ""]
    for name, job in results.get("jobs", {}).items():
        lines += _job_report(name, job, rates, planned)
    return "\n".join(lines)


def _collectives_report(collectives: dict[str, Any], rates: list[str]) -> list[str]:
    lines = ["collectives, 4 MiB fp32, 2 ranks, per rank: MB model / MB wire / wire:model, ms",
             f"{'':44s}" + "".join(f"{rate:>34s}" for rate in rates)]
    for name in collectives[rates[0]]:
        cells = []
        for rate in rates:
            r = collectives[rate][name]
            cells.append(f"{_megabytes(r['model'])} / {_megabytes(r['wire'])} / {r['wire'] / r['model']:.3f}, "
                         f"{r['seconds'] * 1e3:5.1f}")
        lines.append(f"{name:44s}" + "".join(f"{c:>34s}" for c in cells))
    return lines + [""]


def _head_report(head: dict[str, Any], rates: list[str], planned: int) -> list[str]:
    lines = ["head alone (10,000 classes, d = 128, 128 per rank): per step",
             f"{'link':10s}{'wire MB':>10s}{'layer MB':>10s}{'plan MB':>10s}{'layer:wire':>12s}{'plan:layer':>12s}"
             f"{'step ms':>10s}{'exposed ms':>12s}"]
    for rate in rates:
        r = head[rate]
        lines.append(f"{rate:10s}{_megabytes(r['wire']):>10s}{_megabytes(r['layer']):>10s}{_megabytes(planned):>10s}"
                     f"{r['layer'] / r['wire']:>12.3f}{planned / r['layer']:>12.3f}{r['seconds'] * 1e3:>10.1f}"
                     f"{r['exposed'] * 1e3:>12.1f}")
    return lines + [""]


def _job_report(name: str, job: dict[str, Any], rates: list[str], planned: int) -> list[str]:
    model = job["deepspeed_model"]
    lines = [f"{name} ({job['parameters'] / 1e6:.2f}M parameters) + the main job's head, "
             f"hybridfc.initialize, ZeRO-0 fp32: per step",
             f"{'link':10s}{'wire MB':>10s}{'layer MB':>10s}{'DS model':>10s}{'(l+DS):wire':>12s}"
             f"{'plan+DS':>10s}{'step ms':>10s}{'exposed ms':>12s}"]
    for rate in rates:
        r = job[rate]
        lines.append(f"{rate:10s}{_megabytes(r['wire']):>10s}{_megabytes(r['layer']):>10s}{_megabytes(model):>10s}"
                     f"{(r['layer'] + model) / r['wire']:>12.3f}{_megabytes(planned + model):>10s}"
                     f"{r['seconds'] * 1e3:>10.1f}{r['exposed'] * 1e3:>12.1f}")
    return lines + [""]


def pipeline_report(pipeline: dict[str, Any], rates: list[str]) -> str:
    """Step time per chunk count and rate, and how much of the hideable time each count hid:
    ``(t(1) − t(K)) / min(compute, communication)``, compute = the 1-chunk step unshaped,
    communication = its extra time on the shaped link."""
    chunks = list(pipeline[rates[0]])
    lines = [f"pipelined head step: global batch {PIPELINE['global_batch']}, d = {PIPELINE['dim']}, "
             f"C = {PIPELINE['classes']:,}, partial {PIPELINE['selection']['budget']} rows per rank; "
             "median step ms (exposed communication ms)",
             f"{'link':10s}" + "".join(f"{f'{k} chunks':>20s}" for k in chunks)]
    for rate in rates:
        lines.append(f"{rate:10s}" + "".join(f"{pipeline[rate][k]['seconds'] * 1e3:>11.1f} "
                                             f"({pipeline[rate][k]['exposed'] * 1e3:5.1f})" for k in chunks))
    if "none" in pipeline:
        compute = pipeline["none"][chunks[0]]["seconds"]
        for rate in (r for r in rates if r != "none"):
            communication = pipeline[rate][chunks[0]]["seconds"] - compute
            hideable = min(compute, communication)
            hidden = ", ".join(f"{k} chunks {(pipeline[rate][chunks[0]]['seconds'] - pipeline[rate][k]['seconds']) / hideable:.2f}"
                               for k in chunks[1:])
            lines.append(f"{rate}: compute {compute * 1e3:.0f} ms, communication {communication * 1e3:.0f} ms; "
                         f"share of min(compute, communication) hidden: {hidden}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default=",".join(RATES), help="link rates, comma separated ('none': unshaped)")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per job and rate")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "communication.json"), help="results (JSON)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"what to measure, comma separated: {', '.join(PARTS)}")
    parser.add_argument("--rank-job", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    rates = args.rates.split(",")
    if args.rank_job:
        rank_job(rates, args.steps, args.parts.split(","), args.out)
        return 0
    available, reason = netlink.namespaces_available()
    if not available:
        print(f"bench_communication: skipped, network namespaces cannot be made here: {reason}")
        return 0
    with tempfile.TemporaryDirectory() as tmp, netlink.NetLink(hosts=2) as link:
        raw = os.path.join(tmp, "results.json")
        command = [sys.executable, __file__, "--rank-job", "--rates", args.rates, "--steps", str(args.steps),
                   "--parts", args.parts, "--out", raw]
        env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        for rank, done in enumerate(link.run_ranks(command, world_size=2, timeout=1800, env=env)):
            if done.returncode:
                print(f"rank {rank} failed:\n{done.stdout}\n{done.stderr}")
                return 1
        results = json.loads(Path(raw).read_text())
    results["machine"] = {"cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(report(results, rates))
    return 0


if __name__ == "__main__":
    sys.exit(main())
