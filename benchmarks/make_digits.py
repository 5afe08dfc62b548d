"""Write the small real image set of ``bench_convergence.py --task digits``: the UCI optical
recognition of handwritten digits (E. Alpaydin, C. Kaynak; CC BY 4.0), 1,797 8x8 grey images of
10 digits written by 13 people, as shipped inside scikit-learn's wheel (``digits.csv.gz``: 64
pixels in 0..16 and the label per line).

    pip download --no-deps scikit-learn -d /tmp/wheel
    python benchmarks/make_digits.py /tmp/wheel/scikit_learn-*.whl      # or the digits.csv.gz itself

Output: ``benchmarks/data/digits/{train,test}.rec`` and ``.idx``, insightface's RecordIO layout
(``hybridfc.data.write_recordio``): every fifth image of each class held out (364), the rest
for training (1,433); pixels scaled to 0..255, grey stored as 3 equal channels (PNG).
"""

from __future__ import annotations

import argparse
import gzip
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MEMBER = "sklearn/datasets/data/digits.csv.gz"
HELD_OUT_EVERY = 5


def read_digits(source: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images (n, 8, 8) uint8 in 0..255, labels (n,) int64)`` from the wheel or the csv.gz."""
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            packed = wheel.read(MEMBER)
    else:
        packed = source.read_bytes()
    table = np.loadtxt(io.BytesIO(gzip.decompress(packed)), delimiter=",", dtype=np.int64)
    pixels, labels = table[:, :64], table[:, 64]
    images = np.round(pixels.reshape(-1, 8, 8) * (255 / 16)).astype(np.uint8)
    return images, labels


def split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and held-out images: every fifth of each class held out."""
    train, test = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        test.extend(members[::HELD_OUT_EVERY])
        train.extend(np.setdiff1d(members, members[::HELD_OUT_EVERY]))
    return np.array(sorted(train, key=lambda i: (labels[i], i))), np.array(sorted(test, key=lambda i: (labels[i], i)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="scikit-learn's wheel, or its digits.csv.gz")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "data" / "digits")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from hybridfc.data import write_recordio

    images, labels = read_digits(args.source)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, indices in zip(("train", "test"), split(labels)):
        count = write_recordio(args.out / name, ((np.repeat(images[i][:, :, None], 3, axis=2), int(labels[i]))
                                                 for i in indices))
        print(f"{args.out / name}.rec: {count} images of {len(np.unique(labels[indices]))} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
