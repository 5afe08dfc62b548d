"""RecordIODataset and write_recordio: hand-built files, round trips, bad inputs, the loader."""

import io
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from hybridfc.data import (
    DistributedLoader,
    RandomHorizontalFlip,
    RecordIODataset,
    RecordIOError,
    write_recordio,
)
from hybridfc.data.recordio import _RecordFile

MAGIC = 0xCED7230A


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _images(n: int, seed: int, height: int = 5, width: int = 7) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(n)]


def _normalized(array: np.ndarray) -> torch.Tensor:
    """What the reader must return for a uint8 (H, W, 3) image: (3, H, W) in [-1, 1]."""
    return (torch.from_numpy(array).permute(2, 0, 1).float() / 255.0 - 0.5) / 0.5


def _ir(flag: int, label: float, key: int, labels=(), image=b"", id2: int = 0) -> bytes:
    """A payload built by hand: IRHeader "<IfQQ", the float32 label vector, the image."""
    vector = struct.pack(f"<{len(labels)}f", *labels)
    return struct.pack("<IfQQ", flag, label, key, id2) + vector + image


def _part(cflag: int, data: bytes) -> bytes:
    """One on-disk record part: magic, lrecord (cflag << 29 | length), data, zero padding."""
    return struct.pack("<II", MAGIC, cflag << 29 | len(data)) + data + bytes(-len(data) % 4)


def _write(prefix, records: list[tuple[int, bytes]]) -> None:
    """Writes the on-disk records in order and an .idx line "key\\toffset" for each."""
    offset, lines = 0, []
    with open(f"{prefix}.rec", "wb") as rec:
        for key, data in records:
            lines.append(f"{key}\t{offset}\n")
            rec.write(data)
            offset += len(data)
    with open(f"{prefix}.idx", "w") as idx:
        idx.writelines(lines)


def _insightface_set(prefix, images, labels) -> None:
    """insightface's layout by hand: images 1..n, identity records, header (key 0) last."""
    n, classes = len(images), max(labels) + 1
    records = [(k + 1, _part(0, _ir(0, labels[k], k + 1, image=_png(images[k])))) for k in range(n)]
    a = n + 1
    for c in range(classes):
        keys = [k + 1 for k in range(n) if labels[k] == c]
        records.append((a + c, _part(0, _ir(2, 0.0, a + c, (keys[0], keys[-1] + 1)))))
    records.append((0, _part(0, _ir(2, 0.0, 0, (a, a + classes)))))
    _write(prefix, records)


def _check_items(dataset, images, labels) -> None:
    assert len(dataset) == len(images)
    for i, (array, label) in enumerate(zip(images, labels)):
        x, y = dataset[i]
        assert x.dtype == torch.float32 and x.shape == (3, *array.shape[:2])
        assert torch.equal(x, _normalized(array))
        assert y.dtype == torch.int64 and y.shape == () and int(y) == label


def test_hand_built_insightface_set_in_prefix_folder_and_rec_forms(tmp_path):
    images, labels = _images(6, seed=0), [0, 0, 1, 2, 2, 2]
    _insightface_set(tmp_path / "train", images, labels)
    for path in (tmp_path / "train", tmp_path, str(tmp_path / "train.rec")):
        dataset = RecordIODataset(path)
        assert dataset.num_classes == 3
        _check_items(dataset, images, labels)
    assert torch.equal(dataset[-1][0], dataset[5][0])


def test_hand_built_set_without_header_has_every_key_in_idx_order(tmp_path):
    images = _images(4, seed=1)
    labels = [3, 0, 5, 0]
    keys = [7, 2, 0, 9]
    records = [
        (key, _part(0, _ir(2, 0.0, key, (label, 0.25), _png(image))))
        for key, label, image in zip(keys, labels, images)
    ]
    _write(tmp_path / "set", records)
    dataset = RecordIODataset(tmp_path / "set")
    assert dataset.num_classes == 6
    _check_items(dataset, images, labels)
    assert RecordIODataset(tmp_path / "set", num_classes=10).num_classes == 10


def test_scalar_labels_without_header(tmp_path):
    images, labels = _images(3, seed=2), [1, 4, 2]
    records = [_part(0, _ir(0, labels[k], k, image=_png(images[k]))) for k in range(3)]
    _write(tmp_path / "s", list(enumerate(records)))
    dataset = RecordIODataset(tmp_path / "s")
    assert dataset.num_classes == 5
    _check_items(dataset, images, labels)


