"""For serving: a checkpoint's class rows as one ``(C, d)`` matrix (``hybridfc export CKPT --out
centres.npy``: :func:`export_centres`), and such a matrix loaded into a head of any world size
(:func:`load_centres`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hybridfc.checkpoint.format import HEAD, CheckpointError, read_file, shard_files
from hybridfc.head.class_parallel_fc import ClassParallelFC

EXPORT_DTYPES = {"fp32": np.float32, "fp16": np.float16}


def tag_directory(checkpoint: "str | os.PathLike") -> Path:
    """A checkpoint's tag directory: ``checkpoint`` itself when it holds head shards, else the tag
    its ``latest`` file names."""
    path = Path(checkpoint)
    if any(path.glob("hybridfc_head_rank*_of_*.pt")):
        return path
    latest = path / "latest"
    if latest.is_file():
        return path / latest.read_text().strip()
    raise CheckpointError(f"hybridfc: {path} is neither a checkpoint tag with head shards nor a checkpoint "
                          "directory with a 'latest' file")


def export_centres(checkpoint: "str | os.PathLike", out: "str | os.PathLike", dtype: str = "fp32",
                   normalize: bool = False) -> Path:
    """Write the head's class rows of a checkpoint as one ``(C, d)`` ``.npy`` matrix in class order.

    ``checkpoint``: a tag directory or a save directory with ``latest``. ``dtype``: ``fp32`` or
    ``fp16``; ``normalize``: L2-normalise each row (as the angular margins score them). One shard is
    read at a time, and the file appears under ``out`` only once complete. Returns its path.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"hybridfc: export dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    files = shard_files(tag_directory(checkpoint))
    out, rows = Path(out), None
    partial = out.with_name(out.name + ".partial")
    for path in files:
        state = read_file(path, HEAD, mmap=True)
        shard, weight = state["shard"], state["weight"].float()
        if rows is None:
            rows = np.lib.format.open_memmap(partial, mode="w+", dtype=EXPORT_DTYPES[dtype],
                                             shape=(shard["num_classes"], shard["embedding_size"]))
        if normalize:
            weight = F.normalize(weight, dim=1)
        rows[shard["class_start"]: shard["class_start"] + shard["num_local"]] = weight.numpy()
    rows.flush()
    del rows
    os.replace(partial, out)
    return out


@torch.no_grad()
def load_centres(head: ClassParallelFC, path: "str | os.PathLike") -> None:
    """Set this rank's rows of ``head`` from a ``(C, d)`` matrix in class order (``.npy``, as
    :func:`export_centres` writes), whatever the world size it was trained with."""
    centres = np.load(path, mmap_mode="r")
    if centres.shape != (head.num_classes, head.embedding_size):
        raise CheckpointError(f"hybridfc: {path} holds a {tuple(centres.shape)} matrix; this head needs "
                              f"({head.num_classes}, {head.embedding_size}) (num_classes, embedding_size)")
    rows = torch.from_numpy(np.array(centres[head.class_start: head.class_start + head.num_local]))  # a writable copy
    head.weight.copy_(rows.to(device=head.weight.device, dtype=head.weight.dtype))
