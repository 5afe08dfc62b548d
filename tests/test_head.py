"""ClassParallelFC against a float64 single-process full-softmax reference.

One ``run_distributed`` call per world size (1-4) runs every case inside its ranks and returns
what each rank saw (losses, ``weight.grad``, the embeddings' gradient, shards); the tests
compare that with :mod:`reference`, computed here in float64 on the same fresh random inputs.
The number of classes is never divisible by the world size.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

from distributed import run_distributed
from hybridfc import ClassParallelFC
from reference import random_batch, random_weight, rank_rows, reference_grads, reference_loss, use_small_tiles

WORLD_SIZES = (1, 2, 3, 4)
LOGITS = ("store", "recompute")
WIDTH = 8
TIMEOUT = 180.0
INIT_CLASSES = 5003  # prime, and more than one 4096-row init block
INIT_SEEDS = (0, 7)
FLOAT64 = dict(rtol=1e-10, atol=1e-12)
INSIGHTFACE_CEILING = -math.log(1e-30)  # 69.08: the loss of a probability clamped at 1e-30

MARGINS = {
    "softmax": {"type": "softmax"},
    "arcface": {"type": "arcface", "scale": 16.0, "margin": 0.5},
    "cosface": {"type": "cosface", "scale": 16.0, "margin": 0.35},
    "combined": {"type": "combined", "scale": 16.0, "m1": 0.9, "m2": 0.3, "m3": 0.2},  # never past π
    # m1·θ + m2 > π for θ > 0.53 rad: most targets take the fallback branch, the close ones do not
    "combined_fallback": {"type": "combined", "scale": 2.0, "m1": 1.2, "m2": 2.5, "m3": 0.1},
}
ARCFACE_64 = {"type": "arcface", "scale": 64.0, "margin": 0.5}


def num_classes(world_size: int) -> int:
    """5, 11, 17, 23: leaves world_size - 1 leftover rows."""
    return 6 * world_size - 1


def layouts(world_size: int) -> dict[str, tuple[int, ...]]:
    """Local batch sizes per rank: even, uneven with an empty rank, and an empty rank 0."""
    out = {"even": (3,) * world_size, "uneven": (5, 0, 2, 1)[:world_size]}
    if world_size > 1:
        out["rank0_empty"] = (0, 2, 4, 1)[:world_size]
    return out


@dataclass(frozen=True)
class Case:
    """One forward/backward of the head on fresh inputs drawn from ``seed``."""

    margin: dict
    sizes: tuple[int, ...]
    seed: int
    far: bool = False  # every sample points away from its class: a huge loss
    dtype: torch.dtype = torch.float64  # of the head's weight
    embedding_dtype: torch.dtype = torch.float64

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(W, E, Y)`` as the ranks see them, in float64 (rounded to the case's dtypes)."""
        classes = num_classes(len(self.sizes))
        weight = random_weight(classes, WIDTH, self.seed)
        embeddings, labels = random_batch(classes, WIDTH, sum(self.sizes), self.seed, weight=weight)
        if self.far:
            embeddings = -20 * weight[labels] + 0.1 * embeddings
        return (weight.to(self.dtype).double(), embeddings.to(self.embedding_dtype).double(), labels)


def cases(world_size: int) -> dict[str, Case]:
    """Every case run on ``world_size`` ranks, by name; each has its own seed."""
    out = {}
    for name, margin in MARGINS.items():
        for layout, sizes in layouts(world_size).items():
            out[f"{name}/{layout}"] = Case(margin, sizes, seed=1000 * world_size + len(out))
    uneven = layouts(world_size)["uneven"]
    extra = {
        "fp32": Case(MARGINS["arcface"], uneven, 0, dtype=torch.float32, embedding_dtype=torch.float32),
        "bf16": Case(MARGINS["arcface"], uneven, 0, dtype=torch.float32, embedding_dtype=torch.bfloat16),
        "huge/arcface64": Case(ARCFACE_64, uneven, 0, far=True),
        "huge/arcface64_fp32": Case(ARCFACE_64, uneven, 0, far=True, dtype=torch.float32,
                                    embedding_dtype=torch.float32),
        "huge/softmax": Case(MARGINS["softmax"], uneven, 0, far=True),
    }
    for name, case in extra.items():
        out[name] = dataclasses.replace(case, seed=1000 * world_size + len(out))
    return out


def accumulation_inputs(world_size: int):
    """``W`` and two micro-batches ``(E, Y, sizes)`` of the same global size."""
    classes, sizes = num_classes(world_size), layouts(world_size)["uneven"]
    weight = random_weight(classes, WIDTH, 900 + world_size)
    micro = []
    for k, micro_sizes in enumerate((sizes, sizes[::-1])):
        embeddings, labels = random_batch(classes, WIDTH, sum(micro_sizes), 910 + 10 * world_size + k, weight)
        micro.append((embeddings, labels, micro_sizes))
    return weight, micro


