"""Write the Hangul benchmark: every precomposed Hangul syllable (U+AC00–U+D7A3, 11,172 classes)
drawn from Debian's Korean typefaces, as insightface RecordIO. Printed Korean OCR: a real
many-class image problem whose test faces are typefaces the model never saw.

    python benchmarks/make_hangul.py                    # all 11,172 syllables
    python benchmarks/make_hangul.py --classes 2000     # the quick cut: the first 2,000 syllables

Faces: every face of the font files of :data:`FONT_PACKAGES` whose cmap maps each syllable
asked for to a glyph (read from the file's own ``cmap`` table here, format 4 or 12) and whose
glyph for each has ink (Baekmuk's faces map all 11,172 but draw only the 2,350 of KS X 1001;
a face that misses any syllable asked for does not take part). A font collection's faces
that draw the same Hangul (Noto CJK's JP/KR/SC/TC/HK faces of one weight) count as one face:
only the Korean one is kept, and a face that draws a kept face's glyphs (Noto Sans Mono CJK KR:
Noto Sans CJK KR's Hangul) is not counted again. Missing packages are installed with apt-get
when running as root; otherwise the script says what to install.

Split by face: the :data:`TEST_FACES` (three faces, no other face of their families in
training) are the held-out set, one centred image per syllable; every other face draws each
syllable ``--train-draws`` times with a small random affine jitter (rotation, scale, shear,
shift). Images are ``--size`` px grey (stored as 3 equal channels, PNG), each glyph's ink
centred and scaled so that its longer side fills :data:`GLYPH_FILL` of the image (faces draw
their syllables at different sizes within the em; a recogniser sees a crop of the character). Output under ``benchmarks/data/hangul`` (``hangul-<classes>`` for a cut):
``train.rec/.idx``, ``test.rec/.idx`` and ``faces.json`` (the faces of each split).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
FIRST, COUNT = 0xAC00, 11172
FONT_PACKAGES = ("fonts-nanum", "fonts-nanum-extra", "fonts-unfonts-core", "fonts-unfonts-extra",
                 "fonts-baekmuk", "fonts-noto-cjk")
FONT_DIRS = ("/usr/share/fonts/truetype", "/usr/share/fonts/opentype")
TEST_FACES = ("Nanum Pen Script Regular", "UnShinmun Regular", "UnTaza Regular")
"""The held-out faces (family and style as the fonts name them): a handwriting, a newspaper
Myeongjo and a typewriter face, each the only face of its family."""
GLYPH_FILL = 0.8
"""The longer side of a glyph's ink as a fraction of the image side."""
RENDER_SCALE = 4
"""Glyphs are drawn at this multiple of the image size, then reduced (anti-aliasing)."""


@dataclass(frozen=True)
class Face:
    """One face of a font file: its path, its index in a collection, and its name."""

    path: str
    index: int
    family: str
    style: str

    @property
    def name(self) -> str:
        return f"{self.family} {self.style}"


# ----------------------------------------------------------------------------- the cmap
def _u16(data: bytes, at: int) -> int:
    return struct.unpack_from(">H", data, at)[0]


def _u32(data: bytes, at: int) -> int:
    return struct.unpack_from(">I", data, at)[0]


def face_offsets(data: bytes) -> list[int]:
    """The offsets of the table directories of a font file's faces (one, or a collection's)."""
    if data[:4] == b"ttcf":
        return [_u32(data, 12 + 4 * i) for i in range(_u32(data, 8))]
    return [0]


def _table(data: bytes, directory: int, tag: bytes) -> Optional[int]:
    for i in range(_u16(data, directory + 4)):
        entry = directory + 12 + 16 * i
        if data[entry:entry + 4] == tag:
            return _u32(data, entry + 8)
    return None


def mapped_codepoints(data: bytes, directory: int, first: int, count: int) -> np.ndarray:
    """``(count,)`` bool: which of the code points ``first .. first + count - 1`` the face's Unicode
    cmap (format 4 or 12) maps to a glyph other than ``.notdef``."""
    cmap = _table(data, directory, b"cmap")
    found = np.zeros(count, dtype=bool)
    if cmap is None:
        return found
    subtables = {}
    for i in range(_u16(data, cmap + 2)):
        record = cmap + 4 + 8 * i
        platform, encoding = _u16(data, record), _u16(data, record + 2)
        subtables[platform, encoding] = cmap + _u32(data, record + 4)
    for key in ((3, 10), (0, 4), (0, 6), (3, 1), (0, 3)):
        if key in subtables:
            at = subtables[key]
            fmt = _u16(data, at)
            if fmt == 12:
                _format_12(data, at, first, found)
                return found
            if fmt == 4:
                _format_4(data, at, first, found)
                return found
    return found


