"""``benchmarks/make_hangul.py``: its cmap reader against what the fonts draw, and a small cut of
the set written and read back (each where the fonts are installed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import make_hangul  # noqa: E402

DEJAVU = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")


@pytest.mark.skipif(not DEJAVU.exists(), reason="DejaVu Sans is not installed")
def test_the_cmap_reader_agrees_with_the_glyphs_the_font_draws():
    data = DEJAVU.read_bytes()
    directory = make_hangul.face_offsets(data)[0]
    face = make_hangul.Face(str(DEJAVU), 0, "DejaVu Sans", "Book")
    for first, count in ((0x41, 58), (0x391, 40), (0x2190, 40)):   # Latin, Greek capitals, arrows
        mapped = make_hangul.mapped_codepoints(data, directory, first, count)
        inked = make_hangul.inked_codepoints(face, first, count)   # an unmapped one draws .notdef's box
        assert inked.all(), hex(first)
        gaps = [first + i for i in np.flatnonzero(~mapped)]
        assert gaps == ([0x3A2] if first == 0x391 else []), hex(first)   # U+03A2: no character there
    assert not make_hangul.mapped_codepoints(data, directory, make_hangul.FIRST, 100).any()


def _korean_fonts() -> bool:
    return any("nanum" in str(path).lower() for path in make_hangul.font_files())


@pytest.mark.skipif(not _korean_fonts(), reason="the Korean font packages are not installed")
def test_a_small_cut_has_every_class_in_both_splits_and_disjoint_faces(tmp_path):
    from hybridfc.data import RecordIODataset

    subprocess.run([sys.executable, str(REPO / "benchmarks" / "make_hangul.py"), "--classes", "3", "--no-install",
                    "--out", str(tmp_path)], check=True, capture_output=True, timeout=300)
    faces = json.loads((tmp_path / "faces.json").read_text())
    assert set(faces["test_faces"]) == set(make_hangul.TEST_FACES)
    assert not set(faces["train_faces"]) & set(faces["test_faces"])
    for split, per_class in (("train", len(faces["train_faces"])), ("test", len(faces["test_faces"]))):
        data = RecordIODataset(str(tmp_path / split))
        labels = [int(data[i][1]) for i in range(len(data))]
        assert labels == [c for c in range(3) for _ in range(per_class)]
        image = data[0][0]
        assert tuple(image.shape) == (3, 32, 32) and float(image.max()) > float(image.min())
