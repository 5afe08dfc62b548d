"""The head reuses its logits buffer between steps, and overlapping steps stay correct."""

import pytest
import torch

from hybridfc import ClassParallelFC, build_head_optimizer
from hybridfc.head.cross_entropy import LogitsWorkspace

CLASSES, WIDTH = 37, 5


def _batch(seed: int):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(6, WIDTH, generator=generator, dtype=torch.float64, requires_grad=True)
    return embeddings, torch.randint(0, CLASSES, (6,), generator=generator)


def _grads(head: ClassParallelFC, embeddings: torch.Tensor, labels: torch.Tensor):
    head.weight.grad = None
    loss = head(embeddings, labels)
    features_grad, weight_grad = torch.autograd.grad(loss, (embeddings, head.weight))
    return loss.detach(), features_grad, weight_grad


def test_buffer_is_reused_from_one_step_to_the_next():
    head = ClassParallelFC(CLASSES, WIDTH, seed=1).double()
    embeddings, labels = _batch(0)
    head(embeddings, labels).backward()
    lent = head._workspace._buffer
    assert lent is not None
    head(embeddings, labels).backward()
    assert head._workspace._buffer.data_ptr() == lent.data_ptr()


def test_overlapping_forward_passes_give_the_sequential_gradients():
    head = ClassParallelFC(CLASSES, WIDTH, margin={"type": "arcface", "scale": 16.0, "margin": 0.4}, seed=2).double()
    (e1, y1), (e2, y2) = _batch(1), _batch(2)
    expected = [_grads(head, e1, y1), _grads(head, e2, y2)]
    loss1, loss2 = head(e1, y1), head(e2, y2)
    got2 = torch.autograd.grad(loss2, (e2, head.weight))
    got1 = torch.autograd.grad(loss1, (e1, head.weight))
    for (loss, *want), (got_loss, got) in zip(expected, [(loss1, got1), (loss2, got2)]):
        assert torch.equal(got_loss.detach(), loss)
        assert all(torch.allclose(g, w, rtol=0, atol=1e-14) for g, w in zip(got, want))


def test_a_forward_without_backward_leaves_later_steps_correct():
    head = ClassParallelFC(CLASSES, WIDTH, seed=3).double()
    (e1, y1), (e2, y2) = _batch(3), _batch(4)
    expected = _grads(head, e2, y2)
    head(e1, y1)
    with torch.no_grad():
        head(e1, y1)
    assert all(torch.allclose(g, w, rtol=0, atol=1e-14) for g, w in zip(_grads(head, e2, y2), expected))


def test_workspace_allocates_when_the_shape_changes():
    workspace, like = LogitsWorkspace(), torch.zeros(1)
    first = workspace.take(2, 3, like)
    workspace.give_back(first)
    assert workspace.take(2, 3, like) is first
    assert workspace.take(4, 3, like).shape == (4, 3)


def test_zero_grad_hands_the_dense_gradient_back_and_the_next_step_overwrites_it():
    """The head optimizer's ``zero_grad`` recycles ``weight.grad``: the next backward pass writes
    into the same memory, and what it writes is exactly a fresh head's gradient."""
    head = ClassParallelFC(CLASSES, WIDTH, seed=4).double()
    fresh = ClassParallelFC(CLASSES, WIDTH, seed=4).double()
    optimizer = build_head_optimizer(head, {"type": "sgd", "params": {"lr": 0.1}})
    embeddings, labels = _batch(5)
    head(embeddings, labels).backward()
    first = head.weight.grad.data_ptr()
    optimizer.zero_grad()
    assert head.weight.grad is None and head._workspace._gradient.data_ptr() == first
    (e2, y2) = _batch(6)
    head(e2, y2).backward()
    fresh(e2, y2).backward()
    assert head.weight.grad.data_ptr() == first
    assert torch.equal(head.weight.grad, fresh.weight.grad)


def test_a_gradient_the_user_keeps_is_not_recycled():
    """``zero_grad`` hands ``weight.grad`` back only when nothing else refers to it: a kept
    reference, or a view, keeps its values through the next step."""
    head = ClassParallelFC(CLASSES, WIDTH, seed=4).double()
    optimizer = build_head_optimizer(head, {"type": "sgd", "params": {"lr": 0.1}})
    embeddings, labels = _batch(5)
    head(embeddings, labels).backward()
    kept = head.weight.grad
    before = kept.clone()
    optimizer.zero_grad()
    head(*_batch(6)).backward()
    assert torch.equal(kept, before) and head.weight.grad.data_ptr() != kept.data_ptr()
    optimizer.zero_grad()
    head(embeddings, labels).backward()
    row = head.weight.grad[0]
    first = row.clone()
    optimizer.zero_grad()
    head(*_batch(6)).backward()
    assert torch.equal(row, first)


def test_a_bf16_shard_keeps_no_gradient_it_cannot_reuse():
    """A bf16 shard's gradient is cast from the loss's fp32 one: holding it would only cost memory."""
    head = ClassParallelFC(CLASSES, WIDTH, seed=4, storage_dtype="bf16")
    optimizer = build_head_optimizer(head, {"type": "sgd", "params": {"lr": 0.1}})
    embeddings, labels = _batch(5)
    head(embeddings.float(), labels).backward()
    optimizer.zero_grad()
    assert head._workspace._gradient is None


def test_a_second_backward_through_the_loss_raises():
    head = ClassParallelFC(CLASSES, WIDTH, seed=4).double()
    loss = head(*_batch(5))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated once"):
        loss.backward()


def test_a_selection_reuses_its_active_rows_and_their_gradient_and_computes_the_same():
    """With a selection the copy of the active rows and their gradient come back to the workspace
    after the backward pass and ``zero_grad``; the next steps write into the same memory, and
    what they compute is exactly what a twin that allocates afresh every time computes. A gradient
    the caller kept from ``gradient()`` is not reused, and keeps its values."""
    spec = {"type": "partial", "budget": 12}
    head, twin = (ClassParallelFC(CLASSES, WIDTH, seed=4, selection=spec).double() for _ in range(2))
    twin._workspace.take_rows = lambda rows, like: like.new_empty(rows, like.shape[1])
    twin._workspace.take_gradient = lambda like: like.new_empty(like.shape)
    optimizers = [build_head_optimizer(h, {"type": "sgd", "params": {"lr": 0.1}}) for h in (head, twin)]
    addresses = set()
    for step in range(4):
        embeddings, labels = _batch(10 + step)
        for h, optimizer in zip((head, twin), optimizers):
            h(embeddings, labels).backward()
            optimizer.step()
        assert torch.equal(head.weight, twin.weight), step
        addresses.add((head._workspace._rows.data_ptr(), head.gradient()[1].data_ptr()))
        kept = head.gradient()[1] if step == 2 else None
        before = None if kept is None else kept.clone()
        for optimizer in optimizers:
            optimizer.zero_grad()
        if kept is not None:
            assert head._workspace._gradient is None, "a gradient the caller holds is not recycled"
            head(*_batch(20)).backward()
            assert torch.equal(kept, before)
            optimizers[0].zero_grad()
            twin(*_batch(20)).backward()
            optimizers[1].zero_grad()
            del kept
    assert len(addresses) <= 2, "the same buffers served the steps (one new pair after the kept gradient)"