def make_head(weight: torch.Tensor, margin: dict, dtype: torch.dtype = torch.float64,
              logits: str = "auto") -> ClassParallelFC:
    """A head of ``len(weight)`` classes whose shard holds its rows of ``weight``."""
    head = ClassParallelFC(weight.shape[0], weight.shape[1], margin=margin, seed=1, logits=logits).to(dtype)
    with torch.no_grad():
        head.weight.copy_(weight[head.class_start : head.class_start + head.num_local])
    return head


def local_step(head, embeddings, labels, sizes, rank, dtype=torch.float64, loss_factor=1.0):
    """Forward and backward of this rank's rows; ``(loss, gradient of the embeddings)``."""
    rows = rank_rows(sizes, rank)
    local = embeddings[rows].to(dtype).requires_grad_()
    loss = head(local, labels[rows])
    (loss * loss_factor).backward()
    return loss.detach(), local.grad


def _run_case(case: Case, rank: int, logits: str) -> dict:
    weight, embeddings, labels = case.inputs()
    head = make_head(weight, case.margin, case.dtype, logits)
    loss, embedding_grad = local_step(head, embeddings, labels, case.sizes, rank, case.embedding_dtype)
    return {"loss": loss, "weight_grad": head.weight.grad, "embedding_grad": embedding_grad,
            "shard": (head.class_start, head.num_local)}


def _run_accumulation(rank: int, world_size: int, logits: str) -> dict:
    weight, micro = accumulation_inputs(world_size)
    head = make_head(weight, MARGINS["arcface"], logits=logits)
    steps = [local_step(head, e, y, sizes, rank, loss_factor=0.5) for e, y, sizes in micro]
    return {"losses": [loss for loss, _ in steps], "embedding_grads": [g for _, g in steps],
            "weight_grad": head.weight.grad}


def _head_worker(rank: int, world_size: int, logits: str) -> dict:
    use_small_tiles()
    return {
        "cases": {name: _run_case(case, rank, logits) for name, case in cases(world_size).items()},
        "accumulation": _run_accumulation(rank, world_size, logits),
        "init": {seed: ClassParallelFC(INIT_CLASSES, WIDTH, seed=seed).weight.detach() for seed in INIT_SEEDS},
    }


@pytest.fixture(scope="module", params=[(n, logits) for n in WORLD_SIZES for logits in LOGITS],
                ids=lambda param: f"world{param[0]}-{param[1]}")
def run(request):
    """``(world_size, [what each rank returned])``, one spawn per world size and logits mode, the
    logits in tiles of a few columns."""
    world_size, logits = request.param
    return world_size, run_distributed(_head_worker, world_size, args=(logits,), timeout=TIMEOUT)


def _margin_cases(world_size: int) -> dict[str, Case]:
    return {name: case for name, case in cases(world_size).items() if name.split("/")[0] in MARGINS}


def _rows_of(classes: int, world_size: int, rank: int) -> int:
    """How many rows rank ``rank`` should own: C // N, plus one on the C mod N lowest ranks."""
    return classes // world_size + (1 if rank < classes % world_size else 0)


def test_shard_layout_is_contiguous_with_leftover_rows_on_lowest_ranks(run):
    """Rank r owns [class_start, class_start + num_local), shards in rank order covering [0, C);
    the C mod N leftover rows go to the lowest ranks."""
    world_size, results = run
    start = 0
    for rank, result in enumerate(results):
        rows = _rows_of(num_classes(world_size), world_size, rank)
        assert result["cases"]["softmax/even"]["shard"] == (start, rows)
        assert result["cases"]["softmax/even"]["weight_grad"].shape == (rows, WIDTH)
        assert result["init"][0].shape == (_rows_of(INIT_CLASSES, world_size, rank), WIDTH)
        start += rows
    assert start == num_classes(world_size)


def test_initial_weights_do_not_depend_on_world_size(run):
    """The concatenated shards equal one process's full weight, bit for bit, for every seed."""
    world_size, results = run
    for seed in INIT_SEEDS:
        full = ClassParallelFC(INIT_CLASSES, WIDTH, seed=seed).weight.detach()
        assert torch.equal(torch.cat([r["init"][seed] for r in results]), full)


def test_initial_weights_depend_on_seed():
    """Different seeds give different rows, drawn with the documented std (0.01)."""
    first, second = (ClassParallelFC(INIT_CLASSES, WIDTH, seed=seed).weight.detach() for seed in INIT_SEEDS)
    assert not torch.equal(first, second)
    assert torch.equal(first, ClassParallelFC(INIT_CLASSES, WIDTH, seed=INIT_SEEDS[0]).weight.detach())
    assert float(first.std()) == pytest.approx(0.01, rel=0.05)


