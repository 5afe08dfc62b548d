"""Save and restore the head's shards and optimizer state beside a DeepSpeed checkpoint.

Layout: DeepSpeed writes ``<save_dir>/<tag>/…`` and ``<save_dir>/latest``; each rank of the
head's group writes ``<save_dir>/<tag>/hybridfc_head_rank{r:05d}_of_{N:05d}.pt`` holding its
rows, their optimizer state and the shard's description.

A save is complete or invisible (:func:`publish`): every rank writes into the staging directory
``<save_dir>/<tag>.partial`` (head shards fsynced), then one rank fsyncs it, renames it to
``<tag>`` and only then points ``latest`` at it (a temporary file, fsynced, renamed). A save
interrupted at any stage leaves the previous checkpoint, and ``latest``, as they were.
:data:`SAVE_STAGE_HOOK` lets tests stop a rank at each stage.

Loading checks that the saved shard is the one this rank owns (same ``num_classes``,
``embedding_size``, world size and row range) and raises :class:`CheckpointError` naming the
difference otherwise: a head is never silently re-initialised. Two differences are followed
instead: another number of ranks (the rows are cut from the saved shards) and more classes
(*growing*, for continuous training: classes ``C_old … C-1`` are appended; every saved row keeps
its values and optimizer state, wherever it now lives; the new rows start as a fresh head of
``C`` classes would, with empty optimizer state). Fewer classes is an error.

For serving, :func:`export_centres` writes the class rows of all shards as one ``(C, d)`` matrix
(``hybridfc export CKPT --out centres.npy``) and :func:`load_centres` loads such a matrix into a
head of any world size.
"""

from __future__ import annotations

import copy
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from hybridfc.head.class_parallel_fc import ClassParallelFC
from hybridfc.head.optimizer import ROW_STATE, HeadOptimizer


class CheckpointError(RuntimeError):
    """A checkpoint's head does not match the head it is loaded into, or is missing."""


SAVE_STAGE_HOOK: Optional[Callable[[str], None]] = None
"""Called with each stage a save reaches (``"head_written"``, ``"backbone_written"``,
``"renamed"``, ``"latest_written"``): fault injection for tests."""

STAGING_SUFFIX = ".partial"


def reached(stage: str) -> None:
    """Report a save's stage to :data:`SAVE_STAGE_HOOK`, if one is set."""
    if SAVE_STAGE_HOOK is not None:
        SAVE_STAGE_HOOK(stage)


def staging_tag(tag: str) -> str:
    """The directory name a save of ``tag`` is written under until it is complete."""
    return tag + STAGING_SUFFIX


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's entries to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")) + [directory]:
        _fsync(path)


