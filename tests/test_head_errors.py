"""Bad input on one rank is an error on every rank, never a hang; non-finite batches are skipped.

Spawns are few: one group (3 ranks) goes through every bad input in turn, catching each
``InputError`` and then checking the group still works; one group lets an ``InputError`` escape
from every rank (``allow_errors``); one group fails at construction.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

from distributed import RankFailed, run_distributed
from hybridfc import ClassParallelFC, ConfigError, InputError, build_head_optimizer
from reference import random_batch, random_weight, rank_rows, reference_grads

WORLD_SIZE = 3
NUM_CLASSES = 10
WIDTH = 6
SIZES = (2, 3, 1)
TIMEOUT = 60.0
FLOAT64 = dict(rtol=1e-10, atol=1e-12)
MARGIN = {"type": "arcface", "scale": 16.0, "margin": 0.5}
PARAMS = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}
SPEC = {"type": "sgd", "params": PARAMS}
NAN_RANK = 1

BAD_INPUTS = {  # case: (bad rank, what the message must say)
    "label_too_large": (0, "label 10 is out of range [0, 10)"),
    "label_negative": (1, "label -3 is out of range [0, 10)"),
    "float_labels": (2, "labels must be an integer tensor (int64), got torch.float64"),
    "wrong_width": (0, "embeddings have width 7, the head expects embedding_size=6"),
    "count_mismatch": (1, "one label per embedding row, got 4 labels"),
}


def make_head(seed: int) -> ClassParallelFC:
    """A float64 head whose shard holds its rows of a fresh random weight."""
    weight = random_weight(NUM_CLASSES, WIDTH, seed)
    head = ClassParallelFC(NUM_CLASSES, WIDTH, margin=MARGIN, seed=2).double()
    with torch.no_grad():
        head.weight.copy_(weight[head.class_start : head.class_start + head.num_local])
    return head


def local_batch(rank: int, seed: int, bad: str | None = None):
    """This rank's rows of a fresh global batch, spoiled as ``bad`` says."""
    embeddings, labels = random_batch(NUM_CLASSES, WIDTH, sum(SIZES), seed)
    embeddings, labels = embeddings[rank_rows(SIZES, rank)], labels[rank_rows(SIZES, rank)]
    if bad == "label_too_large":
        labels[-1] = NUM_CLASSES
    elif bad == "label_negative":
        labels[0] = -3
    elif bad == "float_labels":
        labels = labels.double()
    elif bad == "wrong_width":
        embeddings = torch.cat([embeddings, embeddings[:, :1]], dim=1)
    elif bad == "count_mismatch":
        labels = torch.cat([labels, labels[:1]])
    return embeddings, labels


def _forward(head, rank: int, seed: int, bad: str | None = None):
    """The head's loss on this rank's rows, spoiled as ``bad`` says if this is its bad rank."""
    spoil = bad if bad is not None and BAD_INPUTS[bad][0] == rank else None
    return head(*local_batch(rank, seed, spoil))


def _caught_bad_inputs(rank: int) -> dict:
    """Each bad input in turn, its error caught; then a good batch on the same group."""
    head = make_head(seed=1)
    messages = {}
    for seed, case in enumerate(BAD_INPUTS, start=10):
        try:
            _forward(head, rank, seed, case)
            messages[case] = "no error"
        except InputError as exc:
            messages[case] = f"{type(exc).__name__}: {exc}"
    return {"messages": messages, "loss_after": _forward(head, rank, seed=20).detach()}


def _non_finite_steps(rank: int, clip: float) -> dict:
    """A finite step, a step with a NaN in one row of rank NAN_RANK, a finite step again."""
    head = make_head(seed=30)
    optimizer = build_head_optimizer(head, SPEC, gradient_clipping=clip)
    out = {}
    for step in range(3):
        optimizer.zero_grad()
        embeddings, labels = local_batch(rank, seed=31 + step)
        if step == 1 and rank == NAN_RANK:
            embeddings[1, 2] = float("nan")
        head(embeddings, labels).backward()
        before = head.weight.detach().clone()
        out[step] = {"step_is_finite": head.step_is_finite, "applied": optimizer.step(),
                     "unchanged": torch.equal(before, head.weight), "shard": head.weight.detach().clone(),
                     "non_finite_batches": head.non_finite_batches, "skipped_steps": optimizer.skipped_steps}
    return out


