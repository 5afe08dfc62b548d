"""Face verification on insightface's pair files (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``, ...).

A pair file is a pickle of ``(bins, issame_list)``: ``bins`` the 2·P encoded images (JPEG;
image 2i and image 2i+1 form pair i), ``issame_list`` the P labels (True: same person). The
files were written by Python 2, so images come back as ``bytes``; some writers stored
``cv2.imencode`` output (uint8 numpy arrays) instead, and some a numpy bool array of labels.
A pickle can run code when loaded, so the file is read with an unpickler that resolves only
the numpy globals such files hold (:data:`ALLOWED_GLOBALS`) and refuses any other.

Metrics follow insightface's protocol, on the cosine similarity s of the two embeddings
(s = 1 - d/2 for the squared distance d of the L2-normalised embeddings, which insightface
thresholds): 10-fold accuracy, where each fold is classified with the threshold best on the
other nine, over insightface's grid of distances [0, 4) in steps of 0.01; and TAR@FAR on all
pairs (see :func:`verification_metrics`).

Example::

    from hybridfc.eval import evaluate_pair_bin

    model.eval()
    metrics = evaluate_pair_bin(lambda x: model(x.cuda()), "faces_emore/lfw.bin")
    # {"accuracy": 0.9975, "accuracy_std": 0.0026, "threshold": 0.22,
    #  "tar_at_far": {0.001: 0.996, 0.0001: 0.99}, "threshold_at_far": {...}, "num_pairs": 6000}
"""

from __future__ import annotations

import codecs
import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from hybridfc.data.transforms import decode_image, resize_image

try:
    from numpy._core import multiarray as _multiarray, numeric as _numeric
except ImportError:
    from numpy.core import multiarray as _multiarray, numeric as _numeric

Embeddings = Tensor | np.ndarray

_NUMPY_CORES = ("numpy.core", "numpy._core")

ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{(f"{core}.multiarray", "_reconstruct"): _multiarray._reconstruct for core in _NUMPY_CORES},
    **{(f"{core}.multiarray", "scalar"): _multiarray.scalar for core in _NUMPY_CORES},
    **{(f"{core}.numeric", "_frombuffer"): _numeric._frombuffer for core in _NUMPY_CORES},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}
"""The only globals a pair file may name, and what they resolve to.

``_reconstruct``, ``ndarray`` and ``dtype`` rebuild a numpy array (pickle protocols 0–4; the
module is ``numpy.core`` before numpy 2, ``numpy._core`` since); ``_frombuffer`` rebuilds one
under protocol 5; ``scalar`` rebuilds a numpy scalar (``numpy.bool_`` labels in a list);
``_codecs.encode`` rebuilds ``bytes`` written by Python 3 with protocol 0–2. Python 2's own
``str`` and ``bool`` need no global.
"""

_DISTANCE_GRID = np.arange(0, 4, 0.01)
_COSINE_GRID = 1.0 - _DISTANCE_GRID / 2


class PairFileError(ValueError):
    """A pair file that is not a ``(bins, issame_list)`` pickle, or that names a forbidden global."""


class _PairUnpickler(pickle.Unpickler):
    """Reads Python 2 strings as bytes; resolves :data:`ALLOWED_GLOBALS` only."""

    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise PairFileError(f"{self.path}: the pickle asks for the global {module}.{name}, which a pair "
                                "file never needs; refusing to load it (unpickling it could run code)")
        return ALLOWED_GLOBALS[module, name]


def _unpickle(path: str) -> Any:
    with open(path, "rb") as f:
        try:
            return _PairUnpickler(f, path).load()
        except PairFileError:
            raise
        except Exception as exc:
            raise PairFileError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from exc


def _describe(value: Any) -> str:
    if isinstance(value, (list, tuple, np.ndarray)):
        return f"a {type(value).__name__} of length {len(value)}"
    return f"a {type(value).__name__}"


