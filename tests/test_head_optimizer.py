"""The head optimizer (``build_head_optimizer``) against ``torch.optim.SGD`` on the full weight.

One ``run_distributed`` call per world size (1-3) runs every scenario; each rank returns its
shard after every step. Here one process replays the scenario with ``torch.optim.SGD`` on the
full float64 weight, fed with the reference gradients of the same fresh batches.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch.testing import assert_close

from distributed import run_distributed
from hybridfc import ClassParallelFC, ConfigError, build_head_optimizer
from reference import random_batch, random_weight, rank_rows, reference_grads, sgd_step

WORLD_SIZES = (1, 2, 3)
WIDTH = 8
TIMEOUT = 180.0
FLOAT64 = dict(rtol=1e-10, atol=1e-12)
MARGIN = {"type": "arcface", "scale": 16.0, "margin": 0.5}
PARAMS = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}
SPEC = {"type": "sgd", "params": PARAMS}
CLIP = 0.05
NEW_LR = 0.5
STEPS = 4
LARS = 0.02
SPARSE = {"type": "partial", "budget": 0.25}
SCENARIOS = ["plain", "accumulate", "clip", "lr_change", "step_lr", "resume", "lars", "lars_clip"]


def num_classes(world_size: int) -> int:
    """5, 11, 17: never divisible by the world size."""
    return 6 * world_size - 1


def batch(world_size: int, seed: int):
    """A fresh global batch ``(E, Y, sizes)`` with uneven local sizes (some rank may be empty)."""
    sizes = tuple(torch.randperm(world_size, generator=torch.Generator().manual_seed(seed)).add(1).tolist())
    sizes = tuple(0 if rank == seed % world_size and world_size > 1 else n for rank, n in enumerate(sizes))
    embeddings, labels = random_batch(num_classes(world_size), WIDTH, sum(sizes), seed)
    return embeddings, labels, sizes


def scenario_seed(world_size: int, scenario: str) -> int:
    """Seed of a scenario's initial weight; its steps' batches use the seeds just above."""
    return 10_000 * world_size + 100 * SCENARIOS.index(scenario)


def micro_batches(world_size: int, scenario: str, step: int):
    """The micro-batches of a step: two for "accumulate" (same global size), else one."""
    seed = scenario_seed(world_size, scenario) + 2 * step + 1
    first = batch(world_size, seed)
    if scenario != "accumulate":
        return [first]
    embeddings, labels = random_batch(num_classes(world_size), WIDTH, sum(first[2]), seed + 1)
    return [first, (embeddings, labels, first[2][::-1])]


def make_head(world_size: int, scenario: str) -> ClassParallelFC:
    """A float64 head whose shard holds its rows of the scenario's fresh random weight."""
    weight = random_weight(num_classes(world_size), WIDTH, scenario_seed(world_size, scenario))
    head = ClassParallelFC(weight.shape[0], WIDTH, margin=MARGIN, seed=5).double()
    with torch.no_grad():
        head.weight.copy_(weight[head.class_start : head.class_start + head.num_local])
    return head


def train_step(head, optimizer, rank, world_size, scenario, step) -> bool:
    """zero_grad, forward/backward of every micro-batch (loss divided by their count), step."""
    optimizer.zero_grad()
    micro = micro_batches(world_size, scenario, step)
    for embeddings, labels, sizes in micro:
        rows = rank_rows(sizes, rank)
        (head(embeddings[rows], labels[rows]) / len(micro)).backward()
    return optimizer.step()


