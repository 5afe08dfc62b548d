"""Image training: ``examples/train.py`` against a plain single-process PyTorch loop over the same
decoded data, backbone, batch, recipe and epochs, side by side in one run.

    python benchmarks/make_hangul.py --classes 2000                 # the data (once)
    python benchmarks/bench_image_training.py                       # hangul-2000, 2 epochs
    python benchmarks/bench_image_training.py --data benchmarks/data/hangul --epochs 5

``plain``: one process, ``torch.set_num_threads(2)`` (the machine's two cores), the RecordIO
images decoded once into one uint8 tensor before its clock starts (the example decodes each
image each epoch inside its loop, about 2.5 % of its step), the example's backbone (``resnet20``,
embedding 128), a CosFace head (the config's scale and margin) as one normalised matrix, the
config's optimizers (AdamW on the backbone with gradient clipping, momentum SGD on the head, both
on the config's warm-up and linear decay, as the example's head follows the backbone's
schedule), the example's augmentation (a random shift of up to 4 px, no flip: text), the global
batch of the example's two ranks. ``example``: ``examples/train.py`` under the deepspeed launcher
on 2 CPU ranks with ``--deepspeed_config`` (default ``ds_configs/cpu_images.json``) and
``--no-flip``. Each prints its training samples per second (evaluation not counted) and the
held-out top-1 on the test faces; then the ratios example / plain.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from hybridfc import models  # noqa: E402
from hybridfc.data import RecordIODataset  # noqa: E402
from main_job import run_main_job  # noqa: E402

SHIFT_PAD = 4


def decode_once(prefix: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, 3, H, W)`` uint8 images and ``(n,)`` int64 labels of a RecordIO set, decoded once."""
    data = RecordIODataset(str(prefix))
    first = data[0][0]
    images = torch.empty((len(data), *first.shape), dtype=torch.uint8)
    labels = torch.empty(len(data), dtype=torch.int64)
    for i in range(len(data)):
        image, label = data[i]
        images[i] = ((image + 1.0) * 127.5).round_().to(torch.uint8)
        labels[i] = int(label)
    return images, labels


def as_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [-1, 1], as the library's decoder gives."""
    return images.float().div_(127.5).sub_(1.0)