def _format_12(data: bytes, at: int, first: int, found: np.ndarray) -> None:
    for i in range(_u32(data, at + 12)):
        start, end, glyph = struct.unpack_from(">III", data, at + 16 + 12 * i)
        for code in range(max(start, first), min(end, first + found.size - 1) + 1):
            found[code - first] = glyph + code - start != 0


def _format_4(data: bytes, at: int, first: int, found: np.ndarray) -> None:
    segments = _u16(data, at + 6) // 2
    ends, starts = at + 14, at + 16 + 2 * segments
    deltas, range_offsets = starts + 2 * segments, starts + 4 * segments
    for s in range(segments):
        end, start = _u16(data, ends + 2 * s), _u16(data, starts + 2 * s)
        delta, range_offset = _u16(data, deltas + 2 * s), _u16(data, range_offsets + 2 * s)
        for code in range(max(start, first), min(end, first + found.size - 1) + 1):
            if range_offset == 0:
                glyph = (code + delta) & 0xFFFF
            else:
                glyph = _u16(data, range_offsets + 2 * s + range_offset + 2 * (code - start))
                glyph = (glyph + delta) & 0xFFFF if glyph else 0
            found[code - first] = glyph != 0


# ----------------------------------------------------------------------------- the faces
def inked_codepoints(face: Face, first: int, count: int) -> np.ndarray:
    """``(count,)`` bool: which code points the face draws with some ink (at 16 px)."""
    font = ImageFont.truetype(face.path, 16, index=face.index)
    return np.array([font.getmask(chr(code)).getbbox() is not None for code in range(first, first + count)])


def font_files() -> list[Path]:
    files = []
    for root in FONT_DIRS:
        if os.path.isdir(root):
            files += [p for p in Path(root).rglob("*") if p.suffix.lower() in (".ttf", ".otf", ".ttc")]
    return sorted(files)


def faces_drawing(first: int, count: int) -> tuple[list[Face], list[str]]:
    """The faces that draw every code point asked for, one per design; and what was left out, why."""
    kept, skipped, drawings = [], [], {}
    for path in font_files():
        data = path.read_bytes()
        for index, directory in enumerate(face_offsets(data)):
            try:
                family, style = ImageFont.truetype(str(path), 16, index=index).getname()
            except OSError as error:
                skipped.append(f"{path.name} face {index}: unreadable ({error})")
                continue
            face = Face(str(path), index, family, style)
            if "CJK" in family and not family.endswith(" KR"):
                continue   # a collection's other-language faces draw the KR face's Hangul
            mapped = mapped_codepoints(data, directory, first, count)
            if not mapped.all():
                skipped.append(f"{face.name} ({path.name}): maps {int(mapped.sum())} of {count} syllables")
                continue
            drawn = inked_codepoints(face, first, count)
            if not drawn.all():
                skipped.append(f"{face.name} ({path.name}): maps all, draws {int(drawn.sum())} of {count} syllables")
                continue
            drawing = _sample_drawing(face, first, count)
            if drawing in drawings:
                skipped.append(f"{face.name} ({path.name}): draws the syllables as {drawings[drawing]} does")
                continue
            drawings[drawing] = face.name
            kept.append(face)
    return kept, skipped


def _sample_drawing(face: Face, first: int, count: int, samples: int = 16) -> bytes:
    """The 24-px bitmaps of ``samples`` syllables spread over the range: equal for two faces that
    draw the same glyphs (Noto Sans Mono CJK KR draws Noto Sans CJK KR's Hangul)."""
    font = ImageFont.truetype(face.path, 24, index=face.index)
    codes = np.linspace(first, first + count - 1, num=min(samples, count)).round().astype(int)
    return b"".join(bytes(font.getmask(chr(int(code)))) for code in codes)