def _run_scenario(rank: int, world_size: int, scenario: str) -> dict:
    head = make_head(world_size, scenario)
    spec = {"type": "sgd", "params": {**PARAMS, "lars_coefficient": LARS}} if scenario.startswith("lars") else SPEC
    optimizer = build_head_optimizer(head, spec, gradient_clipping=CLIP if scenario.endswith("clip") else 0.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5) if scenario == "step_lr" else None
    shards, applied, resumed = [], [], []
    for step in range(STEPS):
        if scenario == "lr_change" and step == 1:
            optimizer.param_groups[0]["lr"] = NEW_LR
        if scenario == "resume" and step == STEPS // 2:
            resumed_head, resumed_optimizer = _restore(head, optimizer)
        applied.append(train_step(head, optimizer, rank, world_size, scenario, step))
        if scenario == "resume" and step >= STEPS // 2:
            train_step(resumed_head, resumed_optimizer, rank, world_size, scenario, step)
            resumed.append(resumed_head.weight.detach().clone())
        if scheduler is not None:
            scheduler.step()
        shards.append(head.weight.detach().clone())
    return {"shards": shards, "applied": applied, "resumed": resumed,
            "final_lr": optimizer.param_groups[0]["lr"], "trust_ratio": optimizer.trust_ratio}


