"""examples/train.py on real image files through the ``deepspeed`` launcher (2 CPU ranks).

Tiny data sets are written in ``tmp_path``: an image folder of 32x32 PNGs (training and
held-out), an insightface RecordIO set of 48x48 images, and an insightface pair file for face
verification. Each run trains a few steps of a small network: resnet20 at 32 px on the image
folder, a narrow iresnet50 at 112 px on the RecordIO set.
"""

from __future__ import annotations

import io
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hybridfc.data import write_recordio
from launcher import REPO, assert_succeeded, launch, tail

pytestmark = pytest.mark.e2e

TRAIN = REPO / "examples" / "train.py"
NUM_CLASSES = 6
MICRO_BATCH = 4
EVALUATION_INTERVAL = 2
TIMEOUT = 300


def class_images(num_classes: int, per_class: int, size: int, seed: int) -> list[tuple[np.ndarray, int]]:
    """``(uint8 (size, size, 3) image, class)`` pairs sorted by class: a 4x4 colour pattern per class,
    each image a noisy copy of it."""
    rng = np.random.default_rng(seed)
    patterns = np.random.default_rng(0).integers(40, 216, (num_classes, 4, 4, 3))
    samples = []
    for label in range(num_classes):
        for _ in range(per_class):
            cells = np.clip(patterns[label] + rng.integers(-20, 21, (4, 4, 3)), 0, 255).astype(np.uint8)
            samples.append((np.kron(cells, np.ones((size // 4, size // 4, 1), dtype=np.uint8)), label))
    return samples


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def write_image_folder(root: Path, per_class: int, seed: int) -> Path:
    """``root/class_<c>/<i>.png``: NUM_CLASSES folders of ``per_class`` 32x32 images."""
    for i, (pixels, label) in enumerate(class_images(NUM_CLASSES, per_class, 32, seed)):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.png").write_bytes(png(pixels))
    return root


def write_pair_file(path: Path, num_pairs: int = 10) -> Path:
    """An insightface pair file ``(bins, issame_list)``: 40x40 PNGs, even pairs of one class."""
    images = class_images(num_pairs, 2, 40, seed=3)
    bins, issame = [], []
    for i in range(num_pairs):
        same = i % 2 == 0
        bins += [png(images[2 * i][0]), png(images[2 * i + 1 if same else (2 * i + 2) % (2 * num_pairs)][0])]
        issame.append(same)
    path.write_bytes(pickle.dumps((bins, issame), protocol=4))
    return path


def small_config(directory: Path) -> Path:
    """ds_configs/cpu_images.json with a micro-batch and evaluation interval for a few steps."""
    config = json.loads((REPO / "ds_configs" / "cpu_images.json").read_text())
    config["train_micro_batch_size_per_gpu"] = MICRO_BATCH
    config["scheduler"]["params"]["warmup_num_steps"] = 1
    config["hybridfc"]["evaluation"]["interval"] = EVALUATION_INTERVAL
    path = directory / "config.json"
    path.write_text(json.dumps(config))
    return path


def last_line(output: str, fragment: str) -> str:
    """The last line of ``output`` that holds ``fragment`` (the result must be what was logged last)."""
    lines = [line for line in output.splitlines() if fragment in line]
    assert lines, f"no line with {fragment!r}:\n{tail(output)}"
    return lines[-1]


def read_result(path: Path, output: str) -> dict:
    assert path.exists(), f"no result JSON:\n{tail(output)}"
    result = json.loads(path.read_text())
    numbers = [v for v in result.values() if isinstance(v, (int, float))]
    numbers += result.get("verification", {}).values()
    assert all(math.isfinite(v) for v in numbers), result
    return result


def test_resnet20_on_an_image_folder_with_held_out_set_and_verification(tmp_path):
    """Image folder -> classes from the folder (the config's 10 overridden), held-out top-1/top-5
    and verification at the interval and at the end, --max-steps stops inside the second epoch."""
    train = write_image_folder(tmp_path / "train", per_class=4, seed=1)
    test = write_image_folder(tmp_path / "test", per_class=2, seed=2)
    pairs = write_pair_file(tmp_path / "pairs.bin")
    result_json = tmp_path / "result.json"
    run = launch(TRAIN, "--deepspeed_config", small_config(tmp_path), "--data", train, "--test-data", test,
                 "--val", pairs, "--backbone", "resnet20", "--workers", 1, "--epochs", 2, "--max-steps", 4,
                 "--result-json", result_json, timeout=TIMEOUT)
    assert_succeeded(run)
    result = read_result(result_json, run.stdout)
    assert result["num_classes"] == NUM_CLASSES
    assert f"held-out top-1 {result['top1']:.4f}, top-5 {result['top5']:.4f} on {NUM_CLASSES * 2} samples" in \
        last_line(run.stdout, "step 4: held-out")
    assert f"accuracy {result['verification']['pairs']:.4f} " in last_line(run.stdout, f"step 4: verification {pairs}")
    assert result["history"][-1] == {"step": 4, "top1": result["top1"], "top5": result["top5"],
                                     "pairs": result["verification"]["pairs"]}
    assert f"{NUM_CLASSES} classes in {train}, overriding hybridfc.num_classes=10" in run.stdout
    assert "backbone resnet20" in run.stdout and "training augmentation random flip, random shift" in run.stdout
    for step in (2, 4):
        assert f"step {step}: verification {pairs}: accuracy" in run.stdout, tail(run.stdout)
        assert f"step {step}: held-out top-1" in run.stdout, tail(run.stdout)
    assert "step 6:" not in run.stdout


def test_narrow_iresnet50_on_a_recordio_set_at_112_px(tmp_path):
    """RecordIO folder (train.rec + train.idx) of 48x48 images resized to 112: the default backbone
    for 112 px (iresnet50) at width 0.125, verification only, no flips (``--no-flip``)."""
    (tmp_path / "faces").mkdir()
    write_recordio(tmp_path / "faces" / "train", class_images(NUM_CLASSES, 4, 48, seed=4))
    pairs = write_pair_file(tmp_path / "lfw.bin")
    result_json = tmp_path / "result.json"
    run = launch(TRAIN, "--deepspeed_config", small_config(tmp_path), "--data", tmp_path / "faces",
                 "--val", pairs, "--width", 0.125, "--image-size", 112, "--no-flip", "--max-steps", 2,
                 "--result-json", result_json, timeout=TIMEOUT)
    assert_succeeded(run)
    result = read_result(result_json, run.stdout)
    assert result["num_classes"] == NUM_CLASSES
    assert "top1" not in result
    assert f"accuracy {result['verification']['lfw']:.4f} " in last_line(run.stdout, f"step 2: verification {pairs}")
    assert "RecordIODataset" in run.stdout and "resized to 112x112, training augmentation none" in run.stdout
    assert "backbone iresnet50 (width 0.125" in run.stdout
    assert f"step 2: verification {pairs}: accuracy" in run.stdout, tail(run.stdout)
