"""Train a classifier on hybridfc's synthetic many-class task, launched like any DeepSpeed job.

    deepspeed --num_gpus 2 examples/train.py --deepspeed_config ds_configs/cpu.json

(on CPU set ``OMP_NUM_THREADS``; ``--num_gpus`` is the number of ranks.) Flags scale the task:
``--num-classes 1000000`` keeps the rest of the config. At the end, rank 0 prints the held-out
top-1 accuracy, computed by a distributed argmax over the class shards.

Real images: ``--data`` takes an image folder (one sub-folder per class) or an insightface
RecordIO set (a ``.rec`` file, its prefix, or a folder holding ``train.rec`` + ``train.idx``);
the number of classes comes from it and overrides the config's:

    deepspeed --num_gpus 2 examples/train.py --deepspeed_config ds_configs/cpu_images.json \\
        --data cifar10/train --test-data cifar10/test
    deepspeed --num_gpus 8 examples/train.py --deepspeed_config ds_configs/gpu_iresnet50_ms1m.json \\
        --data faces_emore --val faces_emore/lfw.bin --val faces_emore/cfp_fp.bin --workers 4

Images are decoded as RGB (grey ones as three equal channels, so every backbone takes 3
channels) and resized to ``--image-size`` (default: the size of the first training image).
Training images are flipped left-right at random (not with ``--no-flip``: digits, text) and,
at 64 px or less, shifted: padded by 4 black pixels on each side and cropped back at a random
place. ``--test-data`` (the same classes) gives held-out top-1/top-5 and ``--val`` face
verification on insightface's pair files, both at the config's evaluation interval and at the
end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import hybridfc
from hybridfc import models
from hybridfc.checkpoint import CheckpointError
from hybridfc.config import load_ds_config
from hybridfc.data import (Compose, DistributedLoader, ImageFolderDataset, RandomHorizontalFlip, RandomShift,
                           Resize, SyntheticClasses, nearest_mean_accuracy, open_image_set)
from hybridfc.data.loader import step_bounds
from hybridfc.eval import evaluate_pair_bin
from hybridfc.log import log_dist

SMALL_IMAGE = 64
"""Images up to this size (px) get resnet20 by default and the random shift; larger ones iresnet50."""
SHIFT_PAD = 4
FINAL_TOP_K = (1, 5)
IMAGE_ONLY_FLAGS = ("test_data", "val", "backbone", "width", "image_size", "flip")
FLAG_NAMES = {"flip": "--flip/--no-flip"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser.add_argument("--num-classes", type=int, help="override hybridfc.num_classes of the config")
    parser.add_argument("--embedding-size", type=int, help="override hybridfc.embedding_size of the config")
    parser.add_argument("--samples-per-class", type=int, default=16, help="training samples per class")
    parser.add_argument("--test-samples-per-class", type=int, default=2, help="held-out samples per class")
    parser.add_argument("--input-dim", type=int, default=64, help="width of the synthetic inputs")
    parser.add_argument("--hidden-layers", type=int, default=0, metavar="N",
                        help="hidden ReLU layers of the synthetic task's backbone (default 0: linear, which suits "
                             "the task: its classes are Gaussians of one shared covariance)")
    parser.add_argument("--hidden", type=int, default=512, help="width of the backbone's hidden layers")
    parser.add_argument("--epochs", type=int, default=4, help="passes over the training set")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (within --epochs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic task")
    parser.add_argument("--save-dir", help="save a checkpoint here at the end")
    parser.add_argument("--result-json", help="write the final metrics to this file (rank 0)")
    images = parser.add_argument_group("real images (instead of the synthetic task)")
    images.add_argument("--data", help="training set: an image folder (a sub-folder per class) or a RecordIO set "
                                       "(.rec file, its prefix, or a folder holding train.rec + train.idx)")
    images.add_argument("--test-data", help="held-out set with the same classes (the same kinds of path): "
                                            "top-1/top-5 at the config's evaluation interval and at the end")
    images.add_argument("--val", action="append", metavar="FILE.bin",
                        help="insightface pair file for face verification (repeatable)")
    images.add_argument("--backbone", choices=models.BACKBONES,
                        help=f"default: resnet20 for images of at most {SMALL_IMAGE} px, iresnet50 above")
    images.add_argument("--width", type=float, metavar="W", help="channel multiplier of the backbone (default 1.0)")
    images.add_argument("--image-size", type=int, metavar="N",
                        help="resize every image to N x N (default: the first image's size)")
    images.add_argument("--flip", action=argparse.BooleanOptionalAction,
                        help="random horizontal flips in training (default on, as for faces and most objects; "
                             "--no-flip for data a mirror changes, such as digits or text)")
    parser.add_argument("--workers", type=int, default=0, metavar="N", help="data-loading worker processes per rank")
    args = deepspeed.add_config_arguments(parser).parse_args()
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject flag combinations that have no meaning (``parser.error`` exits)."""
    if args.data is None:
        given = [FLAG_NAMES.get(name, f"--{name.replace('_', '-')}") for name in IMAGE_ONLY_FLAGS
                 if getattr(args, name) is not None]
        if given:
            parser.error(f"{', '.join(given)}: only with --data (images); the synthetic task takes none of them")
    elif args.num_classes is not None:
        parser.error("--num-classes sizes the synthetic task; with --data the classes come from the dataset")
    stems = [Path(path).stem for path in args.val or []]
    if len(set(stems)) != len(stems):
        parser.error(f"--val files need distinct names, got {args.val}")


