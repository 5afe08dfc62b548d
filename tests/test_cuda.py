"""The head, its selections, its optimizer and the collectives on a CUDA device, against the
float64 CPU references.

Skipped as a whole where torch sees no CUDA device (CPU CI). One GPU cannot hold two NCCL
ranks, so this module runs in one process group of world size 1 on NCCL: it checks the CUDA
kernels, dtypes and device placement; the arithmetic across N ranks is the CPU tests' (gloo).
TF32 is off, so fp32 matmuls are fp32 and the fp32 tolerances are those of the CPU tests.

Inputs and references are the CPU tests' own: :mod:`reference` for the float64 full softmax
(also over a selection's active classes), :mod:`test_selection` for the head, its batches and
its selection specs.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

import torch.distributed as dist  # noqa: E402
from torch.testing import assert_close  # noqa: E402

from hybridfc import build_head_optimizer  # noqa: E402
from hybridfc.parallel import all_gather_vector, gather_padded  # noqa: E402
from reference import random_weight, reference_grads_over  # noqa: E402
from test_selection import (FULL, MARGINS, OPTIMIZERS, WIDTH, dense_gradient, make_head,  # noqa: E402
                            num_classes, selection, step_batch)

DEVICE = torch.device("cuda", 0)
CLASSES = num_classes(1)  # 40, one shard
FLOAT64 = dict(rtol=1e-10, atol=1e-12)
FP32 = dict(rtol=1e-4, atol=1e-6)
SELECTIONS = {
    "full": FULL,
    "partial_all": selection("partial", 1.0),  # every row: must be full's step
    "knn": selection("knn", 16),  # graph built on the GPU; random rows fill the budget
    "hf": selection("hf", 0.4),
}
PRECISIONS = {"float64": torch.float64, "float32": torch.float32}


@pytest.fixture(scope="module", autouse=True)
def nccl_world(tmp_path_factory):
    """The default process group: NCCL, world size 1 (a file store: no port to pick). TF32 off."""
    torch.cuda.set_device(DEVICE)
    store = tmp_path_factory.mktemp("nccl") / "store"
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    dist.destroy_process_group()


def cuda_head(weight: torch.Tensor, spec: dict, margin: dict, dtype: torch.dtype = torch.float32, **options):
    """A head on the GPU whose rows are ``weight``, in ``dtype``."""
    return make_head(weight, spec, margin, double=dtype == torch.float64, device=DEVICE, **options)


def cuda_step(head, embeddings: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype):
    """Forward and backward of CUDA embeddings in ``dtype``: ``(loss, their gradient)``, on the CPU."""
    local = embeddings.to(DEVICE, dtype).requires_grad_()
    loss = head(local, labels.to(DEVICE))
    loss.backward()
    assert loss.device == local.grad.device == DEVICE
    return loss.detach().cpu(), local.grad.cpu()


def reference_of(head, weight, embeddings, labels, margin):
    """The float64 reference over the classes of the head's last step: ``(loss, dL/dE, dense dL/dW)``.

    ``full`` computes every class; a selection its active ones, with its logit offsets."""
    active = head.last_selection
    classes = torch.arange(CLASSES) if active is None else active.rows.cpu() + head.class_start
    offset = None if active is None or active.logit_offset is None else active.logit_offset.cpu().double()
    loss, embedding_grad, weight_grad = reference_grads_over(classes, embeddings, labels, weight, margin, offset)
    dense = torch.zeros_like(weight)
    dense[classes] = weight_grad
    return loss, embedding_grad, dense


@pytest.mark.parametrize("logits", ["store", "recompute", "recompute/narrow"])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("margin", ["arcface", "softmax"])
@pytest.mark.parametrize("name", SELECTIONS)
def test_step_equals_float64_reference(name, margin, precision, logits, monkeypatch):
    """Loss, embeddings' gradient and the shard's gradient of one step on the GPU equal the
    float64 reference over the classes the step selected (all of them for full), for both logits
    modes; ``recompute/narrow`` cuts the shard into column tiles of 7."""
    import hybridfc.head.tiles as tiles

    if logits.endswith("/narrow"):
        monkeypatch.setattr(tiles, "CUDA_COLUMNS", 7)
    dtype = PRECISIONS[precision]
    seed = 10 * list(SELECTIONS).index(name)
    weight = random_weight(CLASSES, WIDTH, seed).to(dtype).double()
    embeddings, labels = step_batch(1, seed)
    embeddings = embeddings.to(dtype).double()
    head = cuda_head(weight, SELECTIONS[name], MARGINS[margin], dtype, logits=logits.split("/")[0])
    loss, embedding_grad = cuda_step(head, embeddings, labels, dtype)
    if name != "full":
        assert head.last_selection.rows.device == DEVICE
    if name == "knn":
        assert head.last_selection.rows.numel() < CLASSES, "the budget left no class out"
    expected_loss, expected_embedding_grad, expected_grad = reference_of(head, weight, embeddings, labels,
                                                                         MARGINS[margin])
    tolerance = FLOAT64 if dtype == torch.float64 else FP32
    assert loss.dtype == embedding_grad.dtype == dtype
    assert_close(loss.double(), expected_loss, **tolerance)
    assert_close(embedding_grad.double(), expected_embedding_grad, **tolerance)
    assert_close(dense_gradient(head).cpu().double(), expected_grad, **tolerance)


def test_partial_with_every_row_equals_full():
    """A budget of the whole shard takes every row, and its step is full's (to fp32 rounding:
    the GPU may sum a gathered copy of the rows in another order)."""
    weight = random_weight(CLASSES, WIDTH, 3)
    embeddings, labels = step_batch(1, 3)
    runs = {}
    for name in ("full", "partial_all"):
        head = cuda_head(weight, SELECTIONS[name], MARGINS["arcface"])
        runs[name] = (*cuda_step(head, embeddings, labels, torch.float32), dense_gradient(head).cpu())
        if name == "partial_all":
            assert head.last_selection.rows.numel() == CLASSES
    for got, expected in zip(runs["partial_all"], runs["full"], strict=True):
        assert_close(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_embeddings_give_fp32_loss_and_their_own_gradient_dtype(dtype):
    """bf16 / fp16 embeddings into an fp32 head: the loss is fp32, close to float64 on the same
    rounded values; the embeddings' gradient comes back in their dtype, close to the reference."""
    weight = random_weight(CLASSES, WIDTH, 5).float().double()
    embeddings, labels = step_batch(1, 5)
    embeddings = embeddings.to(dtype).double()
    head = cuda_head(weight, FULL, MARGINS["arcface"])
    loss, embedding_grad = cuda_step(head, embeddings, labels, dtype)
    expected_loss, expected_embedding_grad, expected_grad = reference_of(head, weight, embeddings, labels,
                                                                         MARGINS["arcface"])
    assert loss.dtype == torch.float32 and embedding_grad.dtype == dtype
    assert_close(loss.double(), expected_loss, rtol=1e-5, atol=0)
    assert_close(dense_gradient(head).cpu().double(), expected_grad, **FP32)
    assert_close(embedding_grad.double(), expected_embedding_grad, rtol=2e-2,
                 atol=1e-2 * float(expected_embedding_grad.abs().max()))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("name", ["full", "partial_all"])