def _issame_array(issame: Any, path: str) -> np.ndarray:
    """The labels as a ``(P,)`` bool array."""
    if isinstance(issame, np.ndarray) and issame.dtype == np.bool_ and issame.ndim == 1:
        return issame
    if isinstance(issame, (list, tuple)):
        bad = [i for i, value in enumerate(issame) if not isinstance(value, (bool, np.bool_))]
        if not bad:
            return np.array(issame, dtype=bool)
        raise PairFileError(f"{path}: issame_list must hold bools, but item {bad[0]} is "
                            f"{_describe(issame[bad[0]])}")
    raise PairFileError(f"{path}: issame_list must be a list or 1-D numpy array of bools, got {_describe(issame)}")


def _encoded_image(value: Any, index: int, path: str) -> bytes:
    """Image ``index`` as encoded bytes (Python 2 ``str``, or ``cv2.imencode``'s uint8 array)."""
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:
        value = value.tobytes()
    if not isinstance(value, bytes):
        raise PairFileError(f"{path}: image {index} is {_describe(value)}, not encoded image bytes")
    if not value:
        raise PairFileError(f"{path}: image {index} is empty")
    return value


def _parse(content: Any, path: str) -> tuple[list[bytes], np.ndarray]:
    """The encoded images (2P) and labels (P,) of a loaded pair file, checked."""
    if not (isinstance(content, tuple) and len(content) == 2):
        raise PairFileError(f"{path}: expected a pickled 2-tuple (bins, issame_list), got {_describe(content)}")
    bins, issame = content
    if not isinstance(bins, (list, tuple)):
        raise PairFileError(f"{path}: bins must be a list of encoded images, got {_describe(bins)}")
    labels = _issame_array(issame, path)
    if labels.size == 0:
        raise PairFileError(f"{path}: the file holds no pairs")
    if len(bins) != 2 * labels.size:
        raise PairFileError(f"{path}: {len(bins)} images for {labels.size} pairs; expected 2 per pair "
                            f"({2 * labels.size})")
    return [_encoded_image(value, i, path) for i, value in enumerate(bins)], labels


def _decode(data: bytes, index: int, path: str, image_size: tuple[int, int]) -> Tensor:
    try:
        image = decode_image(data, f"{path} (image {index})")
    except ValueError as exc:
        raise PairFileError(f"{path}: image {index} cannot be decoded ({exc})") from exc
    return resize_image(image, image_size)


def load_pair_bin(path: str | os.PathLike, image_size: tuple[int, int] = (112, 112)) -> tuple[Tensor, Tensor]:
    """Read a pair file: ``images (2P, 3, H, W)`` float32 RGB in [-1, 1], ``issame (P,)`` bool.

    Images 2i and 2i+1 form pair i. They are decoded as the training data
    (:func:`hybridfc.data.decode_image`: ``(x / 255 - 0.5) / 0.5``); ``image_size = (H, W)``,
    others are resized (:func:`~hybridfc.data.transforms.resize_image`).
    Raises :class:`PairFileError` naming the file and the problem for a malformed file or a
    pickle that names a global outside :data:`ALLOWED_GLOBALS` (without running it).
    """
    path = os.fspath(path)
    encoded, issame = _parse(_unpickle(path), path)
    images = np.empty((len(encoded), 3, *image_size), dtype=np.float32)
    for i, data in enumerate(encoded):
        images[i] = _decode(data, i, path, image_size).numpy()
    return torch.from_numpy(images), torch.from_numpy(issame)


