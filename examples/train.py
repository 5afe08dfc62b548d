"""Train a classifier on hybridfc's synthetic many-class task, launched like any DeepSpeed job.

    deepspeed --num_gpus 2 examples/train.py --deepspeed_config ds_configs/cpu.json

(on CPU set ``OMP_NUM_THREADS``; ``--num_gpus`` is the number of ranks.) Flags scale the task:
``--num-classes 1000000`` keeps the rest of the config. At the end, rank 0 prints the held-out
top-1 accuracy, computed by a distributed argmax over the class shards.
"""

from __future__ import annotations

import argparse
import json
import time

import deepspeed
import torch
from torch import nn
from tqdm import tqdm

import hybridfc
from hybridfc.config import load_ds_config
from hybridfc.data import DistributedLoader, SyntheticClasses
from hybridfc.data.loader import step_bounds
from hybridfc.log import log_dist


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser.add_argument("--num-classes", type=int, help="override hybridfc.num_classes of the config")
    parser.add_argument("--embedding-size", type=int, help="override hybridfc.embedding_size of the config")
    parser.add_argument("--samples-per-class", type=int, default=16, help="training samples per class")
    parser.add_argument("--test-samples-per-class", type=int, default=2, help="held-out samples per class")
    parser.add_argument("--input-dim", type=int, default=64, help="width of the synthetic inputs")
    parser.add_argument("--hidden", type=int, default=512, help="width of the backbone's hidden layer")
    parser.add_argument("--epochs", type=int, default=4, help="passes over the training set")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic task")
    parser.add_argument("--save-dir", help="save a checkpoint here at the end")
    parser.add_argument("--result-json", help="write the final metrics to this file (rank 0)")
    return deepspeed.add_config_arguments(parser).parse_args()


def build_backbone(input_dim: int, hidden: int, embedding_size: int) -> nn.Module:
    """A small MLP embedding network: ``(b, input_dim)`` -> ``(b, embedding_size)``."""
    return nn.Sequential(
        nn.Linear(input_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, embedding_size), nn.BatchNorm1d(embedding_size),
    )


def load_config(args: argparse.Namespace) -> dict:
    """The ds_config with the command line's overrides of the hybridfc section."""
    config = load_ds_config(args.deepspeed_config)
    section = config.setdefault("hybridfc", {})
    if args.num_classes is not None:
        section["num_classes"] = args.num_classes
    if args.embedding_size is not None:
        section["embedding_size"] = args.embedding_size
    args.deepspeed_config = None
    return config


def set_schedule_length(config: dict, num_samples: int, epochs: int) -> None:
    """Fill in ``total_num_steps`` of a decaying DeepSpeed schedule from the run's length."""
    scheduler = config.get("scheduler", {})
    if scheduler.get("type") not in ("WarmupDecayLR", "WarmupCosineLR"):
        return
    world_size = torch.distributed.get_world_size()
    global_batch = config["train_micro_batch_size_per_gpu"] * world_size
    steps = len(step_bounds(num_samples, global_batch, world_size)) // config.get("gradient_accumulation_steps", 1)
    scheduler.setdefault("params", {})["total_num_steps"] = max(1, steps * epochs)


def train_epoch(engine, loader: DistributedLoader, test_loader: DistributedLoader, epoch: int, show: bool) -> float:
    """One pass over ``loader``; held-out evaluation whenever the config's interval comes up."""
    engine.train()
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not show, dynamic_ncols=True, mininterval=1.0)
    start, seen, loss_value = time.perf_counter(), 0, float("nan")
    for x, y in bar:
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        if engine.evaluation_due():
            engine.evaluate(test_loader)
        seen += x.shape[0] * loader.world_size
        loss_value = loss.item()
        held_out = {f"top{k}": f"{acc:.3f}" for k, acc in engine.last_evaluation.items()}
        bar.set_postfix(loss=f"{loss_value:.3f}", samples_per_s=f"{seen / (time.perf_counter() - start):.0f}",
                        **held_out, refresh=False)
    return loss_value


def main() -> None:
    args = parse_args()
    config = load_config(args)
    section = config["hybridfc"]
    deepspeed.init_distributed(dist_backend=args.dist_backend if hasattr(args, "dist_backend") else None)
    torch.manual_seed(args.seed)
    train_set = SyntheticClasses(section.get("num_classes", 0), args.samples_per_class, args.input_dim,
                                 seed=args.seed, split="train")
    set_schedule_length(config, len(train_set), args.epochs)
    backbone = build_backbone(args.input_dim, args.hidden, section.get("embedding_size", 0))
    engine, _, loader, _ = hybridfc.initialize(args=args, model=backbone, model_parameters=backbone.parameters(),
                                               training_data=train_set, config=config)
    test_set = SyntheticClasses(train_set.num_classes, args.test_samples_per_class, args.input_dim,
                                seed=args.seed, split="test")
    test_loader = DistributedLoader(test_set, 1024, rank=loader.rank, world_size=loader.world_size, shuffle=False)
    show = loader.rank == 0
    log_dist(f"{len(train_set)} training samples, {len(loader)} steps per epoch per rank; "
             f"{len(test_set)} held-out samples")
    start = time.perf_counter()
    for epoch in range(args.epochs):
        loss = train_epoch(engine, loader, test_loader, epoch, show)
    train_seconds = time.perf_counter() - start
    if engine.last_evaluated_step != engine.global_steps or 1 not in engine.last_evaluation:
        engine.evaluate(test_loader, ks=(1,))
    top1 = engine.last_evaluation[1]
    log_dist(f"held-out top-1 accuracy {top1:.4f} on {len(test_set)} samples of {train_set.num_classes} classes "
             f"(final loss {loss:.3f}, training {train_seconds:.0f} s)")
    if args.save_dir:
        engine.save_checkpoint(args.save_dir)
    if args.result_json and show:
        with open(args.result_json, "w") as f:
            json.dump({"top1": top1, "final_loss": loss, "train_seconds": train_seconds,
                       "num_classes": train_set.num_classes, "epochs": args.epochs}, f)
    engine.close()


if __name__ == "__main__":
    main()
