"""Make the checkpoints of ``tests/data/checkpoint_v1`` with the code of commit 2664307 (layout 1:
one ``hybridfc_head_rank*`` file per rank holding the shard, its optimizer, the selection and the
run state). Kept as the record of how they were made; it uses that commit's API and does not run
on later code.

    cd REPO && git checkout 2664307 && PYTHONPATH=REPO:tests:tests/e2e python tests/data/checkpoint_v1/make_fixtures.py

* ``head/``: a 2-rank gloo run of ``ClassParallelFC`` (37 classes, d = 6, knn selection with a
  rebuild in flight at the save, Adam) saved by ``hybridfc.checkpoint.save_head`` after 3 steps,
  with a run state (RNG states, a loader position, a grad_topk residual, a plateau rule);
  ``head_expected.pt`` holds, per rank, what was saved and the losses and rows of 3 more steps.
* ``deepspeed/``: a DeepSpeed-engine checkpoint (ZeRO-0, AdamW, grad_topk 0.05, hybridfc's loader)
  saved through the launcher by ``tests/e2e/worker.py`` after 3 of 6 steps;
  ``deepspeed_expected.pt`` holds the steps that followed the save.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from distributed import run_distributed
from hybridfc import ClassParallelFC, build_head_optimizer
from hybridfc.checkpoint import rng_states, save_head
from hybridfc.compression.error_feedback import TopKGradientReducer
from hybridfc.data import DistributedLoader, SyntheticClasses
from hybridfc.schedule import PlateauLR

HERE = Path(__file__).resolve().parent
CLASSES, WIDTH, BATCH, SAVE_AFTER, AFTER_SAVE = 37, 6, 5, 3, 3
SELECTION = {"type": "knn", "budget": 12, "k": 3, "rebuild_interval": 2, "rebuild_delay": 2, "late_rebuild": "wait"}
OPTIMIZER = {"type": "adam", "params": {"lr": 0.01, "weight_decay": 1e-4}}
MARGIN = {"type": "cosface", "scale": 8.0, "margin": 0.2}


def make_head():
    head = ClassParallelFC(CLASSES, WIDTH, margin=MARGIN, seed=3, selection=SELECTION)
    return head, build_head_optimizer(head, OPTIMIZER)


def head_batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(BATCH, WIDTH, generator=generator), torch.randint(0, CLASSES, (BATCH,), generator=generator)


def head_step(head, optimizer, rank: int, step: int) -> torch.Tensor:
    loss = head(*head_batch(rank, step))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach()


def run_state(rank: int, world_size: int) -> dict:
    """Every part of a run's state the engine saved beside the head in layout 1."""
    loader = DistributedLoader(SyntheticClasses(CLASSES, 2, 4, seed=1), 4, rank=rank, world_size=world_size, seed=5)
    batches = iter(loader)
    for _ in range(3):
        next(batches)
    reducer = TopKGradientReducer(50, 0.1, value_dtype=torch.float32, momentum=0.9)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(2):
        reducer.reduce([torch.randn(50, generator=generator)])
    plateau = PlateauLR("max", 0.5, 1, 0.0, 0.01)
    for metric in (0.3, 0.2):
        plateau.step(metric)
    torch.manual_seed(100 + rank)
    return {"rng": rng_states(), "loader": loader.state_dict(), "grad_topk": reducer.state_dict(),
            "plateau": plateau.state_dict()}


def _head_worker(rank: int, world_size: int, tag_dir: str) -> dict:
    head, optimizer = make_head()
    for step in range(SAVE_AFTER):
        head_step(head, optimizer, rank, step)
    state = run_state(rank, world_size)
    save_head(head, optimizer, tag_dir, state)
    saved = {"weight": head.weight.detach().clone(), "optimizer": optimizer.state_dict(), "steps": head.steps,
             "skipped_steps": optimizer.skipped_steps, "selection": head.selection.state_dict(), "run_state": state,
             "class_start": head.class_start}
    losses, rows = [], []
    for step in range(SAVE_AFTER, SAVE_AFTER + AFTER_SAVE):
        losses.append(head_step(head, optimizer, rank, step))
        rows.append(head.weight.detach().clone())
    head.close()
    return {**saved, "losses": losses, "rows": rows}


def make_head_fixture() -> None:
    tag_dir = HERE / "head"
    shutil.rmtree(tag_dir, ignore_errors=True)
    expected = run_distributed(_head_worker, 2, args=(str(tag_dir),))
    torch.save(expected, HERE / "head_expected.pt")


def make_deepspeed_fixture() -> None:
    from launcher import assert_succeeded, ds_config, launch_worker, records

    work = HERE / "deepspeed_work"
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(HERE / "deepspeed", ignore_errors=True)
    config = ds_config(0, "fp32", optimizer="AdamW", communication={
        "grad_topk": 0.05, "grad_topk_warmup_steps": 0, "grad_topk_value_dtype": "fp32"})
    run = {"name": "save_v1", "config": config, "steps": SAVE_AFTER + AFTER_SAVE, "save_after": SAVE_AFTER,
           "loader": True, "checkpoint": str(HERE / "deepspeed")}
    assert_succeeded(launch_worker(work, [run], timeout=300))
    recs = records(work, "save_v1")
    torch.save([{"head_at_save": rec["heads"][SAVE_AFTER - 1], "losses": rec["losses"][SAVE_AFTER:],
                 "heads": rec["heads"][SAVE_AFTER:], "labels": rec["labels"][SAVE_AFTER:], "backbone": rec["backbone"],
                 "grad_topk": rec["grad_topk"], "counters": rec["counters"]} for rec in recs],
               HERE / "deepspeed_expected.pt")
    (HERE / "deepspeed_config.json").write_text((work / "save_v1.json").read_text())
    shutil.rmtree(work)


if __name__ == "__main__":
    make_head_fixture()
    make_deepspeed_fixture()
