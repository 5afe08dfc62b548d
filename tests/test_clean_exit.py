"""Scripts that end while a background rebuild is in flight, and builds that fail on one rank.

The exit case is the one users met: the head alone on 2 gloo ranks, a knn (or hf) rebuild
started at the last step, then the script simply ends (or ends after one more collective and
``destroy_process_group()``). Every run must exit 0: no collective is left on a background thread
for the teardown to abort. The same with hybridfc imported after ``init_process_group`` (then
``torch._dynamo`` is too), where stale references to the default group kept its gloo threads alive
past the interpreter (:mod:`hybridfc.parallel.teardown`), and with an uncaught ``InputError``.
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
RUNS = 2   # the rates are measured by benchmarks/exit_aborts.py (100 runs each); a test only has to catch a regression

SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    selection, ending, when = sys.argv[1], sys.argv[2], sys.argv[3]
    if when == "early":
        import hybridfc
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    if when == "late":
        import hybridfc
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
    if ending == "error":   # rank 1 feeds a label out of range: InputError on both ranks, not caught
        labels = torch.randint(0, 8000, (32,), generator=generator)
        labels[0] = 8000 if dist.get_rank() == 1 else 0
        head(torch.randn(32, 64, generator=generator), labels)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(path: Path, selection: str, ending: str, when: str = "early") -> list[subprocess.CompletedProcess]:
    """The script on 2 ranks (env init on a free loopback port); their exit codes and output."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(path), selection, ending, when], env=env, cwd=REPO,
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


@pytest.mark.parametrize("selection, when, ending",
                         [pytest.param(selection, "early", ending, marks=pytest.mark.slow) for selection in ("knn", "hf")
                          for ending in ("plain", "destroy", "close")]
                         + [("hf", "late", ending) for ending in ("plain", "destroy", "close", "error")])
def test_a_script_ending_mid_rebuild_exits_cleanly(tmp_path, selection, when, ending):
    """hybridfc imported before init_process_group (``early``) or after it (``late``, hf only: the
    quick tier); ``error``: an uncaught hybridfc.InputError on both ranks, which must exit 1, not
    abort. One run each beyond the early plain ending: the aborts were rare (a few in 100 exits,
    benchmarks/exit_aborts.py); the tests below check their causes directly."""
    path = tmp_path / "ends_mid_rebuild.py"
    path.write_text(SCRIPT)
    expected = 1 if ending == "error" else 0
    for run in range(RUNS if (when, ending) == ("early", "plain") else 1):
        for rank, result in enumerate(run_script(path, selection, ending, when)):
            assert result.returncode == expected, \
                f"run {run}, rank {rank} exited {result.returncode}:\n{result.stdout[-3000:]}"
            if ending == "error":
                assert "hybridfc.head.validation.InputError" in result.stdout, result.stdout[-3000:]


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


LATE_IMPORT_FREES_THE_GROUP = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    world = dist.group.WORLD
    if sys.argv[1] == "dynamo":
        import torch._dynamo
    if sys.argv[1] == "functional":
        import torch.distributed.nn.functional
    import hybridfc
    head = hybridfc.ClassParallelFC(100, 8)
    optimizer = hybridfc.build_head_optimizer(head, {"type": "sgd", "params": {"lr": 0.1}})
    dist.all_reduce(torch.ones(1))
    dist.destroy_process_group()
    print("references", sys.getrefcount(world) - 2)   # the getrefcount argument and `world`
    del world
    print(sorted(open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task")))
""")


def _run_one_rank(path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(path), *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the thread names from /proc")
@pytest.mark.parametrize("first", ["hybridfc", "dynamo", "functional"])
def test_destroy_process_group_frees_gloo_when_hybridfc_is_imported_after_init(tmp_path, first):
    """hybridfc (and with it torch._dynamo and torch.distributed.nn.functional, or those first, by the
    user) imported after init_process_group: functional.py's 10 ``group=group.WORLD`` defaults held
    the live group, so destroy_process_group() left it and its gloo threads alive."""
    path = tmp_path / "late_import.py"
    path.write_text(LATE_IMPORT_FREES_THE_GROUP)
    result = _run_one_rank(path, first)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "references 0\n" in result.stdout, result.stdout
    assert "pt_gloo_runloop" not in result.stdout and "gloo_tcp_loop" not in result.stdout, result.stdout


RELEASED_AT_EXIT = textwrap.dedent("""
    import atexit, os, torch, torch.distributed as dist
    # registered before hybridfc's own hook, so it runs after it (atexit runs hooks last in, first out)
    atexit.register(lambda: print(sorted(open(f"/proc/self/task/{task}/comm").read().strip()
                                         for task in os.listdir("/proc/self/task")), flush=True))
    dist.init_process_group("gloo")
    import hybridfc
    import torch.distributed.optim.zero_redundancy_optimizer   # a group=group.WORLD default, after hybridfc
    dist.all_reduce(torch.ones(1))
    dist.destroy_process_group()
""")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the thread names from /proc")
def test_group_defaults_of_modules_imported_after_hybridfc_are_released_at_exit(tmp_path):
    path = tmp_path / "released_at_exit.py"
    path.write_text(RELEASED_AT_EXIT)
    result = _run_one_rank(path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pt_gloo_runloop" not in result.stdout and "gloo_tcp_loop" not in result.stdout, result.stdout


def test_release_stale_group_references_puts_none_back(tmp_path):
    """In-process, on a one-rank group: the defaults of torch.distributed.nn.functional become None
    (the default group, as when that module is imported before init) and a collective still works."""
    import torch.distributed as dist
    import torch.distributed.nn.functional as functional

    from hybridfc.parallel.teardown import release_stale_group_references

    saved = functional.all_reduce.__defaults__
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        functional.all_reduce.__defaults__ = saved[:-1] + (dist.group.WORLD,)   # as if imported after init
        assert release_stale_group_references() == 1
        assert functional.all_reduce.__defaults__ == saved[:-1] + (None,)
        assert release_stale_group_references() == 0
        with pytest.warns(FutureWarning):
            assert functional.all_reduce(torch.full((2,), 3.0)).tolist() == [3.0, 3.0]
    finally:
        functional.all_reduce.__defaults__ = saved
        dist.destroy_process_group()


NEVER_DESTROYED = textwrap.dedent("""
    import atexit, os, sys, torch, torch.distributed as dist
    # registered before hybridfc's own hook, so it runs after it, still before finalisation
    atexit.register(lambda: print(sorted(open(f"/proc/self/task/{task}/comm").read().strip()
                                         for task in os.listdir("/proc/self/task")), flush=True))
    if sys.argv[1] == "early":
        import hybridfc
    dist.init_process_group("gloo")
    if sys.argv[1] == "late":
        import hybridfc
    dist.all_reduce(torch.ones(1))
    if sys.argv[2] == "error":
        raise ValueError("uncaught")
""")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the thread names from /proc")
@pytest.mark.parametrize("when, ending", [("early", "plain"), ("late", "plain"), ("late", "error")])
def test_a_group_never_destroyed_is_destroyed_before_finalisation(tmp_path, when, ending):
    """Left to finalisation, the group is freed while the interpreter finalises, and a gloo thread
    that then drops a collective's tensor aborts the process; hybridfc destroys it at exit first."""
    path = tmp_path / "never_destroyed.py"
    path.write_text(NEVER_DESTROYED)
    result = _run_one_rank(path, when, ending)
    assert result.returncode == (1 if ending == "error" else 0), result.stderr[-3000:]
    assert "pt_gloo_runloop" not in result.stdout and "gloo_tcp_loop" not in result.stdout, result.stdout