def test_loss_equals_reference_on_every_rank(run):
    """Every margin, every batch layout: each rank returns the full-softmax reference loss."""
    world_size, results = run
    for name, case in _margin_cases(world_size).items():
        loss, _, _ = reference_grads(*_reference_args(case))
        for rank, result in enumerate(results):
            assert_close(result["cases"][name]["loss"], loss, **FLOAT64, msg=f"{name}, rank {rank}")


def test_weight_gradient_equals_reference_rows(run):
    """``weight.grad`` of rank r is rows [class_start, class_start + num_local) of the reference dL/dW."""
    world_size, results = run
    for name, case in _margin_cases(world_size).items():
        _, _, weight_grad = reference_grads(*_reference_args(case))
        for rank, result in enumerate(results):
            start, rows = result["cases"][name]["shard"]
            assert_close(result["cases"][name]["weight_grad"], weight_grad[start : start + rows], **FLOAT64,
                         msg=f"{name}, rank {rank}")


def test_embedding_gradient_is_world_size_times_reference(run):
    """The gradient reaching rank r's embeddings is N · dL/dE of its rows (empty ranks get (0, d))."""
    world_size, results = run
    for name, case in _margin_cases(world_size).items():
        _, embedding_grad, _ = reference_grads(*_reference_args(case))
        for rank, result in enumerate(results):
            expected = world_size * embedding_grad[rank_rows(case.sizes, rank)]
            assert_close(result["cases"][name]["embedding_grad"], expected, **FLOAT64, msg=f"{name}, rank {rank}")
            if world_size > 1 and expected.numel():
                assert not torch.allclose(expected, embedding_grad[rank_rows(case.sizes, rank)])


def test_margin_inputs_reach_both_branches():
    """The test inputs put target cosines on both sides of each margin's fallback boundary,
    and the fallback changes the loss (so the comparisons above check it)."""
    for world_size in WORLD_SIZES:
        for margin_name, m1, m2 in (("combined_fallback", 1.2, 2.5), ("arcface", 1.0, 0.5)):
            for layout in layouts(world_size):
                case = cases(world_size)[f"{margin_name}/{layout}"]
                weight, embeddings, labels = case.inputs()
                cos = torch.nn.functional.cosine_similarity(embeddings, weight[labels], dim=1)
                fallback = m1 * torch.arccos(cos) + m2 > math.pi
                assert fallback.any() and not fallback.all(), (world_size, margin_name, layout)
        case = cases(world_size)["combined_fallback/even"]
        weight, embeddings, labels = case.inputs()
        with_fallback = reference_loss(embeddings, labels, weight, case.margin)
        assert abs(float(with_fallback - _loss_without_fallback(embeddings, labels, weight, case.margin))) > 1e-3


def _loss_without_fallback(embeddings, labels, weight, margin):
    """The combined-margin loss with cos(m1·θ + m2) - m3 applied to every target."""
    cos = torch.nn.functional.normalize(embeddings, dim=1) @ torch.nn.functional.normalize(weight, dim=1).t()
    target = torch.cos(margin["m1"] * torch.arccos(cos.gather(1, labels[:, None])) + margin["m2"]) - margin["m3"]
    return torch.nn.functional.cross_entropy(margin["scale"] * cos.scatter(1, labels[:, None], target), labels)


def test_fp32_is_close_to_float64(run):
    """An fp32 head on fp32 embeddings: fp32 loss and gradients close to the float64 reference."""
    world_size, results = run
    case = cases(world_size)["fp32"]
    loss, embedding_grad, weight_grad = reference_grads(*_reference_args(case))
    for rank, result in enumerate(results):
        got = result["cases"]["fp32"]
        start, rows = got["shard"]
        assert got["loss"].dtype == got["weight_grad"].dtype == got["embedding_grad"].dtype == torch.float32
        assert_close(got["loss"].double(), loss, rtol=1e-5, atol=0)
        assert_close(got["weight_grad"].double(), weight_grad[start : start + rows], rtol=1e-4, atol=1e-6)
        assert_close(got["embedding_grad"].double(), world_size * embedding_grad[rank_rows(case.sizes, rank)],
                     rtol=1e-4, atol=1e-6)


