"""Feature extraction over ranks: the saved array is the single-process embedding, in dataset order."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from distributed import run_distributed
from hybridfc.eval import ImageList, extract_features, extract_features_from_list

SIZES, WIDTH, DIM, BATCH = (7, 2, 12), 5, 3, 2
IMAGES, IMAGE_SIZE = 5, (6, 4)


def inputs(size: int) -> torch.Tensor:
    return torch.randn(size, WIDTH, generator=torch.Generator().manual_seed(size), dtype=torch.float64)


def linear_map(in_features: int, out_features: int, seed: int = 0):
    """A fixed random linear embed_fn ``(n, ...) -> (n, out_features)``."""
    weight = torch.randn(in_features, out_features, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return lambda batch: batch.flatten(1).double() @ weight


def dataset(size: int):
    """Size 7 yields ``(x, label)`` samples, the others bare tensors."""
    x = inputs(size)
    return TensorDataset(x, torch.arange(size)) if size == 7 else list(x)


def unit_range(pixels: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> ``(3, H, W)`` float32, ``(v / 255 - 0.5) / 0.5`` as the training data."""
    x = pixels.transpose(2, 0, 1).astype(np.float32)
    return torch.from_numpy((x / np.float32(255) - np.float32(0.5)) / np.float32(0.5))


def image_files(folder: str) -> tuple[str, np.ndarray]:
    """PNG images in ``folder``, a list file naming them (absolute and relative paths), their pixels."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (IMAGES, *IMAGE_SIZE, 3), dtype=np.uint8)
    lines = []
    for i, p in enumerate(pixels):
        name = f"face{i}.png"
        Image.fromarray(p).save(os.path.join(folder, name))
        lines += [name if i % 2 else os.path.join(folder, name), ""]
    list_file = os.path.join(folder, "images.txt")
    with open(list_file, "w") as f:
        f.write("\n".join(lines))
    return list_file, pixels


def failures(rank: int, world_size: int, folder: str) -> dict[str, str]:
    """What each rank raises when the last rank's embed_fn fails, and when widths differ."""
    def fail_last(batch):
        if rank == world_size - 1:
            raise ZeroDivisionError("embedding failed here")
        return batch

    def rank_width(batch):
        return batch[:, : 2 + min(rank, 1)]

    out = {}
    for name, embed in (("fails", fail_last), ("widths", rank_width)):
        try:
            extract_features(embed, list(inputs(12)), os.path.join(folder, f"{name}.npy"), batch_size=BATCH)
            out[name] = "no error"
        except Exception as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


def worker(rank: int, world_size: int, folder: str, list_file: str) -> dict:
    out = {}
    for size in SIZES:
        path = os.path.join(folder, f"world{world_size}_size{size}.npy")
        features = extract_features(linear_map(WIDTH, DIM), dataset(size), path, batch_size=BATCH)
        out[size] = None if features is None else np.array(features)
    images = extract_features_from_list(linear_map(3 * 24, DIM), list_file, os.path.join(folder, "images.npy"),
                                        batch_size=BATCH, image_size=IMAGE_SIZE)
    out["images"] = None if images is None else np.array(images)
    out["failures"] = failures(rank, world_size, folder)
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_sample_once_in_order(tmp_path, world_size):
    list_file, pixels = image_files(str(tmp_path))
    results = run_distributed(worker, world_size, args=(str(tmp_path), list_file))
    for size in SIZES:
        expected = linear_map(WIDTH, DIM)(inputs(size)).float().numpy()
        saved = np.load(tmp_path / f"world{world_size}_size{size}.npy")
        assert saved.dtype == np.float32 and saved.shape == (size, DIM)
        np.testing.assert_allclose(saved, expected, rtol=1e-6)
        np.testing.assert_array_equal(results[0][size], saved)
        assert all(result[size] is None for result in results[1:])
    faces = torch.stack([unit_range(p) for p in pixels])
    np.testing.assert_allclose(results[0]["images"], linear_map(3 * 24, DIM)(faces).float().numpy(), rtol=1e-6)
    last = world_size - 1
    for rank, result in enumerate(results):
        expected = "ZeroDivisionError: embedding failed here" if rank == last else f"failed on rank(s) [{last}]"
        assert expected in result["failures"]["fails"]
        assert ("different widths" in result["failures"]["widths"]) == (world_size > 1)


def test_runs_as_one_process_without_torch_distributed(tmp_path):
    features = extract_features(linear_map(WIDTH, DIM), dataset(7), tmp_path / "out" / "features.npy", batch_size=3)
    np.testing.assert_allclose(features, linear_map(WIDTH, DIM)(inputs(7)).float().numpy(), rtol=1e-6)
    assert np.array_equal(np.load(tmp_path / "out" / "features.npy"), features)
    assert not (tmp_path / "out" / "features.npy.partial").exists()


def test_image_list_reads_paths_relative_to_the_list(tmp_path):
    list_file, pixels = image_files(str(tmp_path))
    images = ImageList(list_file, image_size=(12, 8))
    assert len(images) == IMAGES and images[1].shape == (3, 12, 8)
    assert torch.equal(ImageList(list_file, IMAGE_SIZE)[3], unit_range(pixels[3]))


def test_empty_dataset_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="empty dataset"):
        extract_features(linear_map(WIDTH, DIM), [], tmp_path / "none.npy")
