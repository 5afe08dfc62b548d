"""Top-k sparsified gradients with error feedback (``hybridfc.compression``), on 1–4 gloo ranks,
against float64 single-process sums of fresh random gradients."""

from __future__ import annotations

import pytest
import torch

from distributed import run_distributed
from hybridfc.compression import TopKGradientReducer, density_at, largest_magnitudes
from hybridfc.compression.topk import SAMPLE_SIZE
from hybridfc.config import ConfigError, parse_hybridfc_section
from hybridfc.parallel import StatsCursor, all_reduce, sparse_sum, wire
from hybridfc.plan import backbone_gradient_exchange

SHAPES = [(7, 5), (13,), (3, 4, 2)]
NUMEL = sum(torch.Size(shape).numel() for shape in SHAPES)


def rank_gradients(seed: int, step: int, rank: int, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """Rank ``rank``'s gradients at ``step``: a few tensors, magnitudes spread over decades."""
    generator = torch.Generator().manual_seed(seed * 100_003 + step * 101 + rank)
    return [(torch.randn(shape, generator=generator, dtype=torch.float64)
             * torch.exp(2 * torch.randn(shape, generator=generator, dtype=torch.float64))).to(dtype)
            for shape in SHAPES]


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


@pytest.mark.parametrize("n, k", [(50, 7), (300_000, 3_000), (300_000, 30), (1_000_003, 10_000), (250_000, 100_000)])
def test_largest_magnitudes_is_the_exact_top_k(n, k):
    values = torch.randn(n, generator=torch.Generator().manual_seed(n + k)) * torch.rand(n) ** 3
    chosen = largest_magnitudes(values, k)
    assert chosen.numel() == k and chosen.unique().numel() == k
    expected = torch.topk(values.abs(), k).values
    assert torch.equal(values.abs()[chosen].sort(descending=True).values, expected)


def test_largest_magnitudes_when_the_sample_misses_the_tail():
    """The large entries sit between the sampled positions: the threshold read off the sample
    keeps fewer than k candidates, and the exact top-k over everything is taken instead."""
    n = 4 * SAMPLE_SIZE
    values = torch.full((n,), 1e-3)
    stride = n // SAMPLE_SIZE
    tail = torch.arange(1, n, stride)[:500]
    values[tail] = torch.linspace(1.0, 2.0, tail.numel())
    chosen = largest_magnitudes(values, 400)
    assert set(chosen.tolist()) == set(tail[-400:].tolist())


def test_largest_magnitudes_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be"):
        largest_magnitudes(torch.ones(5), 0)
    with pytest.raises(ValueError, match="k must be"):
        largest_magnitudes(torch.ones(5), 6)


def test_density_warms_up_geometrically_from_dense():
    assert density_at(0, 0.01, 100) == 1.0
    assert density_at(50, 0.01, 100) == pytest.approx(0.1)
    assert density_at(100, 0.01, 100) == 0.01
    assert density_at(10**6, 0.01, 100) == 0.01
    assert density_at(0, 0.01, 0) == 0.01
    steps = [density_at(s, 0.001, 40) for s in range(41)]
    assert all(a > b for a, b in zip(steps, steps[1:]))


def _full_density_sums(rank, world_size, dtype):
    """Every entry sent as a pair, against the dense all-reduce of the same values."""
    values = flat(rank_gradients(3, 0, rank)).to(dtype)
    indices = torch.randperm(NUMEL, generator=torch.Generator().manual_seed(rank)).to(torch.int32)
    sparse = sparse_sum(indices, values[indices.long()], NUMEL, dtype=dtype)
    dense = all_reduce(values.clone())
    return sparse, dense


def test_all_pairs_equal_the_dense_all_reduce_bitwise_on_two_ranks():
    for sparse, dense in run_distributed(_full_density_sums, 2, args=(torch.float32,)):
        assert torch.equal(sparse, dense)


def test_all_pairs_equal_the_dense_all_reduce_in_float64_on_three_ranks():
    results = run_distributed(_full_density_sums, 3, args=(torch.float64,))
    for sparse, dense in results:
        assert float((sparse - dense).abs().max()) <= 1e-12 * float(dense.abs().max())
        assert torch.equal(sparse, results[0][0])


def _error_feedback_run(rank, world_size, seed, density, warmup, value_dtype, steps):
    """``steps`` exchanges; what was applied each step, the dense average, the final residual."""
    reducer = TopKGradientReducer(NUMEL, density, warmup, value_dtype, dtype=torch.float64)
    cursor = StatsCursor()
    applied, pairs = [], []
    for step in range(steps):
        pairs.append(reducer.pairs())
        gradients = rank_gradients(seed, step, rank)
        reducer.reduce(gradients)
        applied.append(flat(gradients))
    return {"applied": torch.stack(applied), "residual": reducer.residual.clone(), "pairs": pairs,
            "sent": cursor.take().by_kind}


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_applied_plus_residual_equals_the_dense_sum(world_size):
    """Momentum correction off: the sum of the applied gradients plus the mean of the residuals
    is the sum of the dense averaged gradients (float64, 50 steps, a warm-up, fresh gradients);
    every rank applied the same bits. One rank sends nothing either way, so it keeps no residual."""
    steps, seed = 50, 10 + world_size
    results = run_distributed(_error_feedback_run, world_size, args=(seed, 0.05, 10, torch.float64, steps))
    dense = sum(sum(flat(rank_gradients(seed, step, rank)) for rank in range(world_size)) / world_size
                for step in range(steps))
    applied = results[0]["applied"].sum(0)
    residual = sum(r["residual"] for r in results) / world_size
    assert float((applied + residual - dense).abs().max()) <= 1e-12 * float(dense.abs().max())
    assert (float(residual.abs().max()) > 0) == (world_size > 1)
    for result in results[1:]:
        assert torch.equal(result["applied"], results[0]["applied"])


def _bf16_gradients(rank, world_size, steps):
    reducer = TopKGradientReducer(NUMEL, 0.2)
    applied = torch.zeros(NUMEL, dtype=torch.float64)
    for step in range(steps):
        gradients = rank_gradients(6, step, rank, torch.bfloat16)
        reducer.reduce(gradients)
        applied += flat(gradients).double()
    return applied, reducer.residual.double()


def test_bf16_gradients_keep_the_rounding_of_the_average_in_the_residual():
    """bf16 gradients (ZeRO-0 bf16): the fp32 average is rounded into them; that rounding stays in
    every rank's residual, so applied + mean residual is still the dense sum (to fp32 rounding)."""
    results = run_distributed(_bf16_gradients, 2, args=(10,))
    dense = sum(flat(rank_gradients(6, step, rank, torch.bfloat16)).double() for step in range(10) for rank in range(2)) / 2
    total = results[0][0] + (results[0][1] + results[1][1]) / 2
    assert float((total - dense).abs().max()) <= 1e-5 * float(dense.abs().max())


def _fp16_values(rank, world_size):
    reducer = TopKGradientReducer(4, 0.25, value_dtype=torch.float16)
    gradients = [torch.tensor([1e6, 1.0, -2.0, 3.0])]
    reducer.reduce(gradients)
    return gradients[0], reducer.residual


def test_fp16_values_are_clamped_to_their_range():
    """An entry beyond fp16's range goes out as 65504 and the excess stays in the residual."""
    for applied, residual in run_distributed(_fp16_values, 2):
        assert applied.tolist() == [65504.0, 0.0, 0.0, 0.0]
        assert residual.tolist() == [1e6 - 65504.0, 1.0, -2.0, 3.0]


def test_low_precision_values_keep_their_rounding_in_the_residual():
    """bf16 on the wire: what rounding took off a value stays in the residual, so the sum still holds."""
    steps, seed = 20, 4
    results = run_distributed(_error_feedback_run, 2, args=(seed, 0.1, 0, torch.bfloat16, steps))
    dense = sum(sum(flat(rank_gradients(seed, step, rank)) for rank in range(2)) / 2 for step in range(steps))
    total = results[0]["applied"].sum(0) + (results[0]["residual"] + results[1]["residual"]) / 2
    assert float((total - dense).abs().max()) <= 1e-12 * float(dense.abs().max())


def test_pairs_follow_the_warm_up_and_go_dense_where_pairs_cost_more():
    """4 ranks, fp32 values: pairs pay below a density of 1/4; the exchange is dense before
    that point of the warm-up, then an all-gather of (index, value) pairs of the counted bytes."""
    results = run_distributed(_error_feedback_run, 4, args=(0, 0.02, 8, torch.float32, 12))
    pairs = results[0]["pairs"]
    expected = [max(1, round(density_at(s, 0.02, 8) * NUMEL)) for s in range(12)]
    dense_steps = [s for s in range(12) if expected[s] * 4 * 8 >= 8 * NUMEL]
    assert [s for s in range(12) if pairs[s] == NUMEL] == dense_steps and dense_steps == [0, 1, 2]
    sent = results[0]["sent"]
    assert sent["all_reduce"].calls == len(dense_steps)
    assert sent["sparse_all_reduce"].calls == 12 - len(dense_steps)
    assert sent["sparse_all_reduce"].bytes_sent == sum(wire.sparse_all_reduce_bytes(pairs[s], 4, 4)
                                                       for s in range(12) if s not in dense_steps)


def _momentum_corrected(rank, world_size, momentum, density):
    reducer = TopKGradientReducer(NUMEL, density, momentum=momentum, dtype=torch.float64, value_dtype=torch.float64)
    applied = []
    for step in range(2):
        gradients = rank_gradients(1, step, rank)
        reducer.reduce(gradients)
        applied.append(flat(gradients))
    return applied, reducer.velocity.clone()


def test_momentum_correction_is_momentum_sgd_when_sent_dense():
    """Sent dense (density 1), nothing is masked: step 2 applies the mean of m·g1 + g2."""
    applied, velocity = run_distributed(_momentum_corrected, 2, args=(0.9, 1.0))[0]
    g = [[flat(rank_gradients(1, step, rank)) for rank in range(2)] for step in range(2)]
    assert torch.allclose(applied[0], (g[0][0] + g[0][1]) / 2, rtol=0, atol=1e-12)
    assert torch.allclose(applied[1], (0.9 * (g[0][0] + g[0][1]) + g[1][0] + g[1][1]) / 2, rtol=0, atol=1e-12)
    assert torch.allclose(velocity, 0.9 * g[0][0] + g[1][0], rtol=0, atol=1e-12)


def test_momentum_correction_masks_what_was_sent_as_pairs():
    """Sent as pairs, the momentum of the entries sent is cleared (DGC's factor masking) and the
    rest keeps accumulating."""
    applied, velocity = run_distributed(_momentum_corrected, 2, args=(0.9, 0.1))[0]
    cleared = velocity == 0
    assert int(cleared.sum()) == round(0.1 * NUMEL)
    assert bool((applied[1][cleared] != 0).all())


def test_reducer_state_round_trip():
    reducer = TopKGradientReducer(NUMEL, 0.2, 5, momentum=0.5)
    for step in range(3):
        reducer.reduce(rank_gradients(2, step, 0, torch.float32))
    restored = TopKGradientReducer(NUMEL, 0.2, 5, momentum=0.5)
    restored.load_state_dict(reducer.state_dict())
    assert torch.equal(restored.residual, reducer.residual) and torch.equal(restored.velocity, reducer.velocity)
    assert restored.steps == 3 and restored.pairs() == reducer.pairs()
    with pytest.raises(ValueError, match="residual has"):
        TopKGradientReducer(NUMEL + 1, 0.2).load_state_dict(reducer.state_dict())


def test_poison_leaves_the_residual():
    reducer = TopKGradientReducer(NUMEL, 0.2)
    reducer.reduce(rank_gradients(5, 0, 0, torch.float32))
    before = reducer.residual.clone()
    gradients = rank_gradients(5, 1, 0, torch.float32)
    reducer.poison(gradients)
    assert all(bool(g.isnan().all()) for g in gradients)
    assert torch.equal(reducer.residual, before) and reducer.steps == 1


@pytest.mark.parametrize("value, fragment", [
    (0, "hybridfc.communication.grad_topk"), (1.5, "hybridfc.communication.grad_topk"),
    (-0.1, "hybridfc.communication.grad_topk"), ("0.01", "hybridfc.communication.grad_topk"),
])
def test_bad_density_names_the_key(value, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_hybridfc_section({"num_classes": 10, "embedding_size": 4, "communication": {"grad_topk": value}})


@pytest.mark.parametrize("key, value", [("grad_topk_value_dtype", "int8"), ("grad_topk_warmup_steps", -1),
                                        ("grad_topk_momentum_correction", "yes")])
def test_bad_companion_keys_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"hybridfc.communication.{key}"):
        parse_hybridfc_section({"num_classes": 10, "embedding_size": 4,
                                "communication": {"grad_topk": 0.01, key: value}})


@pytest.mark.parametrize("world_size, saving", [(2, 50.0), (4, 25.0)])
def test_plan_models_top_k_against_dense(world_size, saving):
    exchange = backbone_gradient_exchange(8_800_000, world_size, 0.01)
    assert exchange.saving == pytest.approx(saving)
    assert exchange.break_even_density == pytest.approx(1 / world_size)


def test_plan_sends_dense_where_top_k_stops_paying():
    exchange = backbone_gradient_exchange(8_800_000, 100, 0.01)
    assert exchange.topk == exchange.dense and exchange.break_even_density == pytest.approx(0.02 / 2)
    assert backbone_gradient_exchange(8_800_000, 100, 0.001).saving == pytest.approx(10.0)