def publish(save_dir: "str | os.PathLike", tag: str, save_latest: bool = True) -> Path:
    """Make the complete staging directory of ``tag`` the checkpoint ``tag`` (one rank calls it):
    fsync, rename over any older ``tag``, then, with ``save_latest``, point ``latest`` at it."""
    save_dir = Path(save_dir)
    staging, final = save_dir / staging_tag(tag), save_dir / tag
    _fsync_tree(staging)
    if final.exists():
        retired = save_dir / (tag + ".replaced")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(final, retired)
        os.replace(staging, final)
        shutil.rmtree(retired)
    else:
        os.replace(staging, final)
    _fsync(save_dir)
    reached("renamed")
    if save_latest:
        latest = save_dir / "latest.tmp"
        with open(latest, "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(latest, save_dir / "latest")
        _fsync(save_dir)
        reached("latest_written")
    return final


def shard_file(tag_dir: "str | os.PathLike", rank: int, world_size: int) -> Path:
    """Where rank ``rank`` of ``world_size`` keeps its head shard inside a checkpoint tag."""
    return Path(tag_dir) / f"hybridfc_head_rank{rank:05d}_of_{world_size:05d}.pt"


LAYOUT_VERSION = 1
"""Version of the shard files' layout; a shard of another version is refused."""


def _description(head: ClassParallelFC) -> dict[str, Any]:
    return {
        "layout": LAYOUT_VERSION,
        "num_classes": head.num_classes,
        "embedding_size": head.embedding_size,
        "storage_dtype": str(head.weight.dtype).removeprefix("torch."),
        "world_size": head.world_size,
        "class_start": head.class_start,
        "num_local": head.num_local,
    }


def save_head(head: ClassParallelFC, optimizer: HeadOptimizer, tag_dir: "str | os.PathLike",
              run_state: Optional[dict[str, Any]] = None) -> Path:
    """Write this rank's shard, its optimizer state and counters, and ``run_state`` (this rank's
    part of the run beyond the head: the loader's position, RNG states); returns the file written."""
    path = shard_file(tag_dir, head.rank, head.world_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "shard": _description(head),
        "weight": head.weight.detach().cpu(),
        "optimizer": optimizer.state_dict(),
        "non_finite_batches": head.non_finite_batches,
        "skipped_steps": optimizer.skipped_steps,
        "steps": head.steps,
        "selection": head.selection.state_dict(),
        "run_state": run_state or {},
    }
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    return path


SHARD_FIELDS = ("world_size", "class_start", "num_local")
"""The fields of a shard's description that depend on the number of ranks."""


def saved_world_size(tag_dir: "str | os.PathLike") -> int:
    """The number of ranks whose head shards ``tag_dir`` holds (all of them, or an error)."""
    return len(_shard_files(Path(tag_dir)))


def read_head(head: ClassParallelFC, tag_dir: "str | os.PathLike") -> dict[str, Any]:
    """This rank's part of the head in ``tag_dir``, read and checked against ``head``.

    Saved on as many ranks: this rank's shard file. Saved on another number: the rows this rank
    owns now, with their optimizer state (momentum, Adam moments and per-row step counts, row
    clocks), cut from every saved shard that holds some of them; the selection's graph or index
    is rebuilt from the rows at the first step, and the random generators are not restored. A
    missing, truncated or corrupt file, or one of another layout, ``num_classes``,
    ``embedding_size`` or storage dtype, is a :class:`CheckpointError` naming the file and what
    differs."""
    files = _shard_files(Path(tag_dir))
    if len(files) == head.world_size:
        state = _load(files[head.rank])
        if state["shard"]["num_classes"] >= head.num_classes:
            return _checked(state, files[head.rank], head, ignore=())
    return _resharded(head, files)


def _load(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"hybridfc: head shard {path} cannot be read, it is truncated or corrupt "
                              f"({type(exc).__name__}: {exc})") from None


def _checked(state: dict[str, Any], path: Path, head: ClassParallelFC, ignore: tuple[str, ...]) -> dict[str, Any]:
    """A shard file's state, its description compared with ``head``'s (but the fields ``ignore``)."""
    expected = _description(head)
    saved = {"layout": 0, **state["shard"]}
    if "storage_dtype" not in saved:
        saved["storage_dtype"] = str(state["weight"].dtype).removeprefix("torch.")
    mismatched = {k: (v, expected[k]) for k, v in saved.items() if k not in ignore and expected.get(k) != v}
    if mismatched:
        details = ", ".join(f"{k}: saved {was}, this head {ours}" for k, (was, ours) in mismatched.items())
        raise CheckpointError(f"hybridfc: head shard {path} does not match this head ({details})")
    return state


def _resharded(head: ClassParallelFC, files: list[Path]) -> dict[str, Any]:
    """The state of ``head``'s rows, cut from the shards of another number of ranks or of fewer
    classes (the rows past them new: :func:`_new_rows`). ``"grown_from"``: the saved number of
    classes when it is smaller than ``head``'s, else None."""
    first, last = head.class_start, head.class_start + head.num_local
    pieces, common, residuals = [], None, []
    for path in files:
        state = _checked(_load(path), path, head, ignore=SHARD_FIELDS + ("num_classes",))
        if state["shard"]["num_classes"] > head.num_classes:
            raise CheckpointError(f"hybridfc: head shard {path} holds {state['shard']['num_classes']} classes, this "
                                  f"head {head.num_classes}: a head grows (more classes), never shrinks")
        common = common or state
        residuals.append(state.get("run_state", {}).get("grad_topk"))
        start, count = state["shard"]["class_start"], state["shard"]["num_local"]
        rows = slice(max(first, start) - start, min(last, start + count) - start)
        if rows.start < rows.stop:
            pieces.append((state, rows))
    saved_classes = common["shard"]["num_classes"]
    new = _new_rows(head, common["optimizer"], last - max(first, saved_classes))
    optimizer = copy.deepcopy(common["optimizer"])
    for name in optimizer["state"].get(0, {}):
        if name in ROW_STATE:
            optimizer["state"][0][name] = torch.cat([s["optimizer"]["state"][0][name][rows] for s, rows in pieces]
                                                    + [new[name]])
    return {**common, "shard": _description(head), "optimizer": optimizer, "selection": None,
            "weight": torch.cat([s["weight"][rows] for s, rows in pieces] + [new["weight"]]),
            "run_state": {**common.get("run_state", {}), "rng": None, "grad_topk": _mean_residual(residuals)},
            "grown_from": saved_classes if saved_classes < head.num_classes else None}


def _new_rows(head: ClassParallelFC, optimizer: dict[str, Any], count: int) -> dict[str, torch.Tensor]:
    """The last ``count`` rows of ``head``'s shard as classes new to the checkpoint: their initial
    values (those of a fresh head) and empty optimizer state, their row clock at the saved step
    (so that no weight decay of the steps before they existed shrinks them)."""
    count = max(count, 0)
    new = {"weight": head.weight.detach()[head.num_local - count:].cpu()}
    state = optimizer["state"].get(0, {})
    for name in ROW_STATE:
        if name in state:
            saved = state[name]
            fill = int(state["applied_steps"]) if name == "row_last_step" else 0
            new[name] = torch.full((count, *saved.shape[1:]), fill, dtype=saved.dtype)
    return new


def _mean_residual(states: list[Optional[dict[str, Any]]]) -> Optional[dict[str, Any]]:
    """The grad_topk state every rank of a new rank count starts from: the mean of the saved
    ranks' residuals (and momenta), which keeps what the ranks still owe the average."""
    if any(state is None for state in states):
        return None
    mean = {name: None if states[0][name] is None else torch.stack([s[name] for s in states]).mean(0)
            for name in ("residual", "velocity")}
    return {**mean, "steps": states[0]["steps"]}


def load_head(head: ClassParallelFC, optimizer: "HeadOptimizer | None", tag_dir: "str | os.PathLike") -> dict:
    """Restore this rank's shard (and optimizer state, when given) from ``tag_dir``; returns the
    ``run_state`` saved with it."""
    return apply_head(head, optimizer, read_head(head, tag_dir))


def apply_head(head: ClassParallelFC, optimizer: "HeadOptimizer | None", state: dict[str, Any]) -> dict:
    """Put what :func:`read_head` returned into ``head`` (and ``optimizer``, when given); returns
    the ``run_state`` saved with it."""
    with torch.no_grad():
        head.weight.copy_(state["weight"])
    head.non_finite_batches = state["non_finite_batches"]
    head.steps = state["steps"]
    if state["selection"] is not None:
        head.selection.load_state_dict(state["selection"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        optimizer.skipped_steps = state["skipped_steps"]
    return state.get("run_state", {})


def rng_states() -> dict[str, Any]:
    """This process's random generators: torch (CPU and every CUDA device), numpy, Python."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
            "python": random.getstate()}


def set_rng_states(states: dict[str, Any]) -> None:
    """Put back what :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(states["python"])


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


def _shard_files(tag_dir: Path) -> list[Path]:
    """Every rank's shard file, in rank order, or a :class:`CheckpointError` naming what is missing."""
    found = sorted(tag_dir.glob("hybridfc_head_rank*_of_*.pt"))
    if not found:
        raise CheckpointError(f"hybridfc: {tag_dir} holds no head shards")
    world_size = int(found[0].stem.rsplit("_of_", 1)[1])
    expected = [shard_file(tag_dir, rank, world_size) for rank in range(world_size)]
    missing = [p.name for p in expected if not p.is_file()]
    if missing or len(found) != world_size:
        raise CheckpointError(f"hybridfc: {tag_dir} does not hold one head shard per rank of {world_size}: "
                              f"missing {missing}, found {[p.name for p in found]}")
    return expected


def export_centres(checkpoint: "str | os.PathLike", out: "str | os.PathLike", dtype: str = "fp32",
                   normalize: bool = False) -> Path:
    """Write the head's class rows of a checkpoint as one ``(C, d)`` ``.npy`` matrix in class order.

    ``checkpoint``: a tag directory or a save directory with ``latest``. ``dtype``: ``fp32`` or
    ``fp16``; ``normalize``: L2-normalise each row (as the angular margins score them). One shard is
    read at a time, and the file appears under ``out`` only once complete. Returns its path.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"hybridfc: export dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    files = _shard_files(tag_directory(checkpoint))
    out, rows = Path(out), None
    partial = out.with_name(out.name + ".partial")
    for path in files:
        state = torch.load(path, map_location="cpu", weights_only=True)
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
