"""``imprint`` against a float64 single-process reference: each seen class's row is the mean of
its samples' normalised features, every other row keeps its initial value.

One ``run_distributed`` call per world size (1-4) imprints a float64 head and an fp32 head on
every rank; each rank has its own batches (their number differs between ranks, one batch is
empty) and some classes are never seen. 37 classes are never divisible by the world size.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from distributed import RankFailed, run_distributed
from hybridfc import ClassParallelFC
from hybridfc.head.imprint import imprint
from hybridfc.head.validation import InputError

WORLD_SIZES = (1, 2, 3, 4)
TIMEOUT = 180.0
NUM_CLASSES = 37
WIDTH = 6
INPUT_WIDTH = 10
HEAD_SEED, EMBED_SEED = 3, 11
BATCH_SIZES = ((5, 3, 6), (4, 0, 6, 2, 5), (7, 2), (1, 5, 3))  # per rank: rank 1 has the most batches
SEEN_CLASSES = torch.tensor([c for c in range(NUM_CLASSES) if c % 4 != 1])
FLOAT64 = dict(rtol=0, atol=1e-12)
FP32 = dict(rtol=0, atol=1e-6)


def make_embed() -> nn.Module:
    """The same fixed random linear map ``(b, 10)`` -> ``(b, 6)``, float64, in every process."""
    torch.manual_seed(EMBED_SEED)
    return nn.Linear(INPUT_WIDTH, WIDTH, bias=False).double()


def make_head(dtype: torch.dtype) -> ClassParallelFC:
    """This rank's shard, cast to ``dtype`` (the storage dtypes stop at fp32; ``.double()`` does not)."""
    return ClassParallelFC(NUM_CLASSES, WIDTH, group=None, seed=HEAD_SEED).to(dtype)


def rank_batches(world_size: int, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank ``rank``'s batches ``(x (b, 10) float64, y (b,) int64)``, labels among ``SEEN_CLASSES``."""
    generator = torch.Generator().manual_seed(100 * world_size + rank)
    batches = []
    for size in BATCH_SIZES[rank]:
        x = torch.randn(size, INPUT_WIDTH, dtype=torch.float64, generator=generator)
        y = SEEN_CLASSES[torch.randint(len(SEEN_CLASSES), (size,), generator=generator)]
        batches.append((x, y))
    return batches


def reference_rows(world_size: int) -> tuple[torch.Tensor, int]:
    """The imprinted ``(C, d)`` float64 weight of one process holding every rank's batches, and
    the number of classes seen."""
    weight = ClassParallelFC(NUM_CLASSES, WIDTH, seed=HEAD_SEED).weight.detach().double()
    batches = [batch for rank in range(world_size) for batch in rank_batches(world_size, rank)]
    labels = torch.cat([y for _, y in batches])
    with torch.no_grad():
        features = F.normalize(make_embed()(torch.cat([x for x, _ in batches])), dim=1)
    seen = labels.unique()
    for label in seen:
        weight[label] = features[labels == label].mean(0)
    return weight, seen.numel()


def _imprint_worker(rank: int, world_size: int) -> dict:
    out = {}
    for name, dtype in (("float64", torch.float64), ("fp32", torch.float32)):
        head = make_head(dtype)
        count = imprint(head, make_embed(), iter(rank_batches(world_size, rank)))
        out[name] = {"rows": head.weight.detach(), "count": count}
    return out


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda n: f"world{n}")
def run(request):
    """``(world_size, [what each rank returned])``, one spawn per world size."""
    return request.param, run_distributed(_imprint_worker, request.param, timeout=TIMEOUT)


def test_float64_rows_equal_the_reference(run):
    """Seen classes get their mean normalised feature, unseen ones keep their rows (1e-12)."""
    world_size, results = run
    expected, seen = reference_rows(world_size)
    assert seen < NUM_CLASSES
    assert_close(torch.cat([r["float64"]["rows"] for r in results]), expected, **FLOAT64)


def test_fp32_rows_equal_the_reference(run):
    world_size, results = run
    expected, _ = reference_rows(world_size)
    rows = torch.cat([r["fp32"]["rows"] for r in results])
    assert rows.dtype == torch.float32
    assert_close(rows.double(), expected, **FP32)


def test_unseen_rows_keep_their_initial_values(run):
    _, results = run
    initial = ClassParallelFC(NUM_CLASSES, WIDTH, seed=HEAD_SEED).weight.detach()
    unseen = torch.tensor([c for c in range(NUM_CLASSES) if c % 4 == 1])
    assert torch.equal(torch.cat([r["fp32"]["rows"] for r in results])[unseen], initial[unseen])


def test_every_rank_returns_the_number_of_seen_classes(run):
    world_size, results = run
    _, seen = reference_rows(world_size)
    assert [r[name]["count"] for r in results for name in ("float64", "fp32")] == [seen] * 2 * world_size


def _bad_label_worker(rank: int, world_size: int) -> int:
    batches = rank_batches(world_size, rank)
    if rank == 1:  # in its last batch, when the other ranks are out of batches
        x, y = batches[-1]
        batches[-1] = (x, torch.cat([y[:-1], torch.tensor([NUM_CLASSES + 3])]))
    return imprint(make_head(torch.float64), make_embed(), batches)


def test_a_bad_label_on_one_rank_raises_on_every_rank():
    results = run_distributed(_bad_label_worker, 3, timeout=TIMEOUT, allow_errors=True)
    for result in results:
        assert isinstance(result, RankFailed)
        assert "InputError" in str(result) and "rank 1: label 40 is out of range [0, 37)" in str(result)


def _non_finite_worker(rank: int, world_size: int) -> int:
    batches = rank_batches(world_size, rank)
    if rank == 0:
        batches[0][0][1, 2] = float("nan")
    return imprint(make_head(torch.float64), make_embed(), batches)


def test_non_finite_features_on_one_rank_raise_on_every_rank():
    results = run_distributed(_non_finite_worker, 2, timeout=TIMEOUT, allow_errors=True)
    for result in results:
        assert isinstance(result, RankFailed)
        assert "rank 0: embed returned non-finite features" in str(result)


def test_single_process_without_torch_distributed():
    """Without ``init_process_group`` the one shard holds every class: same rows as the reference."""
    head = make_head(torch.float64)
    assert imprint(head, make_embed(), rank_batches(1, 0)) == reference_rows(1)[1]
    assert_close(head.weight.detach(), reference_rows(1)[0], **FLOAT64)
    assert head.weight.requires_grad


def test_single_process_negative_label_raises_naming_it():
    head = make_head(torch.float64)
    before = head.weight.detach().clone()
    with pytest.raises(InputError, match=r"label -1 is out of range \[0, 37\)"):
        imprint(head, make_embed(), [(torch.zeros(2, INPUT_WIDTH, dtype=torch.float64), torch.tensor([3, -1]))])
    assert torch.equal(head.weight.detach(), before)
