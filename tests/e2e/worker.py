"""A tiny hybridfc training job for the end-to-end tests, started by the real deepspeed launcher.

    deepspeed --num_gpus 2 tests/e2e/worker.py --runs runs.json --out DIR

``runs.json`` lists runs done one after another in this process, each a dict:

* ``name``: rank r writes its record to ``DIR/<name>_rank<r>.pt``;
* ``deepspeed_config``: the ds_config file, handed to ``hybridfc.initialize`` as
  ``args.deepspeed_config``, the way a user's ``--deepspeed_config`` reaches it;
* ``steps``: optimizer steps, each of ``gradient_accumulation_steps`` micro-batches;
* ``first_step`` (default 0): the index in the data stream of the first step's batches;
* ``loader`` (true): the batches come from hybridfc's own loader over a small dataset
  (``LOADER_SAMPLES_PER_CLASS``), epoch after epoch, instead of from the step numbers; a run that
  loads a checkpoint continues where the loader was;
* ``checkpoint`` with ``save_after`` (save there after that many steps; a list: after each) or
  ``load`` (true: load it before training);
* ``peek_before_save``: the loop takes the next batch before it saves, as a loop that checks its
  step limit after taking a batch does (the run should end at that save);
* ``kill_stage`` with ``kill_rank``: during the last save, that rank is killed (SIGKILL) when the
  save reaches that stage (:data:`hybridfc.checkpoint.SAVE_STAGE_HOOK`);
* ``bad_label_rank``: that rank puts the out-of-range label ``BAD_LABEL`` in its first batch;
* ``nan_rank`` with ``nan_steps``: that rank puts a NaN in its inputs at those steps (0-based);
* ``evaluate``: after each step at which ``engine.evaluation_due()``, ``engine.evaluate`` runs on
  a fixed held-out batch per rank (the record keeps the lr multiplier ``engine.lr_scale`` after
  each step either way);
* ``expect_error``: the run is meant to fail (on every rank): its error is reported as one line
  ``worker rank R run NAME: Type: message`` and the next run starts (several failures, one launch);
* ``state_dict_round_trip``: after training, ``engine.state_dict()`` is taken, zeros are loaded,
  then the state again; the record keeps the parameters after each load.

The micro-batch of (step, micro-batch, rank) depends on those three numbers alone, not on a
loader's state, so a resumed run sees the batches the uninterrupted run saw.

A record holds, per micro-batch: the inputs, labels and embeddings (as the backbone produced
them), the loss, the backbone's lr in effect, and the head shard and the head optimizer's lr
after ``engine.step()``; and once: the shard's first class, the shard before training and as the
first forward pass saw it (after a warm start), the
backbone's parameters after training (gathered under ZeRO-3), the grad_topk residual (or None), what hybridfc sent during the
steps (``engine.communication_stats()``) and the step counters of backbone and head. An exception is printed as one line
``worker rank R: Type: message`` before it ends the process, so a test can tell the ranks apart.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import sys
from pathlib import Path

import deepspeed
import torch
from torch import nn

import hybridfc
import hybridfc.checkpoint
from hybridfc.data import SyntheticClasses

INPUT_DIM = 16
HIDDEN = 32
EMBEDDING_SIZE = 16
SAMPLES_PER_CLASS = 64
LOADER_SAMPLES_PER_CLASS = 2
DATA_SEED = 7
MODEL_SEED = 11
BAD_LABEL = 1_000_000
HELD_OUT_STEP = 1_000_000


def build_backbone() -> nn.Module:
    """The same small MLP in every process (no batch norm: its statistics are per rank)."""
    torch.manual_seed(MODEL_SEED)
    return nn.Sequential(nn.Linear(INPUT_DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, EMBEDDING_SIZE))


def micro_batch(dataset: SyntheticClasses, step: int, micro: int, rank: int, batch_size: int):
    """``(x (b, INPUT_DIM) float32, y (b,) int64)`` of (step, micro-batch, rank)."""
    generator = torch.Generator().manual_seed(DATA_SEED * 1_000_003 + step * 1_009 + micro * 31 + rank)
    return dataset.batch(torch.randint(len(dataset), (batch_size,), generator=generator))


def run_args_classes(args: argparse.Namespace) -> int:
    """``hybridfc.num_classes`` of the run's ds_config."""
    return json.loads(Path(args.deepspeed_config).read_text())["hybridfc"]["num_classes"]


def endless(loader):
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def backbone_parameters(engine) -> dict[str, torch.Tensor]:
    """This rank's copy of the backbone's full parameters (ZeRO-3 partitions gathered)."""
    module = engine.backbone.module
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        return {name: p.detach().clone().cpu() for name, p in module.named_parameters()}


def arm_kill(stage: str, kill_rank: int, rank: int) -> None:
    """Kill this process, the way ``kill -9`` does, when a save reaches ``stage`` on ``kill_rank``."""
    def hook(reached: str) -> None:
        if reached == stage and rank == kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)

    hybridfc.checkpoint.SAVE_STAGE_HOOK = hook