def _non_finite_loss_step(rank: int) -> dict:
    """An fp32 softmax head on finite embeddings whose logits overflow on rank NAN_RANK's row."""
    weight = random_weight(NUM_CLASSES, WIDTH, 60).float()
    head = ClassParallelFC(NUM_CLASSES, WIDTH, margin={"type": "softmax"})
    with torch.no_grad():
        head.weight.copy_(weight[head.class_start : head.class_start + head.num_local])
    optimizer = build_head_optimizer(head, SPEC)
    embeddings, labels = local_batch(rank, seed=61)
    embeddings = embeddings.float()
    if rank == NAN_RANK:
        embeddings[0] = 3e38
    loss = head(embeddings, labels)
    loss.backward()
    before = head.weight.detach().clone()
    return {"embeddings_finite": bool(embeddings.isfinite().all()), "loss": loss.detach(),
            "applied": optimizer.step(), "unchanged": torch.equal(before, head.weight),
            "skipped_steps": optimizer.skipped_steps}


def _labels_as(rank: int, dtype: torch.dtype) -> dict:
    head = make_head(seed=40)
    embeddings, labels = local_batch(rank, seed=41)
    embeddings.requires_grad_()
    loss = head(embeddings, labels.to(dtype))
    loss.backward()
    return {"loss": loss.detach(), "weight_grad": head.weight.grad, "embedding_grad": embeddings.grad}


def _recoverable_worker(rank: int, world_size: int) -> dict:
    return {
        "bad_inputs": _caught_bad_inputs(rank),
        "non_finite": {clip: _non_finite_steps(rank, clip) for clip in (0.0, 0.5)},
        "non_finite_loss": _non_finite_loss_step(rank),
        "labels": {str(dtype): _labels_as(rank, dtype) for dtype in (torch.int64, torch.int32)},
    }


@pytest.fixture(scope="module")
def recoverable():
    """What each of the 3 ranks of one group returned."""
    return run_distributed(_recoverable_worker, WORLD_SIZE, timeout=TIMEOUT)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_on_one_rank_raises_input_error_on_every_rank(recoverable, case):
    """Every rank raises InputError naming the bad rank (and no other) and the problem."""
    bad_rank, problem = BAD_INPUTS[case]
    for rank, result in enumerate(recoverable):
        message = result["bad_inputs"]["messages"][case]
        assert message.startswith("InputError: "), (rank, message)
        assert f"rank {bad_rank}: " in message and problem in message, (rank, message)
        assert all(f"rank {other}: " not in message for other in range(WORLD_SIZE) if other != bad_rank)


def test_group_still_works_after_input_errors(recoverable):
    """After the caught errors the ranks are still in step: a good batch gives the reference loss."""
    weight = random_weight(NUM_CLASSES, WIDTH, 1)
    embeddings, labels = random_batch(NUM_CLASSES, WIDTH, sum(SIZES), 20)
    loss = reference_grads(embeddings, labels, weight, MARGIN)[0]
    for result in recoverable:
        assert_close(result["bad_inputs"]["loss_after"], loss, **FLOAT64)


def _escaping_error_worker(rank: int, world_size: int) -> None:
    _forward(make_head(seed=50), rank, seed=51, bad="label_too_large")


def test_input_error_escapes_from_every_rank_without_hanging():
    """Uncaught, the error of rank 0's bad label ends every rank with InputError within the timeout."""
    results = run_distributed(_escaping_error_worker, WORLD_SIZE, timeout=TIMEOUT, allow_errors=True)
    for rank, result in enumerate(results):
        assert isinstance(result, RankFailed), rank
        text = str(result)
        assert text.startswith("InputError: ") and "rank 0: label 10 is out of range [0, 10)" in text, text


