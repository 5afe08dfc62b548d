"""Scripts that end while a background rebuild is in flight, and builds that fail on one rank.

The exit case is the one users met: the head alone on 2 gloo ranks, a knn (or hf) rebuild
started at the last step, then the script simply ends (or ends after one more collective and
``destroy_process_group()``). Every run must exit 0: no collective is left on a background thread
for the teardown to abort.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from distributed import RankFailed, run_distributed
from hybridfc import ClassParallelFC, build_head_optimizer
from hybridfc.parallel import RankError

REPO = Path(__file__).resolve().parents[1]
RUNS = 5

SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist, hybridfc
    selection, ending = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    head = hybridfc.ClassParallelFC(8000, 64, selection={"type": selection, "budget": 0.1, "k": 8,
                                                         "rebuild_interval": 25, "rebuild_delay": 20})
    optimizer = hybridfc.build_head_optimizer(head, {"type": "sgd", "params": {"lr": 0.1}})
    generator = torch.Generator().manual_seed(dist.get_rank())
    for step in range(50):
        loss = head(torch.randn(32, 64, generator=generator), torch.randint(0, 8000, (32,), generator=generator))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert head.selection.graph._pending if selection == "knn" else head.selection.index._pending
    if ending == "destroy":
        dist.all_reduce(torch.ones(1))
        dist.destroy_process_group()
    if ending == "close":
        head.close()
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(path: Path, selection: str, ending: str) -> list[subprocess.CompletedProcess]:
    """The script on 2 ranks (env init on a free loopback port); their exit codes and output."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(path), selection, ending], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = []
    for proc in procs:
        try:
            output, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            pytest.fail("a rank did not exit within 120 s (hang at exit?)")
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, output))
    return results


@pytest.mark.parametrize("selection", ["knn", "hf"])
@pytest.mark.parametrize("ending", ["plain", "destroy", "close"])
def test_a_script_ending_mid_rebuild_exits_cleanly(tmp_path, selection, ending):
    path = tmp_path / "ends_mid_rebuild.py"
    path.write_text(SCRIPT)
    for run in range(RUNS if ending == "plain" else 1):
        for rank, result in enumerate(run_script(path, selection, ending)):
            assert result.returncode == 0, f"run {run}, rank {rank} exited {result.returncode}:\n{result.stdout[-3000:]}"


def _failing_build_worker(rank: int, world_size: int) -> float:
    """A knn head whose background rebuild fails on rank 1; returns seconds from the failure's step."""
    head = ClassParallelFC(300, 16, selection={"type": "knn", "budget": 0.2, "k": 4, "rebuild_interval": 4,
                                               "rebuild_delay": 2, "index": "exact"})
    optimizer = build_head_optimizer(head, {"type": "sgd", "params": {"lr": 0.1}})
    rebuild = head.selection.graph
    if rank == 1:
        builder = rebuild.builder

        def failing(rows):
            if rebuild.current is not None:
                raise MemoryError("no room for the graph")
            return builder(rows)

        rebuild.builder = failing
    generator = torch.Generator().manual_seed(rank)
    for step in range(12):
        head(torch.randn(8, 16, generator=generator), torch.randint(0, 300, (8,), generator=generator)).backward()
        optimizer.step()
        optimizer.zero_grad()
    return -1.0


def test_a_build_that_fails_on_one_rank_raises_on_every_rank():
    started = time.perf_counter()
    results = run_distributed(_failing_build_worker, 2, timeout=60, allow_errors=True)
    assert time.perf_counter() - started < 60
    assert all(isinstance(result, RankFailed) for result in results), results
    assert "the knn graph rebuild from step 4 failed: MemoryError: no room for the graph" in str(results[1])
    assert f"{RankError.__name__}: hybridfc: the knn graph rebuild from step 4 failed on rank(s) [1]" in str(results[0])


FREES_THE_GROUP = textwrap.dedent("""
    import os, torch, torch.distributed as dist, hybridfc
    dist.init_process_group("gloo")
    head = hybridfc.ClassParallelFC(100, 8)
    optimizer = hybridfc.build_head_optimizer(head, {"type": "sgd", "params": {"lr": 0.1}})
    dist.all_reduce(torch.ones(1))
    dist.destroy_process_group()
    print(sorted(open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task")))
""")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the thread names from /proc")
def test_destroy_process_group_frees_gloo_after_an_optimizer_is_built(tmp_path):
    """torch imports dynamo with the first optimizer; imported after init_process_group it would keep
    the group alive past destroy_process_group(), and its worker threads would abort the exit."""
    path = tmp_path / "frees_the_group.py"
    path.write_text(FREES_THE_GROUP)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(path)], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pt_gloo_runloop" not in result.stdout, result.stdout