def test_record_split_in_three_parts(tmp_path):
    """A payload with the magic word at aligned offsets 8 and 16 (in its id and id2) is
    stored as parts with cflag 1, 2, 3 and read back whole."""
    image = _images(1, seed=3)[0]
    payload = _ir(0, 1.0, MAGIC | 5 << 32, image=_png(image), id2=MAGIC | 6 << 32)
    assert payload[8:12] == payload[16:20] == struct.pack("<I", MAGIC)
    parts = _part(1, payload[:8]) + _part(2, payload[12:16]) + _part(3, payload[20:])
    other = _ir(0, 0.0, 1, image=_png(image))
    _write(tmp_path / "split", [(0, _part(0, other)), (1, parts), (2, _part(0, other))])
    dataset = RecordIODataset(tmp_path / "split")
    assert [int(dataset[i][1]) for i in range(3)] == [0, 1, 0]
    assert torch.equal(dataset[1][0], _normalized(image))
    assert dataset._file.read(1, len(_part(0, other))) == payload


def test_writer_splits_at_aligned_magic_words_only(tmp_path):
    magic = struct.pack("<I", MAGIC)
    image = b"x" + magic + b"yyy" + magic + b"z"
    payload = _ir(0, 1.0, 0, image=image)
    assert payload.index(magic) == 25 and payload.index(magic, 26) == 32
    write_recordio(tmp_path / "w", [(image, 1)], with_header=False)
    assert (tmp_path / "w.rec").read_bytes() == _part(1, payload[:32]) + _part(3, payload[36:])
    assert (tmp_path / "w.idx").read_text() == "0\t0\n"


def test_split_inside_the_label_vector_and_empty_parts(tmp_path):
    magic_float = struct.unpack("<f", struct.pack("<I", MAGIC))[0]
    image = _images(1, seed=4)[0]
    payload = _ir(2, 0.0, 0, (2.0, magic_float), _png(image))
    assert payload[28:32] == struct.pack("<I", MAGIC)
    _write(tmp_path / "v", [(0, _part(1, payload[:28]) + _part(3, payload[32:]))])
    dataset = RecordIODataset(tmp_path / "v")
    assert dataset.num_classes == 3 and int(dataset[0][1]) == 2
    _write(tmp_path / "e", [(0, _part(1, b"") + _part(2, b"") + _part(3, b""))])
    assert _RecordFile(str(tmp_path / "e.rec")).read(0, 0) == struct.pack("<I", MAGIC) * 2


@pytest.mark.parametrize("with_header", [True, False])
def test_writer_round_trip(tmp_path, with_header):
    images, labels = _images(7, seed=5), [0, 0, 1, 1, 1, 4, 4]
    encoded = [image if i % 2 else _png(image) for i, image in enumerate(images)]
    samples = list(zip(encoded, labels))
    samples[3] = (samples[3][0], [1.0, 9.5])
    assert write_recordio(tmp_path / "train", samples, with_header=with_header) == 7
    dataset = RecordIODataset(tmp_path)
    assert dataset.num_classes == 5
    _check_items(dataset, images, labels)


def test_writer_matches_the_hand_built_layout(tmp_path):
    images, labels = _images(4, seed=6), [0, 1, 1, 2]
    _insightface_set(tmp_path / "hand", images, labels)
    write_recordio(tmp_path / "tool", [(_png(a), b) for a, b in zip(images, labels)])
    assert (tmp_path / "tool.rec").read_bytes() == (tmp_path / "hand.rec").read_bytes()
    assert (tmp_path / "tool.idx").read_text() == (tmp_path / "hand.idx").read_text()


def test_writer_rejects_bad_samples(tmp_path):
    image = _images(1, seed=7)[0]
    with pytest.raises(ValueError, match="sorted by class id"):
        write_recordio(tmp_path / "a", [(image, 1), (image, 0)])
    with pytest.raises(ValueError, match="class id >= 0"):
        write_recordio(tmp_path / "b", [(image, -1)])
    with pytest.raises(ValueError, match="uint8"):
        write_recordio(tmp_path / "c", [(image.astype(np.float32), 0)])
    with pytest.raises(ValueError, match="no samples"):
        write_recordio(tmp_path / "d", [])


def test_pickles_without_its_memory_map(tmp_path):
    images = _images(2, seed=8)
    write_recordio(tmp_path / "train", zip(images, [0, 1]))
    dataset = RecordIODataset(tmp_path)
    first = dataset[0]
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy._file._map is None
    assert torch.equal(copy[0][0], first[0]) and int(copy[1][1]) == 1


def _no_header_set(prefix, labels=(0, 1, 0)) -> list[bytes]:
    """A small set without header; returns the on-disk records."""
    images = _images(len(labels), seed=9)
    records = [_part(0, _ir(0, label, k, image=_png(images[k]))) for k, label in enumerate(labels)]
    _write(prefix, list(enumerate(records)))
    return records


