"""Feature extraction on every rank: each embeds a contiguous part of a dataset, rank 0 saves it all.

Rank r of the group takes the r-th contiguous slice of the dataset (leftover samples go to the
lowest ranks, as the head's shards do) and embeds it batch by batch. The ranks advance in
lockstep rounds: in each round every rank embeds at most one batch (a rank whose slice is used
up, or empty, embeds nothing but still takes part), the rows of all ranks are gathered, and
rank 0 writes them at their place in a ``.npy`` file. Memory stays at one batch per rank and
one round on rank 0, whatever the dataset size. If any rank fails (loading, embedding, a
feature width that differs, writing), every rank raises instead of waiting on the others.

Example::

    from hybridfc.eval import extract_features, extract_features_from_list

    features = extract_features(lambda x: model(x.cuda()), dataset, "features.npy")
    # rank 0: (len(dataset), d) float32 in dataset order, also saved in features.npy
    # other ranks: None
    features = extract_features_from_list(embed, "images.txt", "features.npy")

:class:`ImageList` reads the images of a list with :func:`read_image` (decoded as the training
data, then resized).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from hybridfc.data.transforms import decode_image, resize_image
from hybridfc.parallel.collectives import exchange_or_raise, gather_padded
from hybridfc.parallel.groups import ProcessGroup, collective_device, group_rank, group_size, shard_range

EmbedFn = Callable[[Tensor], Tensor]
PathLike = str | os.PathLike


def read_image(path: PathLike, image_size: tuple[int, int] = (112, 112)) -> Tensor:
    """An image file as ``(3, H, W)`` float32 RGB in [-1, 1] (:func:`hybridfc.data.decode_image`,
    the training data's decoding), resized to ``image_size = (H, W)`` if it differs."""
    with open(path, "rb") as f:
        data = f.read()
    return resize_image(decode_image(data, os.fspath(path)), image_size)


class ImageList(Dataset):
    """The images named in a list file (one path per line, blank lines skipped), or in a sequence.

    Relative paths in a list file are relative to the file's folder. Items are
    ``(3, H, W)`` float32 tensors from :func:`read_image`.
    """

    def __init__(self, image_list: PathLike | Sequence[PathLike], image_size: tuple[int, int] = (112, 112)) -> None:
        self.paths = _read_list(image_list) if isinstance(image_list, (str, os.PathLike)) else list(image_list)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        return read_image(self.paths[index], self.image_size)


def _read_list(list_file: PathLike) -> list[str]:
    folder = os.path.dirname(os.path.abspath(list_file))
    with open(list_file) as f:
        return [os.path.join(folder, line.strip()) for line in f if line.strip()]


def _collate_inputs(samples: list[Any]) -> Tensor:
    """Batch the samples; of ``(input, label, ...)`` samples only the inputs."""
    batch = default_collate(samples)
    return batch[0] if isinstance(batch, (list, tuple)) else batch


class _NpyWriter:
    """Rank 0's output: a ``(rows, d)`` float32 ``.npy`` filled in place, renamed into place when done."""

    def __init__(self, path: PathLike, rows: int, starts: Sequence[int], batch_size: int) -> None:
        self.path, self.rows, self.starts, self.batch_size = os.fspath(path), rows, starts, batch_size
        self.partial = f"{self.path}.partial"
        self.array: Optional[np.memmap] = None

    def write(self, step: int, gathered: Tensor, sizes: Sequence[int]) -> None:
        """Put the ``(sum(sizes), d)`` rows gathered in round ``step`` (rank order) in place."""
        if self.array is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self.array = np.lib.format.open_memmap(self.partial, mode="w+", dtype=np.float32,
                                                   shape=(self.rows, gathered.shape[1]))
        rows = gathered.cpu().numpy()
        offset = 0
        for start, size in zip(self.starts, sizes):
            first = start + step * self.batch_size
            self.array[first : first + size] = rows[offset : offset + size]
            offset += size

    def finish(self) -> None:
        """Flush the rows and move the complete file to ``path``."""
        self.array.flush()
        self.array = None
        os.replace(self.partial, self.path)


def _embed_next(embed_fn: EmbedFn, batches: Iterator[Tensor], expected: int) -> Optional[Tensor]:
    """This rank's next ``(expected, d)`` features, or None when it has nothing left."""
    if expected == 0:
        return None
    batch = next(batches)
    features = embed_fn(batch)
    if features.ndim != 2 or features.shape[0] != expected:
        raise ValueError(f"hybridfc: embed_fn must map a batch of {expected} samples to ({expected}, d) "
                         f"features, got shape {tuple(features.shape)}")
    return features.detach()


def _agree(features: Optional[Tensor], error: Optional[BaseException], width: Optional[int],
           group: ProcessGroup) -> tuple[list[int], int]:
    """Exchange ``(rows, d)`` with every rank; raise on all ranks if any failed or widths differ.

    Returns the row count of each rank and the feature width d, the same on every rank.
    """
    rows, dim = (0, 0) if features is None else features.shape
    table = exchange_or_raise((rows, dim), error, "feature extraction", group)
    widths = {r: d for r, (n, d) in enumerate(table) if n > 0}
    expected = table[0][1] if width is None else width
    if any(d != expected for d in widths.values()):
        raise ValueError(f"hybridfc: embed_fn returned features of different widths (rank: d) {widths}, "
                         f"expected d={expected} everywhere")
    return [n for n, _ in table], expected


@torch.no_grad()
def extract_features(embed_fn: EmbedFn, dataset: Dataset, output_path: PathLike, batch_size: int = 256,
                     group: ProcessGroup = None, num_workers: int = 0) -> Optional[np.ndarray]:
    """Embed every sample of ``dataset`` once over the ranks of ``group``; rank 0 saves the features.

    ``embed_fn(batch) -> (n, d)`` gets batches of this rank's samples (default collate; of
    ``(input, label, ...)`` samples only the inputs) as loaded, on the CPU, under
    ``torch.no_grad()``; it moves them to its device and returns features on any device, any
    float dtype. Every rank of ``group`` (default: the world) must call it with the same
    dataset, batch size and path; any of them may get no sample (``len(dataset)`` smaller than
    the group). Rank 0 writes ``output_path`` (``.npy`` format, ``(len(dataset), d)`` float32,
    row i the features of sample i) and returns it as a read-only memory map; the other ranks
    return None once it is written. Without ``torch.distributed`` it runs as one rank.
    """
    if len(dataset) == 0:
        raise ValueError("hybridfc: extract_features got an empty dataset")
    world_size, rank = group_size(group), group_rank(group)
    shards = [shard_range(len(dataset), world_size, r) for r in range(world_size)]
    start, count = shards[rank]
    loader = DataLoader(Subset(dataset, range(start, start + count)), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_collate_inputs)
    writer = _NpyWriter(output_path, len(dataset), [s for s, _ in shards], batch_size) if rank == 0 else None
    rounds = math.ceil(shards[0][1] / batch_size)
    _run_rounds(embed_fn, iter(loader), count, rounds, writer, batch_size, group)
    return np.load(output_path, mmap_mode="r") if writer is not None else None


def _run_rounds(embed_fn: EmbedFn, batches: Iterator[Tensor], count: int, rounds: int,
                writer: Optional[_NpyWriter], batch_size: int, group: ProcessGroup) -> None:
    """``rounds`` lockstep rounds of one batch per rank (``count`` samples here), then one that
    only confirms that rank 0 wrote the file."""
    device = collective_device(group)
    pending: Optional[tuple[int, Tensor, list[int]]] = None
    width: Optional[int] = None
    for step in range(rounds + 1):
        features, error = None, None
        try:
            if writer is not None and pending is not None:
                writer.write(*pending)
            if step < rounds:
                features = _embed_next(embed_fn, batches, min(batch_size, max(count - step * batch_size, 0)))
            elif writer is not None:
                writer.finish()
        except Exception as exc:
            error = exc
        sizes, width = _agree(features, error, width, group)
        if step < rounds:
            local = features if features is not None else torch.zeros(0, width)
            pending = (step, gather_padded(local.to(device, torch.float32), sizes, group), sizes)


def extract_features_from_list(embed_fn: EmbedFn, image_list: PathLike | Sequence[PathLike], output_path: PathLike,
                               batch_size: int = 256, group: ProcessGroup = None, num_workers: int = 0,
                               image_size: tuple[int, int] = (112, 112)) -> Optional[np.ndarray]:
    """:func:`extract_features` over the images of ``image_list`` (see :class:`ImageList`).

    ``embed_fn`` gets ``(n, 3, H, W)`` float32 batches in [-1, 1], ``(H, W) = image_size``.
    """
    return extract_features(embed_fn, ImageList(image_list, image_size), output_path, batch_size, group, num_workers)