def _as_float64(x: Embeddings) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _cosine(embeddings1: Embeddings, embeddings2: Embeddings, flipped1: Optional[Embeddings],
            flipped2: Optional[Embeddings]) -> np.ndarray:
    """``(P,)`` cosine similarity of each pair, of ``e + e_flipped`` when flipped embeddings are given."""
    if (flipped1 is None) != (flipped2 is None):
        raise ValueError("hybridfc: pass the flipped embeddings of both sides of the pairs, or neither")
    e1, e2 = _as_float64(embeddings1), _as_float64(embeddings2)
    if flipped1 is not None:
        e1, e2 = e1 + _as_float64(flipped1), e2 + _as_float64(flipped2)
    if e1.ndim != 2 or e1.shape != e2.shape:
        raise ValueError(f"hybridfc: embeddings must be two (P, d) arrays of one shape, got {e1.shape} and {e2.shape}")
    if not (np.isfinite(e1).all() and np.isfinite(e2).all()):
        raise ValueError("hybridfc: embeddings hold non-finite values")
    return np.sum(_normalize(e1) * _normalize(e2), axis=1)


def _grid_accuracy(scores: np.ndarray, issame: np.ndarray) -> np.ndarray:
    """Accuracy of "same iff score > t" for each t of the cosine grid, ``(len(grid),)``."""
    positives, negatives = np.sort(scores[issame]), np.sort(scores[~issame])
    accepted = positives.size - np.searchsorted(positives, _COSINE_GRID, side="right")
    rejected = np.searchsorted(negatives, _COSINE_GRID, side="right")
    return (accepted + rejected) / scores.size


