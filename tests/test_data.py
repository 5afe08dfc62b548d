"""Tests of hybridfc.data: the generated task and the distributed loader."""

import random

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from hybridfc.data import DistributedLoader, SyntheticClasses, nearest_mean_accuracy
from hybridfc.data.synthetic import gaussian, mix64, mix64_tensor, stream_key


def _signed(value: int) -> int:
    return value - (1 << 64) if value >> 63 else value


class _Indices(Dataset):
    """Item i is i, so that a batch shows which indices it holds."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


def _rank_batches(n: int, world_size: int, batch_size: int, **kwargs) -> list[list[list[int]]]:
    """One epoch of every rank's batches, each batch as a list of indices."""
    loaders = [
        DistributedLoader(_Indices(n), batch_size, rank=r, world_size=world_size, **kwargs)
        for r in range(world_size)
    ]
    return [[batch.tolist() for batch in loader] for loader in loaders]


# --- SyntheticClasses ---------------------------------------------------------------------


def test_tensor_hash_matches_reference():
    rng = random.Random(0)
    values = [0, 1, -1, 2**63 - 1, -(2**63)] + [rng.randrange(-(2**63), 2**63) for _ in range(1000)]
    got = mix64_tensor(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [_signed(mix64(v & (2**64 - 1))) for v in values]


def test_gaussian_is_standard_normal():
    z = gaussian(stream_key(7, 1), torch.arange(4000), 64)
    assert z.shape == (4000, 64) and z.dtype == torch.float32
    assert abs(z.mean().item()) < 0.01
    assert abs(z.std().item() - 1.0) < 0.01
    assert abs((z[:, 0] * z[:, 1]).mean().item()) < 0.05
    assert abs((z[:-1, 0] * z[1:, 0]).mean().item()) < 0.05
    assert z.isfinite().all()


def test_length_labels_and_dtypes():
    ds = SyntheticClasses(num_classes=13, samples_per_class=3, input_dim=5)
    assert len(ds) == 39
    x, y = ds[17]
    assert x.shape == (5,) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.item() == 17 % 13
    _, labels = ds.batch(torch.arange(len(ds)))
    assert labels.dtype == torch.int64
    assert labels.tolist() == [i % 13 for i in range(39)]
    assert torch.bincount(labels).tolist() == [3] * 13


def test_same_arguments_give_same_data():
    a = SyntheticClasses(100, 5, seed=3)
    b = SyntheticClasses(100, 5, seed=3)
    idx = torch.randint(0, len(a), (64,))
    assert torch.equal(a.batch(idx)[0], b.batch(idx)[0])


def test_seed_and_split_change_the_data():
    idx = torch.arange(200)
    train = SyntheticClasses(100, 5, seed=3)
    test = SyntheticClasses(100, 5, seed=3, split="test")
    other = SyntheticClasses(100, 5, seed=4)
    ids = torch.arange(100)
    assert torch.equal(train.centres(ids), test.centres(ids))
    assert not torch.allclose(train.centres(ids), other.centres(ids))
    assert not torch.allclose(train.batch(idx)[0], test.batch(idx)[0])
    assert not torch.allclose(train.batch(idx)[0], other.batch(idx)[0])


def test_getitems_equals_stacked_getitem():
    ds = SyntheticClasses(50, 4, input_dim=16, seed=11)
    indices = [0, 199, 37, 37, 120, -1]
    batch = ds.__getitems__(indices)
    assert len(batch) == len(indices)
    for (x, y), i in zip(batch, indices):
        x1, y1 = ds[i]
        assert torch.equal(x, x1) and torch.equal(y, y1)


def test_default_collate_builds_batch_tensors():
    ds = SyntheticClasses(50, 4, input_dim=16)
    x, y = next(iter(DataLoader(ds, batch_size=32, shuffle=False)))
    assert x.shape == (32, 16) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.int64
    expected_x, expected_y = ds.batch(torch.arange(32))
    assert torch.equal(x, expected_x) and torch.equal(y, expected_y)


def test_index_out_of_range():
    ds = SyntheticClasses(10, 2)
    with pytest.raises(IndexError):
        ds[20]
    with pytest.raises(IndexError):
        ds.__getitems__([0, -21])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_classes": 0},
        {"samples_per_class": 0},
        {"input_dim": 0},
        {"family_size": 0},
        {"family_spread": -0.1},
        {"noise": float("nan")},
        {"seed": 1.5},
        {"split": "val"},
        {"num_classes": 2.0},
    ],
)
def test_invalid_arguments(kwargs):
    args = {"num_classes": 10, "samples_per_class": 2} | kwargs
    with pytest.raises(ValueError):
        SyntheticClasses(**args)


