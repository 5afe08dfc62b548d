"""insightface's MXNet RecordIO training sets (``train.rec`` + ``train.idx``), without mxnet.

File format (dmlc-core ``recordio``, MXNet ``mx.recordio``), all integers little endian:

* ``.idx``: one text line ``"<key>\\t<byte offset>\\n"`` per record.
* ``.rec``: records, each ``uint32 magic 0xced7230a``, ``uint32 lrecord``, then ``length``
  payload bytes zero-padded to a multiple of 4, with ``cflag = lrecord >> 29`` and
  ``length = lrecord & (2**29 - 1)``. cflag 0 is a whole record. A payload holding the magic
  number at a 4-byte aligned position is written in parts split at each such word, the word
  itself left out: cflag 1 (first), 2 (middle), 3 (last); the reader joins the parts with
  the magic bytes between them.
* payload: an IRHeader ``struct "<IfQQ"`` (flag, label, id, id2; 24 bytes), then ``flag``
  float32 labels when ``flag > 0``, then the encoded image. A record's class id is
  ``label`` when ``flag == 0``, else the first of its labels.
* insightface's layout: the record with key 0 is a header, ``flag >= 2``, labels ``(a, b)``
  and no image; keys ``[1, a)`` are the images and keys ``[a, b)`` one record per identity
  whose labels are that identity's image key range, so ``b - a`` is the number of classes.
  Without such a header every key of the ``.idx`` is an image, in ``.idx`` order.

Example::

    from hybridfc.data import DistributedLoader, RecordIODataset

    dataset = RecordIODataset("faces_emore/train")        # or the folder "faces_emore"
    loader = DistributedLoader(dataset, batch_size=128, num_workers=4)
    for x, y in loader:        # x: (b, 3, 112, 112) float32 in [-1, 1], y: (b,) int64
        ...

    write_recordio("my_set/train", [(image_hw3_uint8, 0), (png_bytes, 1)])
"""

import io
import math
import mmap
import operator
import os
import struct
import warnings
from collections.abc import Iterable, Sequence
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from hybridfc.data.transforms import Transform, decode_image

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_BITS = 29
_MAX_LENGTH = (1 << _LENGTH_BITS) - 1
_IR_HEADER = struct.Struct("<IfQQ")
_LABEL_PREFIX = _IR_HEADER.size + 4
_FLOAT32_EXACT = 1 << 24

Label = int | Sequence[float]
Sample = tuple[np.ndarray | bytes, Label]


class RecordIOError(ValueError):
    """A RecordIO file that does not follow the format; the message names file and record."""


def _paths(path: str | os.PathLike) -> tuple[str, str]:
    """(.rec, .idx) paths of a prefix, a folder holding train.rec, or a .rec path."""
    path = os.fspath(path)
    if os.path.isdir(path):
        prefix = os.path.join(path, "train")
    elif path.endswith(".rec"):
        prefix = path[: -len(".rec")]
    else:
        prefix = path
    return prefix + ".rec", prefix + ".idx"