def test_optimizer_steps_equal_the_cpu_steps(name, optimizer):
    """Two steps of the head optimizer on the GPU leave the weights and the optimizer state of
    the same two steps on the CPU (dense for full, row-sparse for partial)."""
    weight = random_weight(CLASSES, WIDTH, 7)
    heads = {"cpu": make_head(weight, SELECTIONS[name], MARGINS["arcface"]),
             "cuda": cuda_head(weight, SELECTIONS[name], MARGINS["arcface"])}
    optimizers = {where: build_head_optimizer(head, OPTIMIZERS[optimizer]) for where, head in heads.items()}
    for step in range(2):
        embeddings, labels = step_batch(1, 70 + step)
        for where, head in heads.items():
            optimizers[where].zero_grad()
            local = embeddings.float().to(head.weight.device).requires_grad_()
            head(local, labels.to(head.weight.device)).backward()
            assert optimizers[where].step()
        assert_close(heads["cuda"].weight.detach().cpu(), heads["cpu"].weight.detach(), **FP32)
        cpu_state, cuda_state = (optimizers[w].state[heads[w].weight] for w in ("cpu", "cuda"))
        assert cuda_state.keys() == cpu_state.keys()
        for key, value in cpu_state.items():
            assert_close(cuda_state[key].cpu(), value, **FP32, msg=f"state {key}, step {step + 1}")


def test_all_gather_vector_is_the_input_as_one_row():
    values = torch.tensor([3, 11, -2], device=DEVICE)
    stacked = all_gather_vector(values)
    assert stacked.device == DEVICE
    assert torch.equal(stacked, values.unsqueeze(0))


def test_gather_padded_is_the_input():
    labels = torch.randint(CLASSES, (5,), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1))
    assert torch.equal(gather_padded(labels, [5]), labels)


def test_nccl_all_gather_moves_cuda_tensors():
    """The NCCL group itself: the all-gather the head's collectives are built on returns the input."""
    values = torch.arange(6, dtype=torch.float32, device=DEVICE)
    out = torch.empty_like(values)
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    all_gather(out, values)
    assert dist.get_backend() == "nccl"
    assert torch.equal(out, values)
