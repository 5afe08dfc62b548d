"""A generated classification task with families of confusable classes.

Every sample is computed on the fly from its index with a counter-based Gaussian generator,
so a task with a million classes costs no memory or disk beyond one batch, and every rank,
worker and run sees exactly the same data.

Classes come in families of ``family_size`` consecutive ids. A family has a centre far from
the others; the classes of a family sit close around it (each other's hard negatives)::

    centre(c) = family_centre(c // family_size) + family_spread * offset(c)
    x_i       = centre(i % num_classes) + noise * z_i

with ``family_centre``, ``offset`` and ``z`` independent standard Gaussian vectors drawn from
(seed, kind, id). The ``"train"`` and ``"test"`` splits share the class centres and draw ``z``
from independent streams, so ``"test"`` is a held-out set of the same classes.

Defaults (tuned for ``input_dim=64``): ``family_spread=0.15``, ``noise=0.5``. Entries of x
then have variance 1 + 0.15² + 0.5² ≈ 1.27; two classes of one family are
0.15·√(2·64) ≈ 1.7 apart, about 3.4 noise standard deviations, two families about 11.
The nearest-centre rule (Bayes-optimal here) is right on about 80 % of the test samples
with 1000 classes, its errors almost all within the family: hard, yet learnable.

Example::

    from torch.utils.data import DataLoader
    from hybridfc.data import SyntheticClasses

    train = SyntheticClasses(num_classes=1_000_000, samples_per_class=50)
    x, y = next(iter(DataLoader(train, batch_size=256, shuffle=True)))
    # x: (256, 64) float32, y: (256,) int64
"""

import math
import operator

import torch
from torch import Tensor
from torch.utils.data import Dataset

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB
_DIM_SALT = 0x5851F42D4C957F2D

_FAMILY, _OFFSET, _NOISE = 1, 2, 3
_SPLITS = {"train": 0, "test": 1}


def _signed(value: int) -> int:
    """The int64 that has the same 64 bits as ``value``."""
    value &= _MASK64
    return value - (1 << 64) if value >> 63 else value


def mix64(value: int) -> int:
    """splitmix64's finalizer on a Python int, as an unsigned 64-bit value."""
    z = value & _MASK64
    z = ((z ^ (z >> 30)) * _MUL1) & _MASK64
    z = ((z ^ (z >> 27)) * _MUL2) & _MASK64
    return z ^ (z >> 31)


def _shr(z: Tensor, bits: int) -> Tensor:
    """Logical right shift of the 64-bit patterns in an int64 tensor."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def mix64_tensor(z: Tensor) -> Tensor:
    """splitmix64's finalizer on int64 bit patterns; int64 products wrap modulo 2**64."""
    z = (z ^ _shr(z, 30)) * _signed(_MUL1)
    z = (z ^ _shr(z, 27)) * _signed(_MUL2)
    return z ^ _shr(z, 31)


def stream_key(*parts: int) -> int:
    """A 64-bit key for a random stream, hashed from integer parts such as (seed, kind)."""
    key = 0
    for part in parts:
        key = mix64(key ^ mix64(part + _GOLDEN))
    return _signed(key)


