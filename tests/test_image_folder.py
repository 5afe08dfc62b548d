"""ImageFolderDataset, decode_image and the transforms, alone and under DistributedLoader."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from hybridfc.data import (
    Compose,
    DistributedLoader,
    ImageFolderDataset,
    RandomHorizontalFlip,
    decode_image,
)


def _normalized(array: np.ndarray) -> torch.Tensor:
    """What the reader must return for a uint8 (H, W, 3) image: (3, H, W) in [-1, 1]."""
    return (torch.from_numpy(array).permute(2, 0, 1).float() / 255.0 - 0.5) / 0.5


def _encode_png(array: np.ndarray, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _folder(root, layout: dict[str, list[str]], seed: int = 0) -> dict[str, np.ndarray]:
    """Writes a random lossless image at each root/<class>/<name>; returns path -> pixels."""
    rng = np.random.default_rng(seed)
    pixels = {}
    for name, files in layout.items():
        for file in files:
            path = root / name / file
            path.parent.mkdir(parents=True, exist_ok=True)
            array = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
            kind = "BMP" if file.endswith(".bmp") else "PNG"
            Image.fromarray(array, "RGB").save(path, format=kind)
            pixels[str(path)] = array
    return pixels


def test_round_trip(tmp_path):
    layout = {"b_person": ["2.png", "1.PNG"], "a_person": ["x.png", "deep/y.bmp"], "c": ["z.png"]}
    pixels = _folder(tmp_path, layout)
    (tmp_path / "c" / "notes.txt").write_text("not an image")
    (tmp_path / "README").write_text("a file at the root is no class")
    dataset = ImageFolderDataset(tmp_path)
    assert dataset.classes == ["a_person", "b_person", "c"]
    assert dataset.class_to_idx == {"a_person": 0, "b_person": 1, "c": 2}
    assert dataset.num_classes == 3 and len(dataset) == 5
    names = [path.removeprefix(str(tmp_path) + "/") for path, _ in dataset.samples]
    assert names == [
        "a_person/deep/y.bmp", "a_person/x.png", "b_person/1.PNG", "b_person/2.png", "c/z.png"
    ]
    for i, (path, label) in enumerate(dataset.samples):
        x, y = dataset[i]
        assert x.dtype == torch.float32 and x.shape == (3, 4, 6)
        assert torch.equal(x, _normalized(pixels[path]))
        assert y.dtype == torch.int64 and int(y) == label


def test_extensions_and_transform(tmp_path):
    _folder(tmp_path, {"a": ["1.png", "2.bmp"], "b": ["3.bmp"]})
    dataset = ImageFolderDataset(tmp_path, transform=RandomHorizontalFlip(p=1.0), extensions=".bmp")
    assert len(dataset) == 2 and dataset.num_classes == 2
    plain = ImageFolderDataset(tmp_path, extensions=[".BMP"])
    assert torch.equal(dataset[0][0], plain[0][0].flip(-1))


def test_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "loose.png").write_bytes(b"")
    with pytest.raises(ValueError, match=f"{tmp_path} holds no class folder"):
        ImageFolderDataset(tmp_path)
    _folder(tmp_path, {"a": ["1.png"]})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*empty holds no image"):
        ImageFolderDataset(tmp_path)


def test_unreadable_image(tmp_path):
    _folder(tmp_path, {"a": ["1.png"]})
    (tmp_path / "a" / "2.png").write_bytes(b"\x89PNG broken")
    dataset = ImageFolderDataset(tmp_path)
    dataset[0]
    with pytest.raises(ValueError, match=r"cannot decode the image of .*a/2\.png"):
        dataset[1]
    (tmp_path / "a" / "2.png").unlink()
    with pytest.raises(OSError, match=r"cannot read the image .*a/2\.png"):
        dataset[1]


def test_truncated_image(tmp_path):
    _folder(tmp_path, {"a": ["1.png"]})
    path = tmp_path / "a" / "1.png"
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(ValueError, match=r"cannot decode the image of .*1\.png"):
        ImageFolderDataset(tmp_path)[0]


def test_decode_image_normalisation():
    array = np.array([[[0, 128, 255]]], dtype=np.uint8)
    encoded = _encode_png(array)
    x = decode_image(encoded, "test")
    assert x.shape == (3, 1, 1)
    assert x.flatten().tolist() == pytest.approx([-1.0, 128 / 127.5 - 1.0, 1.0], abs=1e-6)
    gray = decode_image(_encode_png(np.full((2, 3), 77, dtype=np.uint8), mode="L"), "gray")
    assert gray.shape == (3, 2, 3) and torch.all(gray == gray[0, 0, 0])


def test_flip_and_compose():
    x = torch.arange(24, dtype=torch.float32).reshape(3, 2, 4)
    assert torch.equal(RandomHorizontalFlip(p=1.0)(x), x.flip(-1))
    assert torch.equal(RandomHorizontalFlip(p=0.0)(x), x)
    assert torch.equal(Compose([RandomHorizontalFlip(1.0), lambda t: t + 1])(x), x.flip(-1) + 1)
    assert torch.equal(Compose([])(x), x)
    flip = RandomHorizontalFlip()
    torch.manual_seed(3)
    first = [bool(torch.equal(flip(x), x)) for _ in range(64)]
    torch.manual_seed(3)
    assert [bool(torch.equal(flip(x), x)) for _ in range(64)] == first
    assert 10 < sum(first) < 54
    for p in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="p must be"):
            RandomHorizontalFlip(p)


def test_loader_with_workers_flip_and_reshuffle(tmp_path):
    layout = {f"id{c}": [f"{k}.png" for k in range(c % 3 + 1)] for c in range(6)}
    pixels = _folder(tmp_path, layout, seed=1)
    dataset = ImageFolderDataset(tmp_path, transform=Compose([RandomHorizontalFlip()]))
    expected = [_normalized(pixels[path]) for path, _ in dataset.samples]
    labels = [label for _, label in dataset.samples]
    loaders = [
        DistributedLoader(dataset, 2, rank=r, world_size=2, num_workers=2, seed=1)
        for r in range(2)
    ]
    torch.manual_seed(0)
    orders, flips = [], 0
    for _ in range(2):
        order = []
        for loader in loaders:
            for x, y in loader:
                assert x.shape == (len(y), 3, 4, 6) and y.dtype == torch.int64
                for image, label in zip(x, y):
                    matches = [i for i, e in enumerate(expected) if torch.equal(image, e)]
                    mirrored = [i for i, e in enumerate(expected) if torch.equal(image, e.flip(-1))]
                    (index,) = matches or mirrored
                    assert int(label) == labels[index]
                    order.append(index)
                    flips += not matches
        assert sorted(order) == list(range(len(dataset)))
        orders.append(order)
    assert orders[0] != orders[1]
    assert 0 < flips < 2 * len(dataset)