def test_missing_files(tmp_path):
    _no_header_set(tmp_path / "set")
    (tmp_path / "set.idx").unlink()
    with pytest.raises(FileNotFoundError, match=r"set\.idx"):
        RecordIODataset(tmp_path / "set")
    with pytest.raises(FileNotFoundError, match=r"nothing\.rec"):
        RecordIODataset(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match=r"train\.rec"):
        RecordIODataset(tmp_path)


def test_truncated_rec(tmp_path):
    records = _no_header_set(tmp_path / "set")
    rec = tmp_path / "set.rec"
    rec.write_bytes(rec.read_bytes()[:-10])
    last = len(records[0]) + len(records[1])
    with pytest.raises(RecordIOError, match=rf"set\.rec record 2: truncated.*offset {last}"):
        RecordIODataset(tmp_path / "set")
    dataset = RecordIODataset(tmp_path / "set", num_classes=2)
    dataset[1]
    with pytest.raises(RecordIOError, match=rf"set\.rec record 2: truncated.*offset {last}"):
        dataset[2]


def test_split_record_truncated_between_parts(tmp_path):
    payload = _ir(0, 0.0, 0, image=b"abcd" * 3)
    _write(tmp_path / "set", [(0, _part(1, payload[:24]))])
    with pytest.raises(RecordIOError, match=r"set\.rec record 0: truncated.*offset 32"):
        RecordIODataset(tmp_path / "set")


def test_idx_offset_past_the_end(tmp_path):
    _no_header_set(tmp_path / "set")
    size = (tmp_path / "set.rec").stat().st_size
    (tmp_path / "set.idx").write_text(f"0\t0\n1\t{size + 40}\n2\t0\n")
    message = rf"set\.rec.*record 1 at offset {size + 40}, past the end"
    with pytest.raises(RecordIOError, match=message):
        RecordIODataset(tmp_path / "set")


def test_bad_magic(tmp_path):
    _no_header_set(tmp_path / "set")
    (tmp_path / "set.idx").write_text("0\t0\n1\t4\n")
    message = r"set\.rec record 1: bad magic number 0x[0-9a-f]{8} at offset 4"
    with pytest.raises(RecordIOError, match=message):
        RecordIODataset(tmp_path / "set")


def test_continuation_flag_out_of_sequence(tmp_path):
    payload = _ir(0, 0.0, 0, image=_png(_images(1, seed=10)[0]))
    _write(tmp_path / "set", [(0, _part(2, payload))])
    with pytest.raises(RecordIOError, match=r"set\.rec record 0: .*flag 2, out of sequence"):
        RecordIODataset(tmp_path / "set")


def test_undecodable_image(tmp_path):
    records = [
        _part(0, _ir(0, 0.0, 0, image=_png(_images(1, seed=11)[0]))),
        _part(0, _ir(0, 0.0, 1, image=b"not an image")),
    ]
    _write(tmp_path / "set", list(enumerate(records)))
    dataset = RecordIODataset(tmp_path / "set")
    dataset[0]
    with pytest.raises(ValueError, match=r"cannot decode the image of .*set\.rec record 1"):
        dataset[1]


@pytest.mark.parametrize(
    "label, message",
    [
        (7.0, r"record 1: label 7 >= num_classes=3"),
        (-1.0, r"record 1: label -1\.0 is not"),
        (0.5, r"record 1: label 0\.5 is not"),
    ],
)
def test_bad_labels(tmp_path, label, message):
    image = _png(_images(1, seed=12)[0])
    records = [_part(0, _ir(0, 0.0, 0, image=image)), _part(0, _ir(0, label, 1, image=image))]
    _write(tmp_path / "set", list(enumerate(records)))
    dataset = RecordIODataset(tmp_path / "set", num_classes=3)
    with pytest.raises(RecordIOError, match=r"set\.rec " + message):
        dataset[1]


def test_label_beyond_the_header_identities(tmp_path):
    images = _images(3, seed=13)
    _insightface_set(tmp_path / "train", images, [0, 1, 1])
    records = (tmp_path / "train.rec").read_bytes()
    first = _part(0, _ir(0, 0.0, 1, image=_png(images[0])))
    bad = _part(0, _ir(0, 5.0, 1, image=_png(images[0])))
    (tmp_path / "train.rec").write_bytes(bad + records[len(first) :])
    dataset = RecordIODataset(tmp_path)
    with pytest.raises(RecordIOError, match=r"train\.rec record 1: label 5 >= num_classes=2"):
        dataset[0]