def gaussian(key: int | Tensor, rows: Tensor, dim: int) -> Tensor:
    """Standard normals (n, dim) float32 for rows (n,) and a key, an int or one per row (n,).

    Entry (i, j) depends only on (key[i], rows[i], j): it hashes them to 64 bits, splits
    these into two 32-bit uniforms and applies Box–Muller.
    """
    row_hash = mix64_tensor(rows.to(torch.int64) * _signed(_GOLDEN) + key)
    col_hash = mix64_tensor(torch.arange(dim, dtype=torch.int64) * _signed(_GOLDEN) + _DIM_SALT)
    bits = mix64_tensor(row_hash[:, None] ^ col_hash[None, :])
    u1 = (_shr(bits, 32) + 1).to(torch.float32) * 2.0**-32
    u2 = (bits & 0xFFFFFFFF).to(torch.float32) * 2.0**-32
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _non_negative_float(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    return float(value)


class SyntheticClasses(Dataset):
    """``num_classes * samples_per_class`` samples; item i is (x (input_dim,) float32, label).

    The label of item i is ``i % num_classes`` (int64), so every class has exactly
    ``samples_per_class`` samples. ``__getitems__`` generates a whole batch in a few tensor
    operations; ``__getitem__`` is the same code on one index.
    """

    def __init__(
        self,
        num_classes: int,
        samples_per_class: int,
        input_dim: int = 64,
        family_size: int = 8,
        family_spread: float = 0.15,
        noise: float = 0.5,
        seed: int = 0,
        split: str = "train",
    ) -> None:
        self.num_classes = _positive_int("num_classes", num_classes)
        self.samples_per_class = _positive_int("samples_per_class", samples_per_class)
        self.input_dim = _positive_int("input_dim", input_dim)
        self.family_size = _positive_int("family_size", family_size)
        self.family_spread = _non_negative_float("family_spread", family_spread)
        self.noise = _non_negative_float("noise", noise)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        self.seed = seed
        self.split = split
        self._family_key = stream_key(seed, _FAMILY)
        self._offset_key = stream_key(seed, _OFFSET)
        self._noise_key = stream_key(seed, _NOISE, _SPLITS[split])

    def __len__(self) -> int:
        return self.num_classes * self.samples_per_class

    def _draw(self, streams: list[tuple[int, Tensor]]) -> list[Tensor]:
        """Gaussians (len(rows), input_dim) for each (key, rows), made in one pass."""
        keys = torch.cat([torch.full_like(rows, key) for key, rows in streams])
        rows = torch.cat([rows for _, rows in streams])
        return list(gaussian(keys, rows, self.input_dim).split([len(r) for _, r in streams]))

    def _centre_streams(self, ids: Tensor) -> list[tuple[int, Tensor]]:
        families = torch.div(ids, self.family_size, rounding_mode="floor")
        return [(self._family_key, families), (self._offset_key, ids)]

    def centres(self, ids: Tensor) -> Tensor:
        """Class centres (len(ids), input_dim) float32 for class ids (n,)."""
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_classes):
            raise ValueError(f"class ids must lie in [0, {self.num_classes})")
        family, offset = self._draw(self._centre_streams(ids))
        return family + self.family_spread * offset

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Samples of the given indices (n,): x (n, input_dim) float32, y (n,) int64.

        Negative indices count from the end, as for a list.
        """
        n = len(self)
        index = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if index.numel() and (int(index.min()) < -n or int(index.max()) >= n):
            raise IndexError(f"index out of range for a dataset of {n} samples")
        index = torch.where(index < 0, index + n, index)
        labels = index % self.num_classes
        family, offset, z = self._draw(self._centre_streams(labels) + [(self._noise_key, index)])
        return family + self.family_spread * offset + self.noise * z, labels

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """One sample: x (input_dim,) float32, y () int64."""
        x, y = self.batch(torch.tensor([operator.index(index)]))
        return x[0], y[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, Tensor]]:
        """The samples of a batch, generated together, as the list default_collate stacks."""
        x, y = self.batch(torch.tensor(indices, dtype=torch.int64))
        return list(zip(x.unbind(0), y.unbind(0)))


def nearest_mean_accuracy(train: SyntheticClasses, test: SyntheticClasses, chunk: int = 4096) -> float:
    """The data's own ceiling: the share of ``test`` that the nearest training-mean rule gets right
    (each sample goes to the class whose ``train`` samples' mean is nearest in input space).

    It learns nothing, and with few samples per class nothing does much better: the classes
    are Gaussians of one covariance, so the best rule compares distances to the class centres,
    and the training means are what the data says of them (shrinking them toward their family's
    mean gains about 0.3 points at 16 samples per class). The true centres' rule is higher, but
    no learner sees the true centres. It costs ``len(test) x num_classes x input_dim`` multiply-adds
    and ``len(train) x input_dim`` floats: about 4 s for 10,000 classes x 16 samples on one core.
    """
    classes = ("num_classes", "input_dim", "family_size", "family_spread", "seed")
    if any(getattr(test, name) != getattr(train, name) for name in classes):
        raise ValueError(f"test must hold the same classes as train (the same {', '.join(classes)})")
    x, y = train.batch(torch.arange(len(train)))
    means = torch.zeros(train.num_classes, train.input_dim).index_add_(0, y, x) / train.samples_per_class
    correct = 0
    for begin in range(0, len(test), chunk):
        x, y = test.batch(torch.arange(begin, min(begin + chunk, len(test))))
        correct += int((torch.cdist(x, means).argmin(dim=1) == y).sum())
    return correct / len(test)
