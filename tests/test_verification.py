"""Pair-file verification: metrics with known answers, Python 2 pair files, and a safe unpickler."""

from __future__ import annotations

import io
import os
import pickle
import re
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hybridfc.eval import PairFileError, evaluate_pair_bin, load_pair_bin, verification_metrics


def pairs_at_cosines(cosines: np.ndarray, seed: int, dim: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Two ``(P, dim)`` arrays whose row i has cosine ``cosines[i]``, at random directions and norms."""
    rng = np.random.default_rng(seed)
    e1, e2 = [], []
    for c in cosines:
        basis, _ = np.linalg.qr(rng.standard_normal((dim, 2)))
        u, v = basis.T
        e1.append(rng.uniform(0.5, 3) * u)
        e2.append(rng.uniform(0.5, 3) * (c * u + np.sqrt(1 - c * c) * v))
    return np.array(e1), np.array(e2)


# ---------------------------------------------------------------- metrics


def test_separable_pairs_are_all_right():
    rng = np.random.default_rng(0)
    issame = np.arange(200) % 2 == 0
    cosines = np.where(issame, rng.uniform(0.8, 1.0, 200), rng.uniform(-1.0, 0.2, 200))
    metrics = verification_metrics(*pairs_at_cosines(cosines, seed=1), issame)
    assert metrics["accuracy"] == 1.0 and metrics["accuracy_std"] == 0.0
    assert metrics["tar_at_far"] == {1e-3: 1.0, 1e-4: 1.0}
    assert 0.2 < metrics["threshold"] < 0.8
    assert metrics["num_pairs"] == 200


def overlap_set() -> tuple[np.ndarray, np.ndarray]:
    """10 folds of 10 pairs. Each fold: 4 positives at 0.892, 4 negatives at -0.498, a positive
    at 0.302, and a negative at 0.502 (folds 0-4, overlapping the positive) or 0.002 (folds 5-9).

    Any threshold t errs on the 5 negatives at 0.502 (t < 0.502) or on the 5 hard positives
    (t >= 0.302); t in [0.002, 0.302) errs on those negatives only, 5 errors over all pairs and
    4 or 5 over any 9 folds, against 8, 9 or more elsewhere. So every fold is judged with a t
    in [0.002, 0.302): folds 0-4 score 9/10, folds 5-9 10/10; accuracy 0.95 ± 0.05.
    """
    cosines, issame = [], []
    for fold in range(10):
        cosines += [0.892] * 4 + [-0.498] * 4 + [0.302, 0.502 if fold < 5 else 0.002]
        issame += [True] * 4 + [False] * 4 + [True, False]
    return np.array(cosines), np.array(issame)


def test_overlapping_pairs_give_the_hand_computed_accuracy():
    cosines, issame = overlap_set()
    metrics = verification_metrics(*pairs_at_cosines(cosines, seed=2), issame, far_targets=(0.1, 0.05, 1e-3))
    assert metrics["accuracy"] == pytest.approx(0.95)
    assert metrics["accuracy_std"] == pytest.approx(0.05)
    assert 0.002 < metrics["threshold"] < 0.302
    # 50 negatives: 5 at 0.502, 5 at 0.002, 40 at -0.498. FAR 0.1 allows 5 false accepts: t = 0.002,
    # every positive above it. FAR 0.05 allows 2 and FAR 1e-3 none: t = 0.502, 40 of 50 positives above.
    assert metrics["tar_at_far"] == pytest.approx({0.1: 1.0, 0.05: 0.8, 1e-3: 0.8})
    assert metrics["threshold_at_far"] == pytest.approx({0.1: 0.002, 0.05: 0.502, 1e-3: 0.502})


def reference_metrics(e1: np.ndarray, e2: np.ndarray, issame: np.ndarray, far: float) -> tuple[float, float, float]:
    """insightface's loops on squared distances (same iff d < t), middle of equally good thresholds;
    TAR at the lowest threshold whose FAR is at most the target, by scanning every negative."""
    n1 = e1 / np.linalg.norm(e1, axis=1, keepdims=True)
    n2 = e2 / np.linalg.norm(e2, axis=1, keepdims=True)
    dist = np.sum((n1 - n2) ** 2, axis=1)
    grid = np.arange(0, 4, 0.01)

    def best(idx):
        acc = np.array([np.mean((dist[idx] < t) == issame[idx]) for t in grid])
        winners = np.flatnonzero(acc == acc.max())
        return grid[winners[len(winners) // 2]]

    folds = np.array_split(np.arange(len(dist)), 10)
    accuracies = [np.mean((dist[f] < best(np.setdiff1d(np.arange(len(dist)), f))) == issame[f]) for f in folds]
    cosine = np.sum(n1 * n2, axis=1)
    negatives, positives = cosine[~issame], cosine[issame]
    valid = [t for t in negatives if np.mean(negatives > t) <= far]
    return float(np.mean(accuracies)), float(1 - best(np.arange(len(dist))) / 2), float(np.mean(positives > min(valid)))


def test_matches_insightface_loops_on_distances():
    rng = np.random.default_rng(3)
    issame = rng.random(300) < 0.5
    cosines = np.clip(np.where(issame, rng.normal(0.5, 0.2, 300), rng.normal(0.1, 0.2, 300)), -0.99, 0.99)
    e1, e2 = pairs_at_cosines(cosines, seed=4)
    metrics = verification_metrics(torch.from_numpy(e1), torch.from_numpy(e2), torch.from_numpy(issame),
                                   far_targets=(0.02,))
    accuracy, threshold, tar = reference_metrics(e1, e2, issame, far=0.02)
    assert 0.6 < accuracy < 0.95
    assert metrics["accuracy"] == pytest.approx(accuracy)
    assert metrics["threshold"] == pytest.approx(threshold)
    assert metrics["tar_at_far"][0.02] == pytest.approx(tar)


def test_flip_embeddings_are_added():
    rng = np.random.default_rng(5)
    e1, e2, f1, f2 = (rng.standard_normal((40, 8)) for _ in range(4))
    issame = np.arange(40) % 3 == 0
    assert (verification_metrics(e1, e2, issame, flipped1=f1, flipped2=f2)
            == verification_metrics(e1 + f1, e2 + f2, issame))


@pytest.mark.parametrize("change, message", [
    ({"embeddings2": np.ones((20, 5))}, "one shape"),
    ({"issame": np.ones(20, dtype=bool)}, "both positive and negative"),
    ({"issame": np.arange(20) % 2}, "bool"),
    ({"n_folds": 1}, "n_folds"),
    ({"far_targets": (0.0,)}, "FAR"),
    ({"flipped1": np.ones((20, 4))}, "both sides"),
    ({"embeddings1": np.full((20, 4), np.nan)}, "non-finite"),
])
def test_bad_metric_inputs_are_rejected(change, message):
    args = {"embeddings1": np.ones((20, 4)), "embeddings2": np.ones((20, 4)), "issame": np.arange(20) % 2 == 0}
    with pytest.raises(ValueError, match=message):
        verification_metrics(**{**args, **change})


# ---------------------------------------------------------------- pair files as Python 2 writes them


def py2_str(data: bytes) -> bytes:
    """A Python 2 ``str`` in protocol 2 (SHORT_BINSTRING / BINSTRING)."""
    return b"U" + bytes([len(data)]) + data if len(data) < 256 else b"T" + struct.pack("<i", len(data)) + data


def py2_array(raw: bytes, dtype: bytes, shape: tuple[int, ...]) -> bytes:
    """A numpy array as numpy 1.x under Python 2 pickles it (``numpy.core.multiarray._reconstruct``)."""
    descr = (b"cnumpy\ndtype\n" + py2_str(dtype) + b"K\x00K\x01\x87R(K\x03" + py2_str(b"|")
             + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    dims = b"(" + b"".join(b"J" + struct.pack("<i", n) for n in shape) + b"t"
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + py2_str(b"b") + b"\x87R"
            + b"(K\x01" + dims + descr + b"\x89" + py2_str(raw) + b"tb")


def py2_pair_file(images: list[bytes], issame: list[bool], numpy_images: bool, numpy_issame: bool) -> bytes:
    """``pickle.dump((bins, issame_list), f, protocol=2)`` under Python 2: images as ``str`` (or as
    ``cv2.imencode``'s (n, 1) uint8 arrays), labels as a list of bools (or a numpy bool array)."""
    bins = [py2_array(b, b"u1", (len(b), 1)) if numpy_images else py2_str(b) for b in images]
    labels = (py2_array(bytes(issame), b"b1", (len(issame),)) if numpy_issame
              else b"](" + b"".join(b"\x88" if s else b"\x89" for s in issame) + b"e")
    return b"\x80\x02](" + b"".join(bins) + b"e" + labels + b"\x86."


def encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def unit_range(pixels: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> ``(3, H, W)`` float32, ``(v / 255 - 0.5) / 0.5`` as insightface."""
    x = pixels.transpose(2, 0, 1).astype(np.float32)
    return torch.from_numpy((x / np.float32(255) - np.float32(0.5)) / np.float32(0.5))


def random_pixels(count: int, seed: int, size: tuple[int, int] = (112, 112)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(count)]
    images[0][0, 0], images[0][0, 1] = 0, 255
    return images


@pytest.mark.parametrize("numpy_images", [False, True], ids=["str-images", "ndarray-images"])
@pytest.mark.parametrize("numpy_issame", [False, True], ids=["bool-list", "bool-ndarray"])
def test_python2_pair_file_loads_the_exact_images(tmp_path, numpy_images, numpy_issame):
    pixels, issame = random_pixels(6, seed=6), [True, False, True]
    path = tmp_path / "lfw.bin"
    path.write_bytes(py2_pair_file([encode(p) for p in pixels], issame, numpy_images, numpy_issame))
    images, labels = load_pair_bin(path)
    expected = torch.stack([unit_range(p) for p in pixels])
    assert images.dtype == torch.float32 and images.shape == (6, 3, 112, 112)
    assert torch.equal(images, expected)
    assert images.min() == -1 and images.max() == 1
    assert labels.dtype == torch.bool and labels.tolist() == issame


def test_other_sizes_are_resized_and_jpeg_decodes(tmp_path):
    colours = [(200, 30, 90), (10, 250, 128)]
    images = [encode(np.full((50, 60, 3), colour, dtype=np.uint8), "JPEG") for colour in colours]
    path = tmp_path / "cfp_fp.bin"
    path.write_bytes(py2_pair_file(images, [False], numpy_images=False, numpy_issame=False))
    loaded, _ = load_pair_bin(path, image_size=(112, 96))
    assert loaded.shape == (2, 3, 112, 96)
    expected = torch.tensor(colours, dtype=torch.float32).view(2, 3, 1, 1) / 127.5 - 1
    assert (loaded - expected).abs().max() <= 3 / 127.5


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pair_files_written_by_python3_load(tmp_path, protocol):
    pixels = random_pixels(4, seed=7, size=(8, 8))
    bins = [np.frombuffer(encode(p), dtype=np.uint8).reshape(-1, 1) for p in pixels[:2]]
    bins += [encode(p) for p in pixels[2:]]
    for issame in ([np.bool_(True), np.bool_(False)], np.array([True, False])):
        path = tmp_path / f"agedb_30_{protocol}.bin"
        path.write_bytes(pickle.dumps((bins, issame), protocol=protocol))
        images, labels = load_pair_bin(path, image_size=(8, 8))
        assert torch.equal(images[3], unit_range(pixels[3]))
        assert labels.tolist() == [True, False]


# ---------------------------------------------------------------- hostile and malformed files


class Payload:
    """Unpickling it calls ``function(*args)``."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def hostile_files(marker: str) -> dict[str, tuple[bytes, str]]:
    """Pickles that create ``marker`` when loaded with plain pickle, and the global each names."""
    image = encode(random_pixels(1, seed=8, size=(4, 4))[0])
    return {
        "os.system": (pickle.dumps(Payload(os.system, f"touch {marker}"), protocol=2),
                      f"{os.system.__module__}.system"),
        "os.system-py2": (b"\x80\x02cos\nsystem\n" + py2_str(f"touch {marker}".encode()) + b"\x85R.", "os.system"),
        "open-inside-bins": (pickle.dumps(([image, Payload(open, marker, "w")], [True]), protocol=4),
                             f"{open.__module__}.open"),
    }


@pytest.mark.parametrize("name", ["os.system", "os.system-py2", "open-inside-bins"])
def test_forbidden_global_is_named_and_never_run(tmp_path, name):
    marker = tmp_path / "marker"
    data, forbidden = hostile_files(str(marker))[name]
    path = tmp_path / "evil.bin"
    path.write_bytes(data)
    with pytest.raises(PairFileError, match=rf"{re.escape(str(path))}: .*global {re.escape(forbidden)}\b"):
        load_pair_bin(path)
    assert not marker.exists()
    with open(path, "rb") as f:
        pickle.load(f, encoding="bytes")
    assert marker.exists(), "the payload is live: plain pickle runs it"


@pytest.mark.parametrize("content, message", [
    (b"\xff\xd8\xff\xe0 a JPEG, not a pickle", "not a readable pickle"),
    (b"\x80\x02](U\x03abc", "not a readable pickle"),
    ({"bins": [], "issame": []}, "2-tuple .* got a dict"),
    (([b"a", b"b"], [True], [0]), "2-tuple .* got a tuple of length 3"),
    ((b"ab", [True]), "bins must be a list .* got a bytes"),
    (([b"a", b"b", b"c"], [True, False]), "3 images for 2 pairs; expected 2 per pair"),
    (([b"a", b"b"], [True, False]), "2 images for 2 pairs"),
    (([b"a", 7], [True]), "image 1 is a int, not encoded image bytes"),
    (([b"a", "b"], [True]), "image 1 is a str, not encoded image bytes"),
    (([b"a", np.zeros(3, np.float32)], [True]), "image 1 is a ndarray"),
    (([b"a", b""], [True]), "image 1 is empty"),
    (([b"a", b"b"], [1]), "item 0 is a int"),
    (([b"a", b"b"], np.array([1])), "list or 1-D numpy array of bools, got a ndarray"),
    (([], []), "no pairs"),
    (([b"not an image", b"nor this"], [True]), "image 0 cannot be decoded"),
])
def test_malformed_files_are_named(tmp_path, content, message):
    path = tmp_path / "broken.bin"
    path.write_bytes(content if isinstance(content, bytes) else pickle.dumps(content, protocol=4))
    with pytest.raises(PairFileError, match=f"{re.escape(str(path))}: .*{message}"):
        load_pair_bin(path)


# ---------------------------------------------------------------- end to end


def identity_pair_file(path, num_pairs: int, seed: int) -> None:
    """Pairs of 56x56 JPEGs: each person an 8x8 colour pattern, each photo of them a noisy copy."""
    rng = np.random.default_rng(seed)
    people = rng.integers(40, 216, (num_pairs, 8, 8, 3))

    def photo(person: int) -> bytes:
        cells = np.clip(people[person] + rng.integers(-12, 13, (8, 8, 3)), 0, 255).astype(np.uint8)
        return encode(np.kron(cells, np.ones((7, 7, 1), dtype=np.uint8)), "JPEG")

    images, issame = [], []
    for i in range(num_pairs):
        same = i % 2 == 0
        images += [photo(i), photo(i if same else (i + 1) % num_pairs)]
        issame.append(same)
    path.write_bytes(py2_pair_file(images, issame, numpy_images=False, numpy_issame=False))


def test_evaluate_pair_bin_embeds_in_batches_with_flips(tmp_path):
    path = tmp_path / "agedb_30.bin"
    identity_pair_file(path, num_pairs=10, seed=9)
    batches = []

    def embed(images: torch.Tensor) -> torch.Tensor:
        batches.append(images)
        pooled = F.adaptive_avg_pool2d(images, 8).flatten(1)
        return pooled - pooled.mean(dim=1, keepdim=True)

    metrics = evaluate_pair_bin(embed, path, batch_size=8, image_size=(56, 56))
    assert metrics["accuracy"] == 1.0 and metrics["tar_at_far"][1e-3] == 1.0
    assert [len(b) for b in batches] == [8, 8, 8, 8, 4, 4]
    assert all(torch.equal(flipped, plain.flip(3)) for plain, flipped in zip(batches[::2], batches[1::2]))
    images, issame = load_pair_bin(path, image_size=(56, 56))
    e, f = embed(images), embed(images.flip(3))
    assert metrics == verification_metrics(e[0::2], e[1::2], issame, flipped1=f[0::2], flipped2=f[1::2])
    without_flip = evaluate_pair_bin(embed, path, flip=False, image_size=(56, 56))
    assert without_flip == verification_metrics(e[0::2], e[1::2], issame)