def random_shift(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image padded with ``SHIFT_PAD`` black pixels and cropped back at a random offset."""
    n, _, height, width = batch.shape
    padded = F.pad(batch, (SHIFT_PAD,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * SHIFT_PAD + 1, (n, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, top:top + height, left:left + width] for i, (top, left) in enumerate(offsets)])


class CosFace(nn.Module):
    """``s·(cos θ_j − m·[j = y])`` over normalised features and class rows."""

    def __init__(self, num_classes: int, embedding_size: int, scale: float, margin: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, embedding_size) * 0.01)
        self.scale, self.margin = scale, margin

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features, dim=1) @ F.normalize(self.weight, dim=1).t()

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cosine = self.logits(features)
        cosine = cosine - self.margin * F.one_hot(labels, cosine.shape[1])
        return F.cross_entropy(self.scale * cosine, labels)


def schedule_factor(step: int, warmup: int, total: int) -> float:
    """DeepSpeed's ``WarmupDecayLR`` (linear warm-up) at ``step`` (from 0), as a fraction of the peak."""
    if step < warmup:
        return step / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def run_plain(args, config: dict, train, test) -> dict:
    """The plain loop; returns samples/s, held-out top-1 and the final loss."""
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    section = config["hybridfc"]
    images, labels = train
    num_classes = int(labels.max()) + 1
    backbone = models.build_backbone(args.backbone, section["embedding_size"])
    head = CosFace(num_classes, section["embedding_size"], section["margin"]["scale"], section["margin"]["margin"])
    opt_cfg, head_cfg = config["optimizer"]["params"], section["optimizer"]["params"]
    backbone_opt = torch.optim.AdamW(backbone.parameters(), lr=opt_cfg["lr"], weight_decay=opt_cfg["weight_decay"])
    head_opt = torch.optim.SGD(head.parameters(), lr=head_cfg["lr"], momentum=head_cfg["momentum"],
                               weight_decay=head_cfg["weight_decay"])
    batch = args.batch
    steps_per_epoch = len(images) // batch
    total = min(steps_per_epoch * args.epochs, args.max_steps or steps_per_epoch * args.epochs)
    warmup = min(config["scheduler"]["params"]["warmup_num_steps"], total // 2)
    generator = torch.Generator().manual_seed(args.seed)
    trained, loss_value, start = 0, float("nan"), time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(images), generator=generator)
        for step in range(steps_per_epoch):
            done = epoch * steps_per_epoch + step
            if done == total:
                break
            factor = schedule_factor(done, warmup, total)
            for group in backbone_opt.param_groups:
                group["lr"] = opt_cfg["lr"] * factor
            for group in head_opt.param_groups:   # the example's head follows the backbone's schedule
                group["lr"] = head_cfg["lr"] * factor
            pick = order[step * batch:(step + 1) * batch]
            inputs = random_shift(as_input(images[pick]), generator)
            loss = head(backbone(inputs), labels[pick])
            backbone_opt.zero_grad(set_to_none=True)
            head_opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.get("gradient_clipping"):
                nn.utils.clip_grad_norm_(backbone.parameters(), config["gradient_clipping"])
            backbone_opt.step()
            head_opt.step()
            trained += len(pick)
            loss_value = float(loss.detach())
        print(f"  plain: epoch {epoch + 1}/{args.epochs}, loss {loss_value:.3f}, "
              f"{trained / (time.perf_counter() - start):.0f} samples/s", flush=True)
        if trained == total * batch:
            break
    seconds = time.perf_counter() - start
    return {"samples_per_s": trained / seconds, "top1": top1(backbone, head, test), "final_loss": loss_value,
            "train_seconds": seconds}


@torch.no_grad()
def top1(backbone: nn.Module, head: CosFace, test) -> float:
    backbone.eval()
    images, labels = test
    correct = 0
    for begin in range(0, len(images), 512):
        logits = head.logits(backbone(as_input(images[begin:begin + 512])))
        correct += int((logits.argmax(dim=1) == labels[begin:begin + 512]).sum())
    backbone.train()
    return correct / len(images)


def run_example(args, config: dict, num_train: int) -> dict:
    config = json.loads(json.dumps(config))
    config["train_micro_batch_size_per_gpu"] = args.batch // 2
    config["hybridfc"]["evaluation"]["interval"] = 10 ** 9   # evaluated once, at the end
    with tempfile.TemporaryDirectory(prefix="bench_image_training_") as tmp:
        result = run_main_job(config, "example", args.seed, Path(tmp),
                              ("--data", str(args.data / "train.rec"), "--test-data", str(args.data / "test.rec"),
                               "--backbone", args.backbone, "--epochs", str(args.epochs), "--no-flip",
                               "--workers", str(args.workers),
                               *(("--max-steps", str(args.max_steps)) if args.max_steps else ())))
    per_epoch = -(-num_train // args.batch)   # the loader keeps a last, shorter step
    steps = min(per_epoch * args.epochs, args.max_steps or per_epoch * args.epochs)
    samples = min(steps * args.batch, num_train * args.epochs)
    return {"samples_per_s": samples / result["train_seconds"], "top1": result["top1"],
            "final_loss": result["final_loss"], "train_seconds": result["train_seconds"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "benchmarks" / "data" / "hangul-2000",
                        help="a folder with train.rec/.idx and test.rec/.idx (benchmarks/make_hangul.py)")
    parser.add_argument("--config", type=Path, default=REPO / "ds_configs" / "cpu_images.json")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128, help="global batch (the example: half per rank)")
    parser.add_argument("--max-steps", type=int, help="stop both after this many steps (a speed check)")
    parser.add_argument("--backbone", default="resnet20", choices=models.BACKBONES)
    parser.add_argument("--workers", type=int, default=0, help="the example's loader workers per rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", default="plain,example")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not (args.data / "train.rec").exists():
        parser.error(f"{args.data}/train.rec not found: run benchmarks/make_hangul.py first")
    config = json.loads(args.config.read_text())
    started = time.perf_counter()
    train, test = decode_once(args.data / "train"), decode_once(args.data / "test")
    print(f"{args.data.name}: {len(train[0]):,} training and {len(test[0]):,} held-out images of "
          f"{int(train[1].max()) + 1:,} classes, {tuple(train[0].shape[1:])}, decoded in "
          f"{time.perf_counter() - started:.0f} s; {args.backbone}, global batch {args.batch}, {args.epochs} epochs, "
          f"{args.config.name}; torch {torch.__version__}", flush=True)
    results = {}
    for part in args.parts.split(","):
        print(f"[{part}] start {time.strftime('%H:%M:%S')}", flush=True)
        results[part] = run_plain(args, config, train, test) if part == "plain" else \
            run_example(args, config, len(train[0]))
        r = results[part]
        print(f"[{part}] {r['samples_per_s']:.0f} samples/s, held-out top-1 {r['top1']:.4f}, final loss "
              f"{r['final_loss']:.3f}, {r['train_seconds']:.0f} s training", flush=True)
    if "plain" in results and "example" in results:
        plain, example = results["plain"], results["example"]
        print(f"example / plain: samples/s {example['samples_per_s'] / plain['samples_per_s']:.2f}x, "
              f"top-1 {example['top1'] - plain['top1']:+.4f} ({example['top1'] / max(plain['top1'], 1e-9):.3f}x)")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