def _restore(head: ClassParallelFC, optimizer):
    """A new head and optimizer loaded from a serialised copy of the current weight and state."""
    buffer = io.BytesIO()
    torch.save({"weight": head.weight.detach(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    new_head = ClassParallelFC(head.num_classes, WIDTH, margin=MARGIN, seed=5).double()
    with torch.no_grad():
        new_head.weight.copy_(saved["weight"])
    new_optimizer = build_head_optimizer(new_head, SPEC)
    new_optimizer.load_state_dict(saved["optimizer"])
    return new_head, new_optimizer


def _optimizer_worker(rank: int, world_size: int) -> dict:
    return {scenario: _run_scenario(rank, world_size, scenario) for scenario in SCENARIOS}


def reference_trajectory(world_size: int, scenario: str, clip: float = 0.0, reset_state_at: int | None = None,
                         lars: float = 0.0):
    """Full weights after each step: ``torch.optim.SGD`` on the float64 weight, reference gradients;
    with ``lars`` each step's gradient and weight decay times LARS's trust ratio of the full weight and
    (clipped) gradient.

    Also returns the full gradient's norm before clipping at each step.
    """
    weight = random_weight(num_classes(world_size), WIDTH, scenario_seed(world_size, scenario)).requires_grad_()
    optimizer = torch.optim.SGD([weight], **PARAMS)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5) if scenario == "step_lr" else None
    trajectory, norms = [], []
    for step in range(STEPS):
        if scenario == "lr_change" and step == 1:
            optimizer.param_groups[0]["lr"] = NEW_LR
        if step == reset_state_at:
            optimizer = torch.optim.SGD([weight], **PARAMS)
        micro = micro_batches(world_size, scenario, step)
        embeddings = torch.cat([e for e, _, _ in micro])
        labels = torch.cat([y for _, y, _ in micro])
        weight.grad = reference_grads(embeddings, labels, weight, MARGIN)[2]
        norms.append(float(weight.grad.norm()))
        if clip:
            torch.nn.utils.clip_grad_norm_([weight], clip)
        sgd_step(optimizer, weight, lars)
        if scheduler is not None:
            scheduler.step()
        trajectory.append(weight.detach().clone())
    return trajectory, norms


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda n: f"world{n}")
def run(request):
    """``(world_size, [what each rank returned])``, one spawn per world size."""
    return request.param, run_distributed(_optimizer_worker, request.param, timeout=TIMEOUT)


def concatenated(results, scenario: str, key: str = "shards") -> list[torch.Tensor]:
    """The full weight after each step, from the ranks' shards."""
    return [torch.cat(step) for step in zip(*(r[scenario][key] for r in results))]


def assert_trajectories_equal(got, expected):
    assert len(got) == len(expected)
    for step, (actual, reference) in enumerate(zip(got, expected)):
        assert_close(actual, reference, **FLOAT64, msg=lambda m: f"after step {step + 1}: {m}")


@pytest.mark.parametrize("scenario", ["plain", "accumulate"])
def test_steps_equal_torch_sgd_on_full_weight(run, scenario):
    """Momentum SGD with weight decay over several fresh batches (and over two accumulated
    micro-batches per step after ``zero_grad``) equals torch.optim.SGD on the full weight."""
    world_size, results = run
    assert all(all(r[scenario]["applied"]) for r in results)
    assert_trajectories_equal(concatenated(results, scenario), reference_trajectory(world_size, scenario)[0])


def test_clipping_uses_global_norm_over_all_shards(run):
    """``gradient_clipping`` scales like ``clip_grad_norm_`` on the full gradient."""
    world_size, results = run
    expected, norms = reference_trajectory(world_size, "clip", clip=CLIP)
    assert min(norms) > 2 * CLIP
    assert_trajectories_equal(concatenated(results, "clip"), expected)


def test_lr_change_through_param_groups_takes_effect(run):
    """Setting ``param_groups[0]["lr"]`` between steps changes the next updates."""
    world_size, results = run
    expected = reference_trajectory(world_size, "lr_change")[0]
    assert not torch.allclose(expected[-1], reference_trajectory(world_size, "plain")[0][-1])
    assert_trajectories_equal(concatenated(results, "lr_change"), expected)
    assert all(r["lr_change"]["final_lr"] == NEW_LR for r in results)


def test_step_lr_scheduler_drives_the_learning_rate(run):
    """A ``StepLR`` attached to the head optimizer halves the lr every step, as for torch SGD."""
    world_size, results = run
    assert_trajectories_equal(concatenated(results, "step_lr"), reference_trajectory(world_size, "step_lr")[0])
    assert all(r["step_lr"]["final_lr"] == pytest.approx(PARAMS["lr"] * 0.5**STEPS) for r in results)


def test_state_dict_round_trip_continues_identically(run):
    """A fresh head and optimizer loaded from a saved weight and ``state_dict`` continue bit for
    bit like the original; without the loaded momentum they would not."""
    world_size, results = run
    original = concatenated(results, "resume")[STEPS // 2 :]
    resumed = concatenated(results, "resume", "resumed")
    assert all(torch.equal(a, b) for a, b in zip(original, resumed, strict=True))
    expected = reference_trajectory(world_size, "resume")[0]
    assert_trajectories_equal(concatenated(results, "resume"), expected)
    restarted = reference_trajectory(world_size, "resume", reset_state_at=STEPS // 2)[0]
    assert not torch.allclose(restarted[-1], expected[-1])


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ({"type": "lamb"}, "optimizer.type"),
        ({"type": "adam", "params": {"momentum": 0.9}}, "optimizer.params.momentum"),
        ({"type": "sgd", "params": {"lr": -1}}, "optimizer.params.lr"),
        ({"type": "sgd", "params": {"lr": 0.1, "nesterov": True}}, "optimizer.params.nesterov"),
        ({"type": "sgd", "betas": [0.9, 0.99]}, "optimizer.betas"),
        ({"type": "sgd", "params": {"lars_coefficient": -0.001}}, "optimizer.params.lars_coefficient"),
        ({"type": "adam", "params": {"lars_coefficient": 0.001}}, "optimizer.params.lars_coefficient"),
    ],
)
def test_bad_optimizer_spec_raises_config_error_naming_the_key(spec, key):
    head = ClassParallelFC(7, WIDTH)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_head_optimizer(head, spec)


@pytest.mark.parametrize("spec, kept", [(SPEC, ()), ({"type": "adam", "params": {"lr": 0.01}}, ("exp_avg_sq",))])
def test_forget_momentum_zeroes_the_first_moment_only(spec, kept):
    """A warm-start refresh forgets the rows' momentum (SGD's buffer, Adam's ``exp_avg``); Adam's
    second moment stays."""
    head = ClassParallelFC(7, WIDTH, margin=MARGIN)
    optimizer = build_head_optimizer(head, spec)
    embeddings, labels = torch.randn(5, WIDTH), torch.randint(7, (5,))
    head(embeddings, labels).backward()
    optimizer.step()
    state = optimizer.state[head.weight]
    before = {name: value.clone() for name, value in state.items()}
    optimizer.forget_momentum()
    for name in ("momentum_buffer", "exp_avg"):
        if name in state:
            assert float(before[name].abs().max()) > 0 and float(state[name].abs().max()) == 0, name
    for name in kept:
        assert torch.equal(state[name], before[name]), name


@pytest.mark.parametrize("scenario", ["lars", "lars_clip"])
def test_lars_scales_the_step_by_the_trust_ratio_over_the_whole_head(run, scenario):
    world_size, results = run
    expected, _ = reference_trajectory(world_size, scenario, clip=CLIP if scenario == "lars_clip" else 0.0, lars=LARS)
    assert_trajectories_equal(concatenated(results, scenario), expected)
    ratios = {r[scenario]["trust_ratio"] for r in results}
    assert len(ratios) == 1 and ratios != {1.0}, ratios
    assert all(r[scenario]["final_lr"] == PARAMS["lr"] for r in results), "the configured lr must stay as it was"


def test_lars_update_without_the_weight_norm_names_what_is_missing():
    head = ClassParallelFC(7, WIDTH, margin=MARGIN)
    optimizer = build_head_optimizer(head, {"type": "sgd", "params": {"lars_coefficient": 0.001}})
    head(torch.randn(3, WIDTH), torch.tensor([0, 1, 2])).backward()
    with pytest.raises(ValueError, match="lars_coefficient needs the weight norm"):
        optimizer.update(1.0)


def test_lars_whose_decay_could_flip_the_rows_is_refused_when_built():
    """LARS scales the weight decay up to ``lars_coefficient``; on sparse steps an lr that could then
    make the row clock's ``lr * wd / (1 - m)`` reach 1 mid-run is refused at once, naming LARS's key.
    Without weight decay, or with dense steps (no row clock), nothing can flip and nothing is refused."""
    spec = {"type": "sgd", "params": {"lr": 2.0, "momentum": 0.9, "lars_coefficient": 0.05}}
    with pytest.raises(ValueError, match="lars_coefficient"):
        build_head_optimizer(ClassParallelFC(40, WIDTH, margin=MARGIN, selection=SPARSE), spec)
    build_head_optimizer(ClassParallelFC(40, WIDTH, margin=MARGIN), spec)
    no_decay = {"type": "sgd", "params": {**spec["params"], "weight_decay": 0.0}}
    build_head_optimizer(ClassParallelFC(40, WIDTH, margin=MARGIN, selection=SPARSE), no_decay)


@pytest.mark.parametrize("gradient_scale", [0.0, 1e-6, 1.0, 1e6])
def test_lars_just_inside_the_bound_never_trips_the_row_clock(gradient_scale):
    """lr * lars_coefficient / (1 - m) = 0.95 on sparse steps (a partial selection, so the row
    clock counts every row's decay), with a weight decay (0.5) that alone would give 9.5: whatever
    the gradient's norm, zero included, LARS keeps the decay below 1."""
    torch.manual_seed(0)
    head = ClassParallelFC(40, WIDTH, margin=MARGIN, selection=SPARSE)
    optimizer = build_head_optimizer(head, {"type": "sgd", "params": {"lr": 1.9, "momentum": 0.9,
                                                                      "weight_decay": 0.5, "lars_coefficient": 0.05}})
    for _ in range(3):
        optimizer.zero_grad()
        head(torch.randn(5, WIDTH), torch.randint(40, (5,))).backward()
        _, grad = head.gradient()
        grad.mul_(gradient_scale)
        assert optimizer.step()
        assert torch.isfinite(head.weight).all()
        if gradient_scale == 0:
            assert optimizer.trust_ratio == pytest.approx(0.05 / 0.5), "a zero gradient takes the ratio's limit η/wd"
    assert "row_last_step" in optimizer.state[head.weight]