def state_dict_round_trip(engine) -> dict:
    """The parameters after loading zeros and after loading ``engine.state_dict()`` back."""
    state = engine.state_dict()
    zeros = {part: {name: torch.zeros_like(value) for name, value in values.items()} for part, values in state.items()}
    engine.load_state_dict(zeros)
    zeroed = {"backbone": backbone_parameters(engine), "head": engine.head.weight.detach().clone()}
    engine.load_state_dict(state)
    return {"state": state, "zeroed": zeroed,
            "restored": {"backbone": backbone_parameters(engine), "head": engine.head.weight.detach().clone()}}


def train(args: argparse.Namespace, run: dict, out: Path) -> None:
    run_args = copy.copy(args)
    run_args.deepspeed_config = run["deepspeed_config"]
    backbone = build_backbone()
    embeddings: list[torch.Tensor] = []
    backbone.register_forward_hook(lambda module, inputs, output: embeddings.append(output.detach().clone()))
    loader_data = None
    if run.get("loader"):
        loader_data = SyntheticClasses(run_args_classes(run_args), LOADER_SAMPLES_PER_CLASS, INPUT_DIM, seed=DATA_SEED)
    engine, _, loader, _ = hybridfc.initialize(args=run_args, model=backbone, model_parameters=backbone.parameters(),
                                               training_data=loader_data)
    heads_at_forward: list[torch.Tensor] = []
    engine.head.register_forward_pre_hook(lambda head, inputs: heads_at_forward.append(head.weight.detach().clone()))
    rank = torch.distributed.get_rank()
    if run.get("load"):
        engine.load_checkpoint(run["checkpoint"])
    engine.communication_stats()
    dataset = SyntheticClasses(engine.head.num_classes, SAMPLES_PER_CLASS, INPUT_DIM, seed=DATA_SEED)
    stream = endless(loader) if loader is not None else None
    record = {"class_start": engine.head.class_start, "initial_head": engine.head.weight.detach().clone(),
              "inputs": [], "labels": [], "losses": [], "backbone_lrs": [], "heads": [], "head_lrs": [],
              "lr_scales": []}
    held_out = micro_batch(dataset, HELD_OUT_STEP, 0, rank, engine.train_micro_batch_size_per_gpu())
    first = run.get("first_step", 0)
    for step in range(first, first + run["steps"]):
        for micro in range(engine.gradient_accumulation_steps()):
            if stream is not None:
                x, y = next(stream)
            else:
                x, y = micro_batch(dataset, step, micro, rank, engine.train_micro_batch_size_per_gpu())
            if step == first and run.get("bad_label_rank") == rank:
                y[0] = BAD_LABEL
            if step in run.get("nan_steps", ()) and run.get("nan_rank") == rank:
                x[0, 0] = float("nan")
            loss = engine(x, y)
            engine.backward(loss)
            record["backbone_lrs"].append(engine.get_lr()[0])
            engine.step()
            if run.get("evaluate") and engine.evaluation_due():
                engine.evaluate([held_out])
            record["lr_scales"].append(engine.lr_scale)
            record["inputs"].append(x)
            record["labels"].append(y)
            record["losses"].append(loss.detach().clone())
            record["heads"].append(engine.head.weight.detach().clone())
            record["head_lrs"].append(engine.head_optimizer.param_groups[0]["lr"])
        saves = run.get("save_after")
        saves = saves if isinstance(saves, list) else [saves]
        if step + 1 - first in saves:
            if run.get("kill_stage") and step + 1 - first == max(saves):
                arm_kill(run["kill_stage"], run["kill_rank"], rank)
            if run.get("peek_before_save"):
                next(stream)
            engine.save_checkpoint(run["checkpoint"])
    if run.get("state_dict_round_trip"):
        record["round_trip"] = state_dict_round_trip(engine)
    reducer = engine.gradient_reducer
    record.update(embeddings=embeddings, backbone=backbone_parameters(engine), head_at_first_forward=heads_at_forward[0],
                  grad_topk=None if reducer is None else reducer.state_dict(),
                  communication=engine.communication_stats().to_dict(),
                  counters={"global_steps": engine.global_steps, "skipped_steps": engine.skipped_steps,
                            "head_steps": engine.head.steps, "head_skipped_steps": engine.head_optimizer.skipped_steps})
    torch.save(record, out / f"{run['name']}_rank{rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser.add_argument("--runs", required=True, help="JSON file: the list of runs")
    parser.add_argument("--out", required=True, help="directory for the records")
    args = deepspeed.add_config_arguments(parser).parse_args()
    torch.set_num_threads(1)
    try:
        for run in json.loads(Path(args.runs).read_text()):
            try:
                train(args, run, Path(args.out))
            except Exception as exc:
                if not run.get("expect_error"):
                    raise
                report(exc, f" run {run['name']}")
        # leave together: no rank exits while another still talks to it
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except Exception as exc:
        report(exc)
        raise


def report(exc: Exception, where: str = "") -> None:
    """``worker rank R<where>: Type: message`` as one line, in one write: it stays whole whatever
    the other rank prints meanwhile."""
    message = " | ".join(str(exc).splitlines())
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), f"worker rank {os.environ.get('RANK')}{where}: {type(exc).__name__}: {message}\n".encode())


if __name__ == "__main__":
    main()