def _read_index(idx_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Keys (n,) and byte offsets (n,), int64, in the order of the lines of ``idx_path``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            table = np.loadtxt(idx_path, dtype=np.int64, delimiter="\t", ndmin=2)
    except ValueError as error:
        raise RecordIOError(f"{idx_path}: not '<key>\\t<offset>' lines: {error}") from error
    if table.shape[0] == 0:
        raise RecordIOError(f"{idx_path} lists no records")
    keys, offsets = table[:, 0].copy(), table[:, 1].copy()
    sorted_keys = np.sort(keys)
    repeated = sorted_keys[1:][sorted_keys[1:] == sorted_keys[:-1]]
    if repeated.size:
        raise RecordIOError(f"{idx_path} lists key {int(repeated[0])} more than once")
    return keys, offsets


def _check_offsets(rec_path: str, rec_size: int, keys: np.ndarray, offsets: np.ndarray) -> None:
    """Every record must start inside the .rec, with room for its 8-byte record header."""
    bad = np.flatnonzero((offsets < 0) | (offsets + 8 > rec_size))
    if bad.size:
        key, offset = int(keys[bad[0]]), int(offsets[bad[0]])
        raise RecordIOError(
            f"{rec_path}: the .idx puts record {key} at offset {offset}, past the end of "
            f"the file ({rec_size} bytes)"
        )


def _lookup(
    keys: np.ndarray, offsets: np.ndarray, wanted: np.ndarray, idx_path: str
) -> np.ndarray:
    """Offsets (len(wanted),) of the keys ``wanted``; every one must be in the index."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    pos = np.minimum(np.searchsorted(sorted_keys, wanted), len(keys) - 1)
    missing = wanted[sorted_keys[pos] != wanted]
    if missing.size:
        raise RecordIOError(f"{idx_path} lacks record {int(missing[0])}, which the header implies")
    return offsets[order][pos]


def _is_count(value: float) -> bool:
    """Whether a float label holds an integer >= 0."""
    return math.isfinite(value) and value >= 0 and value == int(value)


def _ir_header(rec_path: str, key: int, payload: bytes) -> tuple[int, float]:
    """(flag, scalar label) of the IRHeader that opens ``payload``."""
    if len(payload) < _IR_HEADER.size:
        raise RecordIOError(
            f"{rec_path} record {key}: {len(payload)} bytes, shorter than the "
            f"{_IR_HEADER.size}-byte IRHeader"
        )
    flag, scalar, _, _ = _IR_HEADER.unpack_from(payload)
    return flag, scalar


def _label_count_error(rec_path: str, key: int, flag: int, size: int) -> RecordIOError:
    return RecordIOError(
        f"{rec_path} record {key}: IRHeader announces {flag} labels, the record is {size} bytes"
    )


def _class_id(rec_path: str, key: int, payload: bytes) -> int:
    """The class id of a record from its payload or a prefix of it: the scalar label when
    ``flag == 0``, else the first label of the vector; checked to be an integer >= 0."""
    flag, value = _ir_header(rec_path, key, payload)
    if flag > 0:
        if len(payload) < _LABEL_PREFIX:
            raise _label_count_error(rec_path, key, flag, len(payload))
        (value,) = struct.unpack_from("<f", payload, _IR_HEADER.size)
    if not _is_count(value):
        raise RecordIOError(f"{rec_path} record {key}: label {value!r} is not an integer >= 0")
    return int(value)


def _unpack(rec_path: str, key: int, payload: bytes) -> tuple[np.ndarray, bytes]:
    """(label vector (flag,) float32, image bytes) of a whole record payload."""
    flag, _ = _ir_header(rec_path, key, payload)
    end = _IR_HEADER.size + 4 * flag
    if len(payload) < end:
        raise _label_count_error(rec_path, key, flag, len(payload))
    labels = np.frombuffer(payload, dtype="<f4", count=flag, offset=_IR_HEADER.size)
    return labels, payload[end:]


class _RecordFile:
    """Random access to the records of one .rec file through a per-process memory map."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.size = os.path.getsize(path)
        self._map: mmap.mmap | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_map": None, "_pid": None}

    def _buffer(self) -> mmap.mmap:
        if self._map is None or self._pid != os.getpid():
            with open(self.path, "rb") as file:
                self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
            self._pid = os.getpid()
        return self._map

    def read(self, key: int, offset: int, limit: int | None = None) -> bytes:
        """The payload of record ``key`` at ``offset``, parts joined; at least its first
        ``limit`` bytes (or all of it, if shorter) when ``limit`` is given."""
        buffer = self._buffer()
        parts: list[bytes] = []
        size, position, first = 0, offset, True
        while True:
            cflag, part = self._part(buffer, key, position)
            if cflag > 3 or (cflag in (0, 1)) != first:
                raise RecordIOError(
                    f"{self.path} record {key}: part at offset {position} has continuation "
                    f"flag {cflag}, out of sequence"
                )
            parts.append(part)
            size += len(part)
            if cflag in (0, 3) or (limit is not None and size >= limit):
                return _MAGIC_BYTES.join(parts)
            size += len(_MAGIC_BYTES)
            position += 8 + (len(part) + 3) // 4 * 4
            first = False

    def _part(self, buffer: mmap.mmap, key: int, position: int) -> tuple[int, bytes]:
        """(cflag, data) of the record part at ``position``."""
        if position + 8 > self.size:
            raise RecordIOError(
                f"{self.path} record {key}: truncated, the part at offset {position} runs "
                f"past the end of the file ({self.size} bytes)"
            )
        magic, lrecord = struct.unpack_from("<II", buffer, position)
        if magic != MAGIC:
            raise RecordIOError(
                f"{self.path} record {key}: bad magic number 0x{magic:08x} at offset "
                f"{position} (expected 0x{MAGIC:08x})"
            )
        length = lrecord & _MAX_LENGTH
        if position + 8 + length > self.size:
            raise RecordIOError(
                f"{self.path} record {key}: truncated, {length} bytes at offset {position} "
                f"run past the end of the file ({self.size} bytes)"
            )
        return lrecord >> _LENGTH_BITS, buffer[position + 8 : position + 8 + length]


class RecordIODataset(Dataset):
    """The images of an insightface/MXNet RecordIO set: item i is (image, label).

    image: (3, H, W) float32 in [-1, 1] after ``transform``; label: () int64 in
    [0, num_classes). ``path`` is the prefix (``…/train`` for ``…/train.rec`` and
    ``…/train.idx``), the folder holding ``train.rec``/``train.idx``, or the ``.rec`` path.

    ``num_classes`` comes from the header record: ``b - a``, checked, when the identity
    records ``[a, b)`` are in the index, against the image key ranges that the first and
    the last of them hold (they must start at 1 and end at ``a``). Without a header it is
    the ``num_classes`` argument, else one more than the largest label, found by reading the
    IRHeaders of all images (not the images). With a header, an argument that differs from
    it is an error. Labels are checked against it on every read.

    The dataset pickles without its memory map; each process (DataLoader worker) maps the
    ``.rec`` file itself on first read.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        transform: Transform | None = None,
        num_classes: int | None = None,
    ) -> None:
        self.rec_path, self.idx_path = _paths(path)
        for file in (self.rec_path, self.idx_path):
            if not os.path.isfile(file):
                raise FileNotFoundError(f"RecordIO file {file} does not exist")
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
        ):
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        self.transform = transform
        self._file = _RecordFile(self.rec_path)
        keys, offsets = _read_index(self.idx_path)
        _check_offsets(self.rec_path, self._file.size, keys, offsets)
        header = self._header(keys, offsets)
        if header is None:
            self._keys, self._offsets = keys, offsets
            self.num_classes = num_classes if num_classes is not None else self._scan_labels()
            return
        a, b = header
        self._keys = np.arange(1, a, dtype=np.int64)
        self._offsets = _lookup(keys, offsets, self._keys, self.idx_path)
        self.num_classes = self._identities(keys, offsets, a, b)
        if num_classes is not None and num_classes != self.num_classes:
            raise ValueError(
                f"num_classes={num_classes} disagrees with the header of {self.rec_path}, "
                f"which has {self.num_classes} identities"
            )

    def __len__(self) -> int:
        return len(self._keys)

    def _header(self, keys: np.ndarray, offsets: np.ndarray) -> tuple[int, int] | None:
        """(a, b) of insightface's header record (key 0), or None when there is none."""
        where = np.flatnonzero(keys == 0)
        if not where.size:
            return None
        labels, image = _unpack(self.rec_path, 0, self._file.read(0, int(offsets[where[0]])))
        if len(labels) < 2 or image:
            return None
        a, b = self._range(0, labels)
        if not 1 <= a < b:
            raise RecordIOError(
                f"{self.rec_path} record 0: header range ({a}, {b}) is not 1 <= a < b"
            )
        return a, b

    def _range(self, key: int, labels: np.ndarray) -> tuple[int, int]:
        """The key range [a, b) held by the first two labels of a header or identity record."""
        if len(labels) < 2 or not all(_is_count(float(v)) for v in labels[:2]):
            raise RecordIOError(
                f"{self.rec_path} record {key}: labels {labels.tolist()} do not start with a "
                "key range (a, b)"
            )
        return int(labels[0]), int(labels[1])

    def _identity_range(self, key: int, offset: int) -> tuple[int, int]:
        labels, _ = _unpack(self.rec_path, key, self._file.read(key, offset))
        return self._range(key, labels)

    def _identities(self, keys: np.ndarray, offsets: np.ndarray, a: int, b: int) -> int:
        """b - a; when the identity records [a, b) are indexed, once they span images [1, a)."""
        identities = np.arange(a, b, dtype=np.int64)
        if not np.isin(identities, keys).any():
            return b - a
        found = _lookup(keys, offsets, identities, self.idx_path)
        start, _ = self._identity_range(a, int(found[0]))
        _, end = self._identity_range(b - 1, int(found[-1]))
        if start != 1 or end != a:
            raise RecordIOError(
                f"{self.rec_path}: identity records {a}..{b - 1} span images [{start}, {end}), "
                f"the header says [1, {a})"
            )
        return b - a

    def _scan_labels(self) -> int:
        """One more than the largest label, from the IRHeaders of all images."""
        largest = -1
        for key, offset in zip(self._keys.tolist(), self._offsets.tolist()):
            payload = self._file.read(key, offset, _LABEL_PREFIX)
            largest = max(largest, _class_id(self.rec_path, key, payload))
        return largest + 1

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """(image (3, H, W) float32, label () int64) of image ``index``."""
        index = operator.index(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        key, offset = int(self._keys[index]), int(self._offsets[index])
        payload = self._file.read(key, offset)
        label = _class_id(self.rec_path, key, payload)
        if label >= self.num_classes:
            raise RecordIOError(
                f"{self.rec_path} record {key}: label {label} >= num_classes={self.num_classes}"
            )
        _, encoded = _unpack(self.rec_path, key, payload)
        image = decode_image(encoded, f"{self.rec_path} record {key}")
        if self.transform is not None:
            image = self.transform(image)
        return image, torch.tensor(label, dtype=torch.int64)


def _encode(image: np.ndarray | bytes) -> bytes:
    """Encoded bytes as given, or a uint8 (H, W, 3) RGB array as PNG."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(
            "an image must be encoded bytes or a uint8 (H, W, 3) array, "
            f"got {array.dtype} {array.shape}"
        )
    buffer = io.BytesIO()
    Image.fromarray(array, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _pack(key: int, label: Label, image: bytes) -> bytes:
    """An IRHeader payload as ``mx.recordio.pack`` makes it: a scalar label in the header
    (flag 0), a label vector after it (flag = its length, header label 0)."""
    if isinstance(label, (int, float, np.integer, np.floating)) and not isinstance(label, bool):
        return _IR_HEADER.pack(0, float(label), key, 0) + image
    vector = np.asarray(label, dtype="<f4").reshape(-1)
    if vector.size == 0:
        raise ValueError(f"sample {key}: the label vector is empty")
    return _IR_HEADER.pack(vector.size, 0.0, key, 0) + vector.tobytes() + image


def _class_of(position: int, label: Label) -> int:
    """The class id of a sample's label (an int, or a vector whose first entry it is)."""
    vector = np.asarray(label, dtype=np.float64).reshape(-1)
    if isinstance(label, bool) or vector.size == 0 or not _is_count(float(vector[0])):
        raise ValueError(f"sample {position}: label {label!r} does not start with a class id >= 0")
    if vector[0] > _FLOAT32_EXACT:
        raise ValueError(f"sample {position}: class id {int(vector[0])} is not exact in float32")
    return int(vector[0])


def _parts(payload: bytes) -> list[bytes]:
    """``payload`` cut at each 4-byte aligned magic word, the word left out."""
    parts, start = [], 0
    found = payload.find(_MAGIC_BYTES)
    while found >= 0:
        if found % 4 == 0:
            parts.append(payload[start:found])
            start = found + 4
        found = payload.find(_MAGIC_BYTES, found + 1)
    parts.append(payload[start:])
    return parts


class _Writer:
    """Appends records to an open .rec file and their lines to an open .idx file."""

    def __init__(self, rec: BinaryIO, idx: io.TextIOBase) -> None:
        self._rec = rec
        self._idx = idx

    def write(self, key: int, payload: bytes) -> None:
        self._idx.write(f"{key}\t{self._rec.tell()}\n")
        parts = _parts(payload)
        for i, part in enumerate(parts):
            if len(part) > _MAX_LENGTH:
                raise ValueError(f"record {key}: {len(payload)} bytes, over the 2**29 - 1 limit")
            last = i == len(parts) - 1
            cflag = 0 if len(parts) == 1 else 1 if i == 0 else 3 if last else 2
            self._rec.write(struct.pack("<II", MAGIC, cflag << _LENGTH_BITS | len(part)))
            self._rec.write(part + bytes(-len(part) % 4))


def write_recordio(
    prefix: str | os.PathLike, samples: Iterable[Sample], with_header: bool = True
) -> int:
    """Writes ``prefix.rec`` and ``prefix.idx``; returns the number of images.

    ``samples`` yields (image, label): image a uint8 (H, W, 3) RGB array (stored as PNG)
    or encoded bytes stored as given; label an int class id, or a float vector whose first
    entry is the class id. With ``with_header`` the layout is insightface's: images at keys
    ``1..n``, then one identity record per class ``c`` at key ``n + 1 + c`` holding its
    image key range, then the header (key 0, labels ``(n + 1, n + 1 + C)``); the samples
    must come sorted by class id. Without it the images take keys ``0..n-1``.
    """
    prefix = os.fspath(prefix)
    with open(prefix + ".rec", "wb") as rec, open(prefix + ".idx", "w", newline="\n") as idx:
        writer = _Writer(rec, idx)
        key = 1 if with_header else 0
        starts: list[int] = []
        for position, (image, label) in enumerate(samples):
            class_id = _class_of(position, label)
            if with_header and class_id < len(starts) - 1:
                raise ValueError(
                    f"sample {position}: label {class_id} after {len(starts) - 1}; a set with "
                    "a header needs the samples sorted by class id"
                )
            starts.extend([key] * (class_id + 1 - len(starts)))
            writer.write(key, _pack(key, label, _encode(image)))
            key += 1
        if not starts:
            raise ValueError("write_recordio got no samples")
        if with_header:
            _write_identities(writer, starts + [key])
        return key - 1 if with_header else key


def _write_identities(writer: _Writer, bounds: list[int]) -> None:
    """Identity records (c -> image keys [bounds[c], bounds[c+1])) and the header record."""
    first = bounds[-1]
    if first + len(bounds) - 1 > _FLOAT32_EXACT:
        raise ValueError(
            f"{first - 1} images and {len(bounds) - 1} classes: the header's float32 key range "
            "would not be exact; write with with_header=False"
        )
    for c in range(len(bounds) - 1):
        writer.write(first + c, _pack(first + c, bounds[c : c + 2], b""))
    writer.write(0, _pack(0, [first, first + len(bounds) - 1], b""))