def test_header_problems(tmp_path):
    images = _images(3, seed=14)
    _insightface_set(tmp_path / "train", images, [0, 1, 1])
    with pytest.raises(ValueError, match="num_classes=3 disagrees"):
        RecordIODataset(tmp_path, num_classes=3)
    idx = tmp_path / "train.idx"
    lines = idx.read_text().splitlines(keepends=True)
    idx.write_text("".join(line for line in lines if not line.startswith("2\t")))
    with pytest.raises(RecordIOError, match=r"train\.idx lacks record 2"):
        RecordIODataset(tmp_path)
    idx.write_text("".join(line for line in lines if not line.startswith("5\t")))
    with pytest.raises(RecordIOError, match=r"train\.idx lacks record 5"):
        RecordIODataset(tmp_path)
    idx.write_text("".join(line for line in lines if line[0] not in "45"))
    assert RecordIODataset(tmp_path).num_classes == 2


def test_identity_records_must_span_the_images(tmp_path):
    images = _images(3, seed=16)
    records = [(k + 1, _part(0, _ir(0, 0.0, k + 1, image=_png(images[k])))) for k in range(3)]
    records.append((4, _part(0, _ir(2, 0.0, 4, (1.0, 3.0)))))
    records.append((0, _part(0, _ir(2, 0.0, 0, (4.0, 5.0)))))
    _write(tmp_path / "train", records)
    with pytest.raises(RecordIOError, match=r"identity records 4\.\.4 span images \[1, 3\)"):
        RecordIODataset(tmp_path)
    records[-2] = (4, _part(0, _ir(2, 0.0, 4, (1.0, float("nan")))))
    _write(tmp_path / "train", records)
    with pytest.raises(RecordIOError, match=r"record 4: labels \[1\.0, nan\] do not start"):
        RecordIODataset(tmp_path)
    records[-1] = (0, _part(0, _ir(2, 0.0, 0, (4.0, 4.0))))
    _write(tmp_path / "train", records)
    with pytest.raises(RecordIOError, match=r"record 0: header range \(4, 4\) is not"):
        RecordIODataset(tmp_path)


def test_malformed_idx(tmp_path):
    _no_header_set(tmp_path / "set")
    idx = tmp_path / "set.idx"
    idx.write_text("0\t0\n1\tx12\n")
    with pytest.raises(RecordIOError, match=r"set\.idx: not '<key>\\t<offset>' lines"):
        RecordIODataset(tmp_path / "set")
    idx.write_text("0\t0\n0\t0\n")
    with pytest.raises(RecordIOError, match=r"set\.idx lists key 0 more than once"):
        RecordIODataset(tmp_path / "set")
    idx.write_text("")
    with pytest.raises(RecordIOError, match=r"set\.idx lists no records"):
        RecordIODataset(tmp_path / "set")


def test_short_irheader(tmp_path):
    _write(tmp_path / "set", [(0, _part(0, b"\x00" * 12))])
    with pytest.raises(RecordIOError, match=r"set\.rec record 0: 12 bytes, shorter than"):
        RecordIODataset(tmp_path / "set")


def _identify(image: torch.Tensor, expected: list[torch.Tensor]) -> tuple[int, bool]:
    """(index, flipped) of the expected image that ``image`` is, as given or mirrored."""
    for i, reference in enumerate(expected):
        if torch.equal(image, reference):
            return i, False
        if torch.equal(image, reference.flip(-1)):
            return i, True
    raise AssertionError("a batch holds an image that is in no sample")


def _epochs(dataset, epochs: int, world_size: int = 2) -> list[list[list[torch.Tensor]]]:
    """Per epoch, every rank's batches (x, y) in order, from one loader per simulated rank."""
    loaders = [
        DistributedLoader(dataset, 3, rank=r, world_size=world_size, num_workers=2, seed=5)
        for r in range(world_size)
    ]
    return [[batch for loader in loaders for batch in loader] for _ in range(epochs)]


def test_loader_with_workers_flip_and_reshuffle(tmp_path):
    images, labels = _images(13, seed=15), [0, 0, 1, 1, 1, 2, 3, 3, 4, 4, 4, 4, 5]
    write_recordio(tmp_path / "train", zip(images, labels))
    dataset = RecordIODataset(tmp_path / "train", transform=RandomHorizontalFlip())
    expected = [_normalized(image) for image in images]
    torch.manual_seed(0)
    run = _epochs(dataset, epochs=2)
    orders, flips = [], 0
    for batches in run:
        order = []
        for x, y in batches:
            assert x.dtype == torch.float32 and x.shape == (len(y), 3, 5, 7)
            assert y.dtype == torch.int64
            for image, label in zip(x, y):
                index, flipped = _identify(image, expected)
                assert int(label) == labels[index]
                order.append(index)
                flips += flipped
        assert sorted(order) == list(range(13))
        orders.append(order)
    assert orders[0] != orders[1]
    assert 0 < flips < 26
    torch.manual_seed(0)
    again = _epochs(dataset, epochs=2)
    assert all(torch.equal(a[0], b[0]) for e, f in zip(run, again) for a, b in zip(e, f))