def _best_threshold(scores: np.ndarray, issame: np.ndarray) -> float:
    """The grid threshold of highest accuracy; of several, the middle one (by grid order)."""
    accuracy = _grid_accuracy(scores, issame)
    best = np.flatnonzero(accuracy == accuracy.max())
    return float(_COSINE_GRID[best[best.size // 2]])


def _fold_accuracies(scores: np.ndarray, issame: np.ndarray, n_folds: int) -> np.ndarray:
    """Accuracy on each of ``n_folds`` consecutive folds with the threshold best on the others."""
    accuracies = []
    for fold in np.array_split(np.arange(scores.size), n_folds):
        train = np.ones(scores.size, dtype=bool)
        train[fold] = False
        threshold = _best_threshold(scores[train], issame[train])
        accuracies.append(np.mean((scores[fold] > threshold) == issame[fold]))
    return np.array(accuracies)


def _threshold_at_far(negatives: np.ndarray, far: float) -> float:
    """The lowest threshold t with at most ``floor(far · N)`` of the N negatives above it."""
    allowed = int(np.floor(far * negatives.size + 1e-9))
    return float(np.sort(negatives)[::-1][allowed])


def verification_metrics(embeddings1: Embeddings, embeddings2: Embeddings, issame: Tensor | np.ndarray | Sequence[bool],
                         n_folds: int = 10, far_targets: Sequence[float] = (1e-3, 1e-4),
                         flipped1: Optional[Embeddings] = None,
                         flipped2: Optional[Embeddings] = None) -> dict[str, Any]:
    """Verification metrics of P pairs ``(embeddings1[i], embeddings2[i])``, each ``(P, d)``.

    ``issame (P,)`` bool: True for a pair of one person. Flip test: pass the embeddings of the
    horizontally flipped images as ``flipped1``/``flipped2``; each image is then represented
    by ``e + e_flipped``. Scores are cosine similarities s; a pair is called "same" iff s > t.

    Returns a dict:

    * ``accuracy``, ``accuracy_std``: mean and standard deviation (population) over
      ``n_folds`` consecutive folds of pairs (as insightface's unshuffled KFold) of the
      accuracy on the fold at the threshold that maximises accuracy on the other folds.
      Thresholds are insightface's grid, distances 0, 0.01, ..., 3.99, i.e. cosines
      1, 0.995, ..., -0.995; of equally good ones, the middle one is taken (insightface takes
      the first, i.e. the highest cosine, which sits against the positives).
    * ``threshold``: the cosine threshold chosen the same way on all pairs.
    * ``tar_at_far``, ``threshold_at_far``: ``{far: value}`` for each target, on all pairs.
      The empirical false-accept rate is a step function, so there is no interpolation: with
      N negative pairs, t is the lowest threshold with at most ``floor(far · N)`` negatives
      above it (the ``floor(far · N) + 1``-th highest negative score), so the achieved FAR
      never exceeds the target, and TAR is the fraction of positive pairs above t. Where
      ``far · N < 1`` this is the TAR at zero false accepts.
    * ``num_pairs``: P.
    """
    scores = _cosine(embeddings1, embeddings2, flipped1, flipped2)
    labels = np.asarray(issame.cpu() if isinstance(issame, Tensor) else issame)
    if labels.dtype != np.bool_ or labels.shape != scores.shape:
        raise ValueError(f"hybridfc: issame must be {scores.shape} bool, got {labels.shape} {labels.dtype}")
    if labels.all() or not labels.any():
        raise ValueError("hybridfc: verification needs both positive and negative pairs")
    if not 2 <= n_folds <= scores.size:
        raise ValueError(f"hybridfc: n_folds must be in [2, {scores.size}] (the number of pairs), got {n_folds}")
    if not all(0 < far < 1 for far in far_targets):
        raise ValueError(f"hybridfc: FAR targets must be in (0, 1), got {tuple(far_targets)}")
    accuracies = _fold_accuracies(scores, labels, n_folds)
    at_far = {far: _threshold_at_far(scores[~labels], far) for far in far_targets}
    return {
        "accuracy": float(accuracies.mean()),
        "accuracy_std": float(accuracies.std()),
        "threshold": _best_threshold(scores, labels),
        "tar_at_far": {far: float(np.mean(scores[labels] > t)) for far, t in at_far.items()},
        "threshold_at_far": at_far,
        "num_pairs": int(scores.size),
    }


def _embed(embed_fn: Callable[[Tensor], Tensor], batch: Tensor) -> Tensor:
    features = embed_fn(batch)
    if features.ndim != 2 or features.shape[0] != batch.shape[0]:
        raise ValueError(f"hybridfc: embed_fn must map a batch of {batch.shape[0]} images to "
                         f"({batch.shape[0]}, d) embeddings, got shape {tuple(features.shape)}")
    return features.detach().to("cpu", torch.float64)


def _embed_all(embed_fn: Callable[[Tensor], Tensor], images: Tensor, batch_size: int,
               flip: bool) -> tuple[Tensor, Optional[Tensor]]:
    """Embeddings ``(n, d)`` of ``images (n, 3, H, W)``, and of their mirror images if ``flip``."""
    plain, flipped = [], []
    for batch in images.split(batch_size):
        plain.append(_embed(embed_fn, batch))
        if flip:
            flipped.append(_embed(embed_fn, batch.flip(3)))
    return torch.cat(plain), torch.cat(flipped) if flip else None


@torch.no_grad()
def evaluate_pair_bin(embed_fn: Callable[[Tensor], Tensor], path: str | os.PathLike, batch_size: int = 256,
                      flip: bool = True, image_size: tuple[int, int] = (112, 112), n_folds: int = 10,
                      far_targets: Sequence[float] = (1e-3, 1e-4)) -> dict[str, Any]:
    """Load a pair file, embed its images, and return :func:`verification_metrics`.

    ``embed_fn(images (n, 3, H, W) float32 in [-1, 1], on the CPU) -> (n, d)`` is called under
    ``torch.no_grad()`` on batches of at most ``batch_size`` (put the model in eval mode
    first). With ``flip``, the horizontally flipped images are embedded too and each image is
    represented by the sum of both embeddings (insightface's "Accuracy-Flip"). One process.
    """
    if batch_size < 1:
        raise ValueError(f"hybridfc: batch_size must be >= 1, got {batch_size}")
    images, issame = load_pair_bin(path, image_size)
    embeddings, flipped = _embed_all(embed_fn, images, batch_size, flip)
    return verification_metrics(embeddings[0::2], embeddings[1::2], issame, n_folds, far_targets,
                                None if flipped is None else flipped[0::2],
                                None if flipped is None else flipped[1::2])
