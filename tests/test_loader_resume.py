"""A loader given a saved position continues the same global sample order, on any rank count."""

from __future__ import annotations

import pytest
from torch.utils.data import Dataset

from hybridfc.data import DistributedLoader

SAMPLES = 103


class Indices(Dataset):
    """Sample i is i."""

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> int:
        return index


def global_order(loaders: list[DistributedLoader], steps: int) -> list[int]:
    """The samples the ranks' loaders hand out over ``steps`` steps, step by step, in the order
    of the epoch's permutation (rank r holds every world_size-th sample of a step from r)."""
    order, iterators = [], [iter(loader) for loader in loaders]
    for _ in range(steps):
        batches = [next(it).tolist() for it in iterators]
        step = [None] * sum(map(len, batches))
        for rank, batch in enumerate(batches):
            step[rank::len(loaders)] = batch
        order += step
    return order


def ranks(world_size: int, batch_size: int) -> list[DistributedLoader]:
    return [DistributedLoader(Indices(), batch_size, rank=r, world_size=world_size, seed=4) for r in range(world_size)]


@pytest.mark.parametrize("world_size,batch_size", [(2, 8), (3, 5), (1, 16), (4, 4)])
def test_a_resumed_loader_continues_the_same_order_on_any_world_size(world_size, batch_size):
    expected = global_order(ranks(2, 8), 6)                  # 96 samples of epoch 0
    first = ranks(2, 8)
    before = global_order(first, 2)
    state = first[0].state_dict()
    assert state == {"epoch": 0, "samples": 32, "num_samples": SAMPLES, "seed": 4}
    resumed = ranks(world_size, batch_size)
    for loader in resumed:
        loader.load_state_dict(state)
    after = global_order(resumed, -(-32 // (world_size * batch_size)))
    assert before + after == expected[:len(before + after)]


def test_a_position_at_the_end_of_an_epoch_resumes_with_the_next_epoch():
    loader = DistributedLoader(Indices(), 64, rank=0, world_size=1, seed=4)
    for _ in loader:
        pass
    resumed = DistributedLoader(Indices(), 64, rank=0, world_size=1, seed=4)
    resumed.load_state_dict(loader.state_dict())
    assert resumed.epoch == 1
    loader_next = [b.tolist() for b in loader]
    assert [b.tolist() for b in resumed] == loader_next


def test_a_position_for_another_dataset_is_an_error():
    state = DistributedLoader(Indices(), 8, rank=0, world_size=1).state_dict()
    with pytest.raises(ValueError, match="for 103 samples and seed 0, this loader has 103 and seed 1"):
        DistributedLoader(Indices(), 8, rank=0, world_size=1, seed=1).load_state_dict(state)