def build_backbone(input_dim: int, hidden: int, embedding_size: int, hidden_layers: int = 0) -> nn.Module:
    """The synthetic task's embedding network ``(b, input_dim)`` -> ``(b, embedding_size)``:
    ``hidden_layers`` Linear-BN-ReLU layers of width ``hidden``, then Linear-BN."""
    layers: list[nn.Module] = []
    width = input_dim
    for _ in range(hidden_layers):
        layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, embedding_size), nn.BatchNorm1d(embedding_size))


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


def set_schedule_length(config: dict, num_samples: int, epochs: int, max_steps: int | None, world_size: int) -> None:
    """Fit DeepSpeed's schedule to the run's length: ``total_num_steps`` of a decaying schedule,
    and a warm-up of at most half the run (a longer one would end the run before the lr peaks)."""
    scheduler = config.get("scheduler", {})
    if scheduler.get("type") not in ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR"):
        return
    global_batch = config["train_micro_batch_size_per_gpu"] * world_size
    steps = len(step_bounds(num_samples, global_batch, world_size)) // config.get("gradient_accumulation_steps", 1)
    total = max(1, steps * epochs if max_steps is None else min(steps * epochs, max_steps))
    params = scheduler.setdefault("params", {})
    if scheduler["type"] != "WarmupLR":
        params["total_num_steps"] = total
    warmup = params.get("warmup_num_steps", 1000)   # DeepSpeed's default
    if warmup > total // 2:
        params["warmup_num_steps"] = max(1, total // 2)
        log_dist(f"scheduler.params.warmup_num_steps {warmup} is more than half of this run's {total} steps: the "
                 f"warm-up is shortened to {params['warmup_num_steps']} (set it in the config, or train longer)",
                 level=logging.WARNING)


def image_transform(size: int, train: bool, flip: bool = True) -> Compose:
    """Resize to ``size``; for training also a random horizontal flip (unless ``flip`` is off) and,
    for small images, a random shift."""
    steps = [Resize(size)]
    if train:
        if flip:
            steps.append(RandomHorizontalFlip())
        if size <= SMALL_IMAGE:
            steps.append(RandomShift(SHIFT_PAD))
    return Compose(steps)


def first_image_size(dataset: Dataset, path: str) -> int:
    """The side of the first image of ``dataset``, which must be square."""
    _, height, width = dataset[0][0].shape
    if height != width:
        raise ValueError(f"the first image of {path} is {height}x{width}; pass --image-size N to resize "
                         "every image to N x N")
    return height


def check_same_classes(train_set: Dataset, test_set: Dataset, path: str) -> None:
    """The held-out set must have the training set's classes (for two image folders, the same names)."""
    same = test_set.num_classes == train_set.num_classes
    if isinstance(train_set, ImageFolderDataset) and isinstance(test_set, ImageFolderDataset):
        same = same and test_set.classes == train_set.classes
    if not same:
        raise ValueError(f"--test-data {path} has {test_set.num_classes} classes, the training set "
                         f"{train_set.num_classes}: the held-out set needs the same classes (the same class "
                         "folders for image folders)")


def set_num_classes(section: dict, num_classes: int, path: str) -> None:
    """Make ``hybridfc.num_classes`` the dataset's, logging where it came from."""
    configured = section.get("num_classes")
    note = "" if configured == num_classes else f", overriding hybridfc.num_classes={configured} of the config"
    log_dist(f"{num_classes} classes in {path}{note}")
    section["num_classes"] = num_classes


@dataclass
class Task:
    """What a run trains and evaluates on."""

    train_set: Dataset
    num_classes: int
    backbone: nn.Module
    test_set: Dataset | None = None
    test_batch_size: int | None = None
    image_size: int | None = None
    val_files: list[str] = field(default_factory=list)
    ceiling: float | None = None


CEILING_MAX_WORK = 10**9
"""The data's ceiling is computed when held-out samples x classes is at most this (seconds on a CPU)."""


def synthetic_task(args: argparse.Namespace, section: dict) -> Task:
    """The built-in task: generated classes and a linear (or MLP) backbone."""
    train_set = SyntheticClasses(section.get("num_classes", 0), args.samples_per_class, args.input_dim,
                                 seed=args.seed, split="train")
    test_set = SyntheticClasses(train_set.num_classes, args.test_samples_per_class, args.input_dim,
                                seed=args.seed, split="test")
    backbone = build_backbone(args.input_dim, args.hidden, section.get("embedding_size", 0), args.hidden_layers)
    ceiling = None
    if len(test_set) * train_set.num_classes <= CEILING_MAX_WORK:
        ceiling = nearest_mean_accuracy(train_set, test_set)
        log_dist(f"the data's own ceiling: the nearest training-mean rule gets {ceiling:.4f} of the held-out set "
                 f"right ({args.samples_per_class} samples per class)")
    return Task(train_set, train_set.num_classes, backbone, test_set, test_batch_size=1024, ceiling=ceiling)


def image_task(args: argparse.Namespace, section: dict) -> Task:
    """``--data`` with its transforms, the held-out set, and the backbone for the image size."""
    train_set = open_image_set(args.data)
    size = first_image_size(train_set, args.data) if args.image_size is None else args.image_size
    flip = args.flip is not False
    train_set.transform = image_transform(size, train=True, flip=flip)
    set_num_classes(section, train_set.num_classes, args.data)
    test_set = None
    if args.test_data:
        test_set = open_image_set(args.test_data, train_set.num_classes)
        check_same_classes(train_set, test_set, args.test_data)
        test_set.transform = image_transform(size, train=False)
    name = args.backbone or ("resnet20" if size <= SMALL_IMAGE else "iresnet50")
    width = 1.0 if args.width is None else args.width
    kwargs = {"width": width, **({"image_size": size} if name.startswith("iresnet") else {})}
    backbone = models.build_backbone(name, section.get("embedding_size", 0), **kwargs)
    augmentation = ["random flip"] * flip + [f"random shift (pad {SHIFT_PAD})"] * (size <= SMALL_IMAGE)
    log_dist(f"{type(train_set).__name__} {args.data}: images resized to {size}x{size}, training augmentation "
             f"{', '.join(augmentation) or 'none'}; backbone {name} (width {width}, "
             f"{sum(p.numel() for p in backbone.parameters()):,} parameters)")
    return Task(train_set, train_set.num_classes, backbone, test_set, image_size=size, val_files=args.val or [])


class Evaluator:
    """Held-out top-k (``engine.evaluate``) and face verification (``evaluate_pair_bin``)."""

    def __init__(self, engine: hybridfc.HybridEngine, test_loader: DistributedLoader | None, val_files: list[str],
                 image_size: int | None) -> None:
        self.engine = engine
        self.test_loader = test_loader
        self.val_files = val_files
        self.image_size = image_size
        self.verification: dict[str, dict] = {}
        self.verified_step = -1
        self.history: list[dict] = []

    def maybe_run(self) -> None:
        """Evaluate when the config's interval comes up (call it after ``engine.step()``)."""
        if self.engine.evaluation_due() and self.engine.global_steps != self.verified_step:
            if self.test_loader is not None:
                self.engine.evaluate(self.test_loader)
            self.verify()
            self.record()

    def finish(self, ks: tuple[int, ...]) -> None:
        """Evaluate the final model on what was not evaluated at this step (top-k: for all of ``ks``)."""
        engine = self.engine
        stale = engine.last_evaluated_step != engine.global_steps or not set(ks) <= set(engine.last_evaluation)
        if self.test_loader is not None and stale:
            engine.evaluate(self.test_loader, ks=ks)
        if self.verified_step != engine.global_steps:
            self.verify()
        if not self.history or self.history[-1]["step"] != engine.global_steps:
            self.record()

    def record(self) -> None:
        """Add this step's accuracies to the history (the result JSON's accuracy-against-steps curve)."""
        top_k = {f"top{k}": acc for k, acc in self.engine.last_evaluation.items()}
        verified = {name: metrics["accuracy"] for name, metrics in self.verification.items()}
        self.history.append({"step": self.engine.global_steps, **top_k, **verified})

    def verify(self) -> None:
        """Face verification on every ``--val`` file; every rank embeds (ZeRO-3 needs all), rank 0 logs."""
        self.verified_step = self.engine.global_steps
        if not self.val_files:
            return
        was_training = self.engine.backbone.training
        batch_size = self.engine.train_micro_batch_size_per_gpu()
        self.engine.eval()
        for path in self.val_files:
            metrics = evaluate_pair_bin(self.engine.embed, path, batch_size=batch_size,
                                        image_size=(self.image_size, self.image_size))
            self.verification[Path(path).stem] = metrics
            tar = ", ".join(f"TAR@FAR={far:g} {value:.4f}" for far, value in metrics["tar_at_far"].items())
            log_dist(f"step {self.verified_step}: verification {path}: accuracy {metrics['accuracy']:.4f} "
                     f"± {metrics['accuracy_std']:.4f}, {tar} on {metrics['num_pairs']} pairs")
        self.engine.train(was_training)

    def postfix(self) -> dict[str, str]:
        """The latest accuracies for the progress line, with the step they were measured at."""
        held_out = {f"top{k}": f"{acc:.3f}" for k, acc in self.engine.last_evaluation.items()}
        verified = {name: f"{metrics['accuracy']:.3f}" for name, metrics in self.verification.items()}
        measured = {**held_out, **verified}
        step = max(self.engine.last_evaluated_step, self.verified_step)
        return {f"held-out@{step}": " ".join(f"{key} {value}" for key, value in measured.items())} if measured else {}


def finished(engine: hybridfc.HybridEngine, max_steps: int | None) -> bool:
    """Whether the run has taken ``max_steps`` optimizer steps (never without a limit)."""
    return max_steps is not None and engine.global_steps >= max_steps


def train_epoch(engine: hybridfc.HybridEngine, loader: DistributedLoader, evaluator: Evaluator, epoch: int,
                show: bool, max_steps: int | None) -> float:
    """One pass over ``loader`` (or up to ``max_steps``); evaluation whenever the config's interval comes up."""
    engine.train()
    bar = tqdm(total=len(loader), desc=f"epoch {epoch}", disable=not show, dynamic_ncols=True, mininterval=1.0)
    start, seen, loss_value = time.perf_counter(), 0, float("nan")
    for x, y in loader:
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        evaluator.maybe_run()
        seen += x.shape[0] * loader.world_size
        loss_value = loss.item()
        rate = seen / (time.perf_counter() - start)
        bar.set_postfix({"loss": f"{loss_value:.3f}", "samples/s (all ranks)": f"{rate:.0f}", **evaluator.postfix()},
                        refresh=False)
        bar.update()
        if finished(engine, max_steps):
            break
    bar.close()
    return loss_value


def final_metrics(engine: hybridfc.HybridEngine, evaluator: Evaluator, task: Task, ks: tuple[int, ...], loss: float,
                  train_seconds: float, epochs: int) -> dict:
    """Log the final held-out top-``ks`` and return the run's result (top-k, verification, loss, time)."""
    top_k = {k: engine.last_evaluation[k] for k in ks} if task.test_set is not None else {}
    closing = f"(final loss {loss:.3f}, training {train_seconds:.0f} s)"
    if top_k:
        summary = ", ".join(f"top-{k} accuracy {acc:.4f}" for k, acc in top_k.items())
        ceiling = "" if task.ceiling is None else f" (the data's ceiling, nearest training mean: {task.ceiling:.4f})"
        log_dist(f"held-out {summary}{ceiling} on {len(task.test_set)} samples of {task.num_classes} classes {closing}")
    else:
        log_dist(f"trained {engine.global_steps} steps on {task.num_classes} classes {closing}")
    result = {f"top{k}": acc for k, acc in top_k.items()}
    if evaluator.verification:
        result["verification"] = {name: metrics["accuracy"] for name, metrics in evaluator.verification.items()}
    if task.ceiling is not None:
        result["ceiling"] = task.ceiling
    return {**result, "final_loss": loss, "train_seconds": train_seconds, "num_classes": task.num_classes,
            "epochs": epochs, "history": evaluator.history}


def main() -> None:
    """The run; a bad input, config or checkpoint ends it with one line per rank, not a traceback."""
    try:
        run(parse_args())
    except (hybridfc.InputError, hybridfc.ConfigError, CheckpointError, FileNotFoundError) as error:
        message = " | ".join(str(error).splitlines())
        sys.stderr.write(f"examples/train.py: rank {os.environ.get('RANK', 0)}: {type(error).__name__}: {message}\n")
        sys.exit(1)


def run(args: argparse.Namespace) -> None:
    config = load_config(args)
    section = config["hybridfc"]
    deepspeed.init_distributed(dist_backend=args.dist_backend if hasattr(args, "dist_backend") else None)
    torch.manual_seed(args.seed)
    task = image_task(args, section) if args.data else synthetic_task(args, section)
    set_schedule_length(config, len(task.train_set), args.epochs, args.max_steps, torch.distributed.get_world_size())
    engine, _, loader, _ = hybridfc.initialize(args=args, model=task.backbone,
                                               model_parameters=task.backbone.parameters(),
                                               training_data=task.train_set, config=config)
    loader.num_workers = args.workers
    test_loader = None
    if task.test_set is not None:
        test_loader = DistributedLoader(task.test_set, task.test_batch_size or engine.train_micro_batch_size_per_gpu(),
                                        rank=loader.rank, world_size=loader.world_size, shuffle=False,
                                        num_workers=args.workers)
    evaluator = Evaluator(engine, test_loader, task.val_files, task.image_size)
    show = loader.rank == 0
    held_out = f"{len(task.test_set)} held-out samples" if task.test_set is not None else "no held-out set"
    log_dist(f"{len(task.train_set)} training samples, {len(loader)} steps per epoch per rank; {held_out}")
    start = time.perf_counter()
    with logging_redirect_tqdm(loggers=[logging.getLogger("hybridfc"), logging.getLogger("DeepSpeed")]):
        for epoch in range(args.epochs):
            loss = train_epoch(engine, loader, evaluator, epoch, show, args.max_steps)
            if finished(engine, args.max_steps):
                break
    train_seconds = time.perf_counter() - start
    log_dist(f"hybridfc communication over {engine.global_steps} steps, per rank: "
             f"{engine.communication_stats().summary()}")
    ks = tuple(k for k in FINAL_TOP_K if k <= task.num_classes) if args.data else (1,)
    evaluator.finish(ks)
    result = final_metrics(engine, evaluator, task, ks, loss, train_seconds, args.epochs)
    if args.save_dir:
        engine.save_checkpoint(args.save_dir)
    if args.result_json and show:
        with open(args.result_json, "w") as f:
            json.dump(result, f)
    engine.close()


if __name__ == "__main__":
    main()
