"""What the end-to-end tests share: the worker's ds_config, the ``deepspeed`` launcher run on
CPU with a free port, the ranks' records and errors, and the float64 single-process replay.

Each launch costs 10–20 s of start-up, so a launch of ``worker.py`` runs many short trainings one
after another and the tests read what each rank recorded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import worker
from reference import reference_loss, sgd_step

REPO = Path(__file__).resolve().parents[2]
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
WORKER = Path(__file__).with_name("worker.py")

NUM_CLASSES = 64
MICRO_BATCH = 8
MARGIN = {"type": "cosface", "scale": 16.0, "margin": 0.1}
HEAD_SGD = {"lr": 0.5, "momentum": 0.9, "weight_decay": 1e-4}
BACKBONE_OPTIMIZERS = {"SGD": {"lr": 0.2, "momentum": 0.9, "weight_decay": 1e-4},
                       "AdamW": {"lr": 0.01, "weight_decay": 0.01}}
CLIPPING = 6.0
HEAD_CLIPPING = 5.0
TRAIN_STEPS = 15
LOG_EVERY = 3
SAVE_AFTER, STEPS_AFTER_SAVE = 3, 2
TOLERANCE = 1e-5
FAILURE_TIMEOUT = 90

WARMUP_STEPS = 4
WARMUP = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.001, "warmup_max_lr": BACKBONE_OPTIMIZERS["AdamW"]["lr"],
                                         "warmup_num_steps": WARMUP_STEPS, "warmup_type": "linear"}}

MATRIX = [(stage, dtype) for stage in (0, 1, 2, 3) for dtype in ("fp32", "bf16")]
CHECKPOINTED = [(0, "fp32"), (1, "bf16"), (2, "fp32"), (3, "bf16")]
SELECTIONS = {
    # a knn rebuild is in flight when the checkpoint is saved (snapshot after step 2, swap after 4)
    "knn": {"selection": {"type": "knn", "budget": 12, "k": 4, "rebuild_interval": 2, "rebuild_delay": 2,
                          "late_rebuild": "wait"}},
    "hf": {"selection": {"type": "hf", "budget": 0.4, "k": 3, "rebuild_interval": 2, "rebuild_delay": 1,
                         "late_rebuild": "wait"},
           "storage_dtype": "bf16"},
    "partial": {"selection": {"type": "partial", "budget": 10}},
}


def ds_config(stage: int = 0, dtype: str = "fp32", accumulation: int = 1, optimizer: str = "SGD",
              **hybridfc: object) -> dict:
    """A ds_config for the worker: the backbone's optimizer with a constant lr (so the head's lr
    ratio is 1), both halves clipped (clipping acts on the first steps, whose gradients are large).

    SGD, unlike Adam, passes a wrong gradient scale on to the weights, so the float64 replay sees it.
    """
    params = dict(BACKBONE_OPTIMIZERS[optimizer], **({"torch_adam": True} if optimizer == "AdamW" else {}))
    config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": accumulation,
        "optimizer": {"type": optimizer, "params": params},
        "zero_allow_untested_optimizer": optimizer == "SGD",
        "gradient_clipping": CLIPPING,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
        "hybridfc": {"num_classes": NUM_CLASSES, "embedding_size": worker.EMBEDDING_SIZE, "margin": MARGIN,
                     "optimizer": {"type": "sgd", "params": HEAD_SGD}, "gradient_clipping": HEAD_CLIPPING,
                     **hybridfc},
    }
    if dtype == "bf16":
        config["bf16"] = {"enabled": True}
    return config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(output: str, lines: int = 60) -> str:
    return "\n".join(output.splitlines()[-lines:])


def shared_memory_left(port: int) -> list[str]:
    """The 66 MB ``/dev/shm`` buffers of DeepSpeed's CPU all-reduce op (named after the master
    port) that a launch left behind; hybridfc unlinks them once every rank has mapped them."""
    return sorted(path.name for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


def launch(script: Path, *args: object, timeout: float, cwd: Path = REPO, ranks: int = 2) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus 2 script args…`` on CPU, in ``cwd``; the whole process tree is killed
    on timeout. Every launch, whether it succeeds or fails, must leave ``/dev/shm`` as it found it."""
    port = free_port()
    command = [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", str(port), str(script), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as process:
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            pytest.fail(f"{script.name} did not finish within {timeout} s (hang?):\n{tail(output)}")
    left = shared_memory_left(port)
    for name in left:
        Path("/dev/shm", name).unlink()
    assert not left, f"{script.name} left DeepSpeed's buffers in /dev/shm: {left}\n{tail(output)}"
    return subprocess.CompletedProcess(command, process.returncode, output)


def launch_worker(directory: Path, runs: list[dict], timeout: float, ranks: int = 2) -> subprocess.CompletedProcess:
    """Launch the worker on ``runs``; a run's ``"config"`` dict is written to ``<name>.json`` first."""
    directory.mkdir(parents=True, exist_ok=True)
    specs = []
    for run in runs:
        spec = dict(run)
        if "config" in spec:
            path = directory / f"{spec['name']}.json"
            path.write_text(json.dumps(spec.pop("config")))
            spec["deepspeed_config"] = str(path)
        specs.append(spec)
    runs_file = directory / f"runs_{runs[0]['name']}.json"
    runs_file.write_text(json.dumps(specs))
    return launch(WORKER, "--runs", runs_file, "--out", directory, timeout=timeout, ranks=ranks)


def assert_succeeded(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"launcher returned {result.returncode}:\n{tail(result.stdout)}"


def rank_errors(result: subprocess.CompletedProcess) -> dict[int, tuple[str, str]]:
    """``{rank: (exception type, message)}`` from the worker's ``worker rank R: …`` lines."""
    found = re.findall(r"worker rank (\d+): (\w+): (.*)$", result.stdout, flags=re.MULTILINE)
    return {int(rank): (kind, message) for rank, kind, message in found}


def assert_failed(result: subprocess.CompletedProcess, kinds: tuple[str, ...], *fragments: str,
                  every_rank: bool) -> None:
    """Non-zero exit, and every rank (or, with ``every_rank`` False, each rank that got as far as
    reporting before the launcher stopped it) raised one of ``kinds`` naming all ``fragments``."""
    assert result.returncode != 0, f"launcher returned 0 despite the bad input:\n{tail(result.stdout)}"
    errors = rank_errors(result)
    reported = f"ranks that reported an error: {sorted(errors)}\n{tail(result.stdout)}"
    assert (set(errors) == {0, 1}) if every_rank else bool(errors), reported
    for rank, (raised, message) in errors.items():
        assert raised in kinds, f"rank {rank} raised {raised}: {message}"
        for fragment in fragments:
            assert fragment in message, f"rank {rank}'s error does not name {fragment!r}: {message}"


def assert_run_failed(result: subprocess.CompletedProcess, name: str, kinds: tuple[str, ...], *fragments: str) -> None:
    """Run ``name`` of a launch (an ``expect_error`` run) raised one of ``kinds`` naming every
    fragment, on every rank."""
    found = re.findall(rf"worker rank (\d+) run {re.escape(name)}: (\w+): (.*)$", result.stdout, flags=re.MULTILINE)
    errors = {int(rank): (kind, message) for rank, kind, message in found}
    assert set(errors) == {0, 1}, f"ranks whose run {name} failed: {sorted(errors)}\n{tail(result.stdout)}"
    for rank, (raised, message) in errors.items():
        assert raised in kinds, f"run {name}, rank {rank} raised {raised}: {message}"
        for fragment in fragments:
            assert fragment in message, f"run {name}, rank {rank}'s error does not name {fragment!r}: {message}"


def records(directory: Path, name: str) -> list[dict]:
    """What ranks 0 and 1 recorded in run ``name``."""
    return [torch.load(directory / f"{name}_rank{rank}.pt") for rank in (0, 1)]


def global_batch(recs: list[dict], key: str, index: int) -> torch.Tensor:
    return torch.cat([rec[key][index] for rec in recs])


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, what: str, tol: float = TOLERANCE) -> None:
    """Largest deviation at most ``tol`` times the largest magnitude of ``expected``."""
    actual, expected = actual.double(), expected.double()
    error = float((actual - expected).abs().max() / expected.abs().max())
    assert error <= tol, f"{what}: relative deviation {error:.2e} > {tol:.0e}"


def single_process_replay(recs: list[dict], optimizer: str = "SGD", accumulation: int = 1,
                          backbone: torch.nn.Module | None = None, head_lars: float = 0.0):
    """Replay a run in one float64 process; ``(loss per micro-batch, head after each micro-batch)``.

    Each step uses the backbone lr the run recorded, and the head's configured lr times its ratio
    to the backbone's configured lr.

    Without ``backbone`` the recorded embeddings are used and only the head is replayed (momentum
    SGD after clipping the whole head's gradient norm); with it, the embeddings are recomputed
    from the recorded inputs and the backbone trains alongside (``optimizer`` after clipping, as
    DeepSpeed does). ``head_lars``: the head's gradient and weight decay times LARS's trust ratio of
    the whole head.
    """
    weight = torch.cat([rec["initial_head"] for rec in recs]).double().requires_grad_()
    head_optimizer = torch.optim.SGD([weight], **HEAD_SGD)
    base_lr = BACKBONE_OPTIMIZERS[optimizer]["lr"]
    if backbone is not None:
        backbone_optimizer = getattr(torch.optim, optimizer)(backbone.parameters(), **BACKBONE_OPTIMIZERS[optimizer])
    losses, heads = [], []
    for i in range(len(recs[0]["losses"])):
        if backbone is None:
            embeddings = global_batch(recs, "embeddings", i).double()
        else:
            embeddings = backbone(global_batch(recs, "inputs", i).double())
        loss = reference_loss(embeddings, global_batch(recs, "labels", i), weight, MARGIN)
        (loss / accumulation).backward()
        losses.append(loss.detach())
        if (i + 1) % accumulation == 0:
            lr = recs[0]["backbone_lrs"][i]
            head_optimizer.param_groups[0]["lr"] = HEAD_SGD["lr"] * lr / base_lr
            if backbone is not None:
                backbone_optimizer.param_groups[0]["lr"] = lr
                torch.nn.utils.clip_grad_norm_(backbone.parameters(), CLIPPING)
                backbone_optimizer.step()
                backbone_optimizer.zero_grad()
            torch.nn.utils.clip_grad_norm_([weight], HEAD_CLIPPING)
            sgd_step(head_optimizer, weight, head_lars)
            head_optimizer.zero_grad()
        heads.append(weight.detach().clone())
    return torch.stack(losses), heads


def assert_matches_replay(recs: list[dict], losses: torch.Tensor, heads: list[torch.Tensor]) -> None:
    for rec in recs:
        assert_close_relative(torch.stack(rec["losses"]), losses, "losses")
    for i, expected in enumerate(heads):
        assert_close_relative(torch.cat([rec["heads"][i] for rec in recs]), expected,
                              f"head shards after micro-batch {i + 1}")