def test_invalid_class_ids():
    with pytest.raises(ValueError):
        SyntheticClasses(10, 2).centres(torch.tensor([10]))


def test_noise_statistics():
    ds = SyntheticClasses(200, 20, noise=0.5, seed=5)
    x, y = ds.batch(torch.arange(len(ds)))
    residual = x - ds.centres(y)
    assert abs(residual.mean().item()) < 0.01
    assert abs(residual.std().item() - 0.5) < 0.01
    assert x.abs().mean().item() < 2.0


def test_families_are_tight_and_far_apart():
    ds = SyntheticClasses(800, 1, family_size=8)
    centres = ds.centres(torch.arange(800))
    distances = torch.cdist(centres, centres)
    family = torch.arange(800) // 8
    same = family[:, None] == family[None, :]
    off_diagonal = ~torch.eye(800, dtype=torch.bool)
    within = distances[same & off_diagonal]
    between = distances[~same]
    assert within.max() < between.min()
    assert within.mean() < 0.25 * between.mean()


def test_nearest_centre_is_above_chance_but_not_perfect():
    held_out = SyntheticClasses(1000, 4, split="test", seed=1)
    x, y = held_out.batch(torch.arange(len(held_out)))
    prediction = torch.cdist(x, held_out.centres(torch.arange(1000))).argmin(dim=1)
    correct = prediction == y
    accuracy = correct.float().mean().item()
    assert 0.6 < accuracy < 0.95, accuracy
    same_family = (prediction // 8) == (y // 8)
    assert same_family[~correct].float().mean().item() > 0.95


# --- DistributedLoader --------------------------------------------------------------------

CASES = [
    (7, 2, 3),
    (5, 4, 1),
    (9, 4, 2),
    (1, 1, 1),
    (4, 4, 1),
    (8, 4, 2),
    (12, 4, 2),
    (10, 4, 2),
    (100, 3, 7),
    (101, 1, 10),
    (64, 2, 100),
    (37, 3, 4),
]


@pytest.mark.parametrize("n, world_size, batch_size", CASES)
@pytest.mark.parametrize("shuffle", [True, False])
def test_partition(n, world_size, batch_size, shuffle):
    per_rank = _rank_batches(n, world_size, batch_size, shuffle=shuffle, seed=2)
    steps = len(per_rank[0])
    assert all(len(batches) == steps for batches in per_rank)
    everything = [i for batches in per_rank for batch in batches for i in batch]
    assert sorted(everything) == list(range(n))
    merged = n > world_size * batch_size and 0 < n % (world_size * batch_size) < world_size
    for rank, batches in enumerate(per_rank):
        assert all(len(batch) >= 1 for batch in batches)
        assert all(len(batch) == batch_size for batch in batches[:-1])
        assert len(batches[-1]) <= batch_size + (1 if merged else 0)
        loader = DistributedLoader(_Indices(n), batch_size, rank=rank, world_size=world_size)
        assert len(loader) == steps
        assert loader.num_samples == sum(len(batch) for batch in batches)


def test_awkward_sizes_explicitly():
    assert [[len(b) for b in r] for r in _rank_batches(7, 2, 3)] == [[4], [3]]
    assert [[len(b) for b in r] for r in _rank_batches(5, 4, 1)] == [[2], [1], [1], [1]]
    assert [[len(b) for b in r] for r in _rank_batches(9, 4, 2)] == [[3], [2], [2], [2]]
    assert [[len(b) for b in r] for r in _rank_batches(10, 4, 2)] == [[3], [3], [2], [2]]
    assert [[len(b) for b in r] for r in _rank_batches(12, 4, 2)] == [[2, 1]] * 4


def test_shuffle_false_gives_sorted_order():
    per_rank = _rank_batches(23, 3, 2, shuffle=False)
    for rank, batches in enumerate(per_rank):
        assert [i for batch in batches for i in batch] == list(range(rank, 23, 3))


def test_epochs_reshuffle_and_repeat():
    loader = DistributedLoader(_Indices(50), 8, rank=1, world_size=2, seed=9)
    assert loader.epoch == 0
    epoch0 = [b.tolist() for b in loader]
    assert loader.epoch == 0
    epoch1 = [b.tolist() for b in loader]
    assert loader.epoch == 1
    assert epoch0 != epoch1
    loader.set_epoch(0)
    assert loader.epoch == 0
    assert [b.tolist() for b in loader] == epoch0
    again = DistributedLoader(_Indices(50), 8, rank=1, world_size=2, seed=9)
    assert [b.tolist() for b in again] == epoch0
    other_seed = DistributedLoader(_Indices(50), 8, rank=1, world_size=2, seed=10)
    assert [b.tolist() for b in other_seed] != epoch0


def test_ranks_share_the_permutation_every_epoch():
    loaders = [DistributedLoader(_Indices(30), 4, rank=r, world_size=3) for r in range(3)]
    for _ in range(3):
        seen = [i for loader in loaders for batch in loader for i in batch.tolist()]
        assert sorted(seen) == list(range(30))


def test_workers_give_the_same_batches():
    ds = SyntheticClasses(40, 3, input_dim=8)
    plain = DistributedLoader(ds, 16, rank=0, world_size=2, seed=4)
    workers = DistributedLoader(ds, 16, rank=0, world_size=2, seed=4, num_workers=2)
    for (x0, y0), (x1, y1) in zip(plain, workers, strict=True):
        assert x1.shape[1] == 8 and x1.dtype == torch.float32 and y1.dtype == torch.int64
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_defaults_without_process_group():
    loader = DistributedLoader(_Indices(10), 4)
    assert (loader.rank, loader.world_size, loader.batch_size) == (0, 1, 4)
    assert len(loader) == 3 and loader.num_samples == 10


def test_defaults_from_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        loader = DistributedLoader(_Indices(10), 4)
        assert (loader.rank, loader.world_size) == (dist.get_rank(), dist.get_world_size())
    finally:
        dist.destroy_process_group()


def test_too_small_dataset():
    with pytest.raises(ValueError, match="3 samples.*world_size=4"):
        DistributedLoader(_Indices(3), 2, rank=0, world_size=4)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": 0},
        {"batch_size": 2.5},
        {"world_size": 0},
        {"rank": 2, "world_size": 2},
        {"rank": -1, "world_size": 2},
    ],
)
def test_invalid_loader_arguments(kwargs):
    args = {"batch_size": 2} | kwargs
    with pytest.raises(ValueError):
        DistributedLoader(_Indices(10), **args)


def test_nearest_mean_accuracy_counts_the_test_samples_nearest_their_own_training_mean():
    train, test = SyntheticClasses(37, 5, input_dim=8, seed=3), SyntheticClasses(37, 3, input_dim=8, seed=3, split="test")
    xs, ys = zip(*(train[i] for i in range(len(train))))
    x, y = torch.stack(xs).double(), torch.stack(ys)
    means = torch.stack([x[y == c].mean(dim=0) for c in range(37)])
    right = sum(int(((means - xt.double()) ** 2).sum(dim=1).argmin()) == int(yt) for xt, yt in
                (test[i] for i in range(len(test))))
    assert nearest_mean_accuracy(train, test, chunk=10) == right / len(test)
    assert 0 < right < len(test)


def test_nearest_mean_accuracy_refuses_a_test_set_of_other_classes():
    with pytest.raises(ValueError, match="same classes"):
        nearest_mean_accuracy(SyntheticClasses(10, 2, seed=0), SyntheticClasses(10, 2, seed=1, split="test"))