def test_bf16_embeddings_give_fp32_loss_and_bf16_gradient(run):
    """bf16 embeddings: the loss is fp32 (close to float64 on the same bf16 values, far closer
    than bf16 arithmetic could be) and the embeddings' gradient comes back in bf16."""
    world_size, results = run
    case = cases(world_size)["bf16"]
    loss, embedding_grad, weight_grad = reference_grads(*_reference_args(case))
    bf16_atol = 1e-2 * world_size * float(embedding_grad.abs().max())
    for rank, result in enumerate(results):
        got = result["cases"]["bf16"]
        start, rows = got["shard"]
        assert got["loss"].dtype == torch.float32
        assert got["embedding_grad"].dtype == torch.bfloat16
        assert_close(got["loss"].double(), loss, rtol=1e-5, atol=0)
        assert_close(got["weight_grad"].double(), weight_grad[start : start + rows], rtol=1e-4, atol=1e-6)
        expected = world_size * embedding_grad[rank_rows(case.sizes, rank)]
        assert_close(got["embedding_grad"].double(), expected, rtol=2e-2, atol=bf16_atol)


@pytest.mark.parametrize("name", ["huge/arcface64", "huge/arcface64_fp32", "huge/softmax"])
def test_huge_loss_is_not_clamped(run, name):
    """A loss far above insightface's 69.08 ceiling (probability clamped at 1e-30) is exact."""
    world_size, results = run
    case = cases(world_size)[name]
    loss, embedding_grad, weight_grad = reference_grads(*_reference_args(case))
    assert float(loss) > INSIGHTFACE_CEILING + 10
    weight_atol, embedding_atol = 1e-5 * weight_grad.abs().max(), 1e-5 * world_size * embedding_grad.abs().max()
    for rank, result in enumerate(results):
        got = result["cases"][name]
        start, rows = got["shard"]
        expected_weight_grad = weight_grad[start : start + rows]
        expected_embedding_grad = world_size * embedding_grad[rank_rows(case.sizes, rank)]
        if case.dtype == torch.float64:
            assert_close(got["loss"], loss, **FLOAT64)
            assert_close(got["weight_grad"], expected_weight_grad, **FLOAT64)
            assert_close(got["embedding_grad"], expected_embedding_grad, **FLOAT64)
        else:
            assert_close(got["loss"].double(), loss, rtol=1e-6, atol=0)
            assert_close(got["weight_grad"].double(), expected_weight_grad, rtol=1e-4, atol=float(weight_atol))
            assert_close(got["embedding_grad"].double(), expected_embedding_grad, rtol=1e-4,
                         atol=float(embedding_atol))


def test_gradient_accumulation_equals_double_batch(run):
    """Two micro-batches, each ``(loss / 2).backward()``: ``weight.grad`` is that of the double
    batch, and each micro-batch's embeddings get N · dL/dE of their rows in the double batch."""
    world_size, results = run
    weight, micro = accumulation_inputs(world_size)
    embeddings = torch.cat([e for e, _, _ in micro])
    labels = torch.cat([y for _, y, _ in micro])
    loss, embedding_grad, weight_grad = reference_grads(embeddings, labels, weight, MARGINS["arcface"])
    for rank, result in enumerate(results):
        got = result["accumulation"]
        start, rows = result["cases"]["arcface/even"]["shard"]
        assert_close(got["weight_grad"], weight_grad[start : start + rows], **FLOAT64)
        assert_close((got["losses"][0] + got["losses"][1]) / 2, loss, **FLOAT64)
        offset = 0
        for (_, _, sizes), grad in zip(micro, got["embedding_grads"]):
            rows_of_rank = rank_rows(sizes, rank)
            expected = world_size * embedding_grad[offset + rows_of_rank.start : offset + rows_of_rank.stop]
            assert_close(grad, expected, **FLOAT64)
            offset += sum(sizes)


def test_single_process_without_torch_distributed():
    """Without ``init_process_group`` the head is one shard of every class and matches the
    reference, with its own initial weights."""
    assert not dist.is_initialized()
    margin = MARGINS["cosface"]
    head = ClassParallelFC(7, WIDTH, margin=margin, seed=3).double()
    assert (head.world_size, head.rank, head.class_start, head.num_local) == (1, 0, 0, 7)
    weight = head.weight.detach().clone()
    embeddings, labels = random_batch(7, WIDTH, 6, seed=77, weight=weight)
    loss, embedding_grad = local_step(head, embeddings, labels, (6,), 0)
    expected_loss, expected_embedding_grad, expected_weight_grad = reference_grads(embeddings, labels, weight, margin)
    assert_close(loss, expected_loss, **FLOAT64)
    assert_close(head.weight.grad, expected_weight_grad, **FLOAT64)
    assert_close(embedding_grad, expected_embedding_grad, **FLOAT64)


def _reference_args(case: Case):
    """``(W, E, Y, margin)`` of a case for :func:`reference.reference_grads`."""
    weight, embeddings, labels = case.inputs()
    return embeddings, labels, weight, case.margin