def _too_few_classes_worker(rank: int, world_size: int) -> None:
    dist.barrier()  # every rank connected before any fails: a rank leaving during init breaks the others'
    ClassParallelFC(world_size - 1, WIDTH)


def test_fewer_classes_than_ranks_raises_value_error_on_every_rank():
    results = run_distributed(_too_few_classes_worker, 2, timeout=TIMEOUT, allow_errors=True)
    for result in results:
        assert isinstance(result, RankFailed)
        assert str(result).startswith("ValueError: ") and "num_classes=1" in str(result), str(result)


@pytest.mark.parametrize(
    ("margin", "key"),
    [
        ({"type": "arcface", "scale": 64.0, "margn": 0.5}, "margin.margn"),
        ({"type": "cosface", "m1": 1.0}, "margin.m1"),
        ({"type": "arcfase", "scale": 64.0}, "margin.type"),
    ],
)
def test_bad_margin_raises_config_error_naming_the_key(margin, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ClassParallelFC(10, WIDTH, margin=margin)


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_non_finite_embeddings_skip_the_step_on_every_rank(recoverable, clip):
    """A NaN in one row of one rank: the forward does not raise, every rank marks the step
    non-finite, the optimizer skips it everywhere (shards bit-identical), counts it, and the
    next finite step after ``zero_grad`` updates again, as SGD without the NaN batch would."""
    for result in recoverable:
        first, nan_step, after = (result["non_finite"][clip][step] for step in range(3))
        assert first["applied"] and not first["unchanged"]
        assert nan_step["step_is_finite"] is False and nan_step["non_finite_batches"] == 1
        assert nan_step["applied"] is False and nan_step["unchanged"] and nan_step["skipped_steps"] == 1
        assert after["step_is_finite"] is True and after["applied"] is True and not after["unchanged"]
        assert after["non_finite_batches"] == 1 and after["skipped_steps"] == 1
    assert_close(torch.cat([r["non_finite"][clip][2]["shard"] for r in recoverable]), _sgd_without_nan_batch(clip),
                 **FLOAT64)


def _sgd_without_nan_batch(clip: float) -> torch.Tensor:
    """torch.optim.SGD on the full weight over the two finite batches of the non-finite test."""
    weight = random_weight(NUM_CLASSES, WIDTH, 30).requires_grad_()
    optimizer = torch.optim.SGD([weight], **PARAMS)
    for seed in (31, 33):
        embeddings, labels = random_batch(NUM_CLASSES, WIDTH, sum(SIZES), seed)
        weight.grad = reference_grads(embeddings, labels, weight, MARGIN)[2]
        if clip:
            torch.nn.utils.clip_grad_norm_([weight], clip)
        optimizer.step()
    return weight.detach()


def test_non_finite_loss_from_finite_embeddings_skips_the_step_on_every_rank(recoverable):
    """Non-finite embeddings *or loss* mean no update on any rank (docs/design.md). Here every
    embedding is finite but one rank's logits overflow fp32, so the loss and gradient are NaN."""
    for result in recoverable:
        step = result["non_finite_loss"]
        assert step["embeddings_finite"] and not torch.isfinite(step["loss"])
        assert step["applied"] is False and step["unchanged"] and step["skipped_steps"] == 1


def test_int32_labels_give_the_same_result_as_int64(recoverable):
    for result in recoverable:
        as_int64, as_int32 = result["labels"]["torch.int64"], result["labels"]["torch.int32"]
        for key in ("loss", "weight_grad", "embedding_grad"):
            assert torch.equal(as_int64[key], as_int32[key]), key


def test_grad_topk_on_a_head_alone_is_refused_not_ignored():
    """grad_topk compresses a backbone's gradients (hybridfc.initialize); a head alone has none."""
    with pytest.raises(ConfigError, match="communication.grad_topk: .*hybridfc.communication"):
        ClassParallelFC(NUM_CLASSES, WIDTH, communication={"grad_topk": 0.01})
    assert ClassParallelFC(NUM_CLASSES, WIDTH, communication={"chunks": 2}).chunks == 2