def install_fonts() -> None:
    """Install the font packages that are missing (as root), or say what to install."""
    missing = [p for p in FONT_PACKAGES if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        sys.exit("make_hangul: the Korean fonts are missing; install them with\n"
                 f"    sudo apt-get install {' '.join(missing)}")
    print(f"installing {' '.join(missing)}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing], check=True, env=env,
                   stdout=subprocess.DEVNULL)


# ----------------------------------------------------------------------------- drawing
class GlyphDrawer:
    """Draws syllables of one face, centred on their ink, as ``(size, size)`` uint8 images."""

    def __init__(self, face: Face, size: int) -> None:
        self.size, self.big = size, size * RENDER_SCALE
        self.font = ImageFont.truetype(face.path, self.big, index=face.index)

    def draw(self, char: str, rng: Optional[np.random.Generator]) -> np.ndarray:
        canvas = Image.new("L", (2 * self.big, 2 * self.big), 0)
        ImageDraw.Draw(canvas).text((self.big, self.big), char, fill=255, font=self.font, anchor="mm")
        left, top, right, bottom = canvas.getbbox()
        fit = GLYPH_FILL * self.big / max(right - left, bottom - top)
        matrix = self._inverse_affine((left + right) / 2, (top + bottom) / 2, fit, rng)
        image = canvas.transform((self.big, self.big), Image.Transform.AFFINE, matrix, Image.Resampling.BILINEAR)
        return np.asarray(image.resize((self.size, self.size), Image.Resampling.BOX))

    def _inverse_affine(self, cx: float, cy: float, fit: float, rng: Optional[np.random.Generator]) -> tuple:
        """The output-to-input map that scales the ink about its centre by ``fit`` and, with ``rng``,
        jitters it: rotation ±6°, scale 0.9–1.1, shear ±0.12, shift ±6 % of the side."""
        angle, scale, shear, dx, dy = 0.0, fit, 0.0, 0.0, 0.0
        if rng is not None:
            angle = math.radians(rng.uniform(-6, 6))
            scale, shear = fit * rng.uniform(0.9, 1.1), rng.uniform(-0.12, 0.12)
            dx, dy = rng.uniform(-0.06, 0.06, size=2) * self.big
        cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
        a, b, d, e = cos, sin + shear * cos, -sin, cos - shear * sin
        ox, oy = self.big / 2 + dx, self.big / 2 + dy
        return (a, b, cx - a * ox - b * oy, d, e, cy - d * ox - e * oy)


def samples(faces: list[Face], count: int, size: int, draws: int, seed: int,
            desc: str) -> Iterator[tuple[np.ndarray, int]]:
    """Every syllable class by class (RecordIO with a header needs them sorted), each face
    ``draws`` times: jittered when ``draws`` > 0, else once, centred; a progress bar over the
    classes."""
    drawers = [GlyphDrawer(face, size) for face in faces]
    rng = np.random.default_rng(seed)
    for label in tqdm(range(count), desc=desc, unit="class", mininterval=1.0):
        char = chr(FIRST + label)
        for drawer in drawers:
            for _ in range(max(draws, 1)):
                grey = drawer.draw(char, rng if draws > 0 else None)
                yield np.repeat(grey[:, :, None], 3, axis=2), label


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=COUNT, help="the first N syllables (default: all 11,172)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--train-draws", type=int, default=1, help="jittered images per training face and syllable")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="default: benchmarks/data/hangul[-<classes>]")
    parser.add_argument("--no-install", action="store_true", help="do not install missing font packages")
    args = parser.parse_args()
    if not 1 <= args.classes <= COUNT:
        parser.error(f"--classes must be in 1..{COUNT}")
    sys.path.insert(0, str(REPO))
    from hybridfc.data import write_recordio

    if not args.no_install:
        install_fonts()
    faces, skipped = faces_drawing(FIRST, args.classes)
    test = [face for face in faces if face.name in TEST_FACES]
    held_out_families = {face.family for face in test}
    train = [face for face in faces if face.family not in held_out_families]
    if len(test) != len(TEST_FACES):
        sys.exit(f"make_hangul: the test faces {TEST_FACES} are not all among the faces found "
                 f"({', '.join(face.name for face in faces)})")
    print(f"{len(faces)} faces draw the {args.classes:,} syllables: {len(train)} for training, "
          f"{len(test)} held out ({', '.join(TEST_FACES)}); "
          f"{len(faces) - len(train) - len(test)} left out as kin of a held-out face; {len(skipped)} left out (faces.json says why)")
    out = args.out or REPO / "benchmarks" / "data" / ("hangul" if args.classes == COUNT else f"hangul-{args.classes}")
    out.mkdir(parents=True, exist_ok=True)
    for name, split_faces, draws in (("test", test, 0), ("train", train, args.train_draws)):
        images = write_recordio(out / name, samples(split_faces, args.classes, args.size, draws, args.seed,
                                                    desc=f"{out / name}.rec"))
        print(f"{out / name}.rec: {images:,} images of {args.classes:,} classes")
    summary = {"classes": args.classes, "size": args.size, "train_draws": args.train_draws, "seed": args.seed,
               "train_faces": [face.name for face in train], "test_faces": [face.name for face in test],
               "kin_of_test_faces": [face.name for face in faces if face.family in held_out_families
                                     and face not in test],
               "not_drawing_them_all": skipped}
    (out / "faces.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
