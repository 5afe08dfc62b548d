"""How often a 2-rank script aborts at its end (SIGABRT, "terminate called without an active
exception"), per way of importing hybridfc and way of ending.

Each run starts two fresh processes (gloo, env init on a free loopback port, ``OMP_NUM_THREADS=1``)
running a small head (``--classes`` classes, d = 64, a knn or hf selection with a rebuild in flight
at the end) for ``--steps`` steps, then ending one way:

============  ===================================================================================
``import``    ``early``: ``import hybridfc`` before ``init_process_group``; ``late``: after it
``ending``    ``plain``: the script just ends; ``destroy``: one more all_reduce, then
              ``destroy_process_group()``; ``close``: ``head.close()``; ``error``: one more step in
              which rank 1 feeds a label ``>= num_classes``, so ``hybridfc.InputError`` is raised on
              both ranks and not caught (both must exit 1, with a rebuild in flight)
============  ===================================================================================

Every combination runs ``--runs`` times, one run after the other. The table counts, per
combination, the runs in which both ranks exited as expected (0, or 1 for ``error``), the rank
exits by SIGABRT (return code -6, or 134 through a shell), the other unexpected exits, hangs
(``--timeout``) and every exit code seen. The ranks import hybridfc from the checkout this file
is in (``PYTHONPATH``), so a copy of an older commit measures that commit.

    python benchmarks/exit_aborts.py                                  # 100 runs of each, hf
    python benchmarks/exit_aborts.py --runs 30 --imports late --selections hf knn
"""

from __future__ import annotations

import argparse
import collections
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ABORT_CODES = (-6, 134)

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    when, selection, ending = sys.argv[1], sys.argv[2], sys.argv[3]
    classes, steps, interval, delay = (int(value) for value in sys.argv[4:8])
    if when == "early":
        import hybridfc
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    if when == "late":
        import hybridfc
    head = hybridfc.ClassParallelFC(classes, 64, selection={"type": selection, "budget": 0.1, "k": 8,
                                                            "rebuild_interval": interval, "rebuild_delay": delay})
    optimizer = hybridfc.build_head_optimizer(head, {"type": "sgd", "params": {"lr": 0.1}})
    generator = torch.Generator().manual_seed(dist.get_rank())

    def step(bad_label=False):
        labels = torch.randint(0, classes, (32,), generator=generator)
        if bad_label:
            labels[0] = classes
        head(torch.randn(32, 64, generator=generator), labels).backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(steps):
        step()
    rebuild = head.selection.graph if selection == "knn" else head.selection.index
    assert rebuild._pending, "no rebuild in flight"
    if ending == "destroy":
        dist.all_reduce(torch.ones(1))
        dist.destroy_process_group()
    elif ending == "close":
        head.close()
    elif ending == "error":
        step(bad_label=dist.get_rank() == 1)   # hybridfc.InputError on both ranks, not caught
        raise SystemExit("the bad label was accepted")
""")


def free_port() -> int:
    """A free loopback port (never 29500, the default that other jobs on this machine may use)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != 29500:
            return port


def run_once(script: Path, when: str, selection: str, ending: str, args: argparse.Namespace) -> list[int | None]:
    """Both ranks' return codes (None: killed after ``args.timeout`` seconds). A run whose store
    could not listen on its port (taken by another process between :func:`free_port` and the
    listen) is run again on another port, up to 3 times, and not counted."""
    for _ in range(3):
        codes, stderrs = _run_ranks(script, when, selection, ending, args)
        if not any("EADDRINUSE" in stderr for stderr in stderrs):
            break
        print("  port taken, run again", file=sys.stderr)
    expected = 1 if ending == "error" else 0
    for code, stderr in zip(codes, stderrs):
        if code != expected and args.verbose:
            print(f"  unexpected exit {code}:\n{stderr[-2000:]}", file=sys.stderr)
    return codes


def _run_ranks(script: Path, when: str, selection: str, ending: str,
               args: argparse.Namespace) -> tuple[list[int | None], list[str]]:
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, str(script), when, selection, ending, str(args.classes), str(args.steps),
                   str(args.interval), str(args.delay)]
        procs.append(subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    codes: list[int | None] = []
    stderrs: list[str] = []
    deadline = time.monotonic() + args.timeout
    for proc in procs:
        try:
            _, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            codes.append(proc.returncode)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
            codes.append(None)
        stderrs.append(stderr)
    return codes, stderrs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100, help="runs of each combination")
    parser.add_argument("--selections", nargs="+", default=["hf"], choices=["hf", "knn"])
    parser.add_argument("--imports", nargs="+", default=["early", "late"], choices=["early", "late"])
    parser.add_argument("--endings", nargs="+", default=["plain", "destroy", "close", "error"],
                        choices=["plain", "destroy", "close", "error"])
    parser.add_argument("--classes", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=40, help="steps before the ending (a snapshot at the last)")
    parser.add_argument("--interval", type=int, default=20, help="rebuild_interval (divides --steps)")
    parser.add_argument("--delay", type=int, default=15, help="rebuild_delay")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a run counts as a hang")
    parser.add_argument("--verbose", action="store_true",
                        help="print the end of the stderr of unexpected exits (aborts included)")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "ends.py"
        script.write_text(SCRIPT)
        for selection in args.selections:
            for when in args.imports:
                for ending in args.endings:
                    expected = 1 if ending == "error" else 0
                    seen: collections.Counter[str] = collections.Counter()
                    ok = aborts = other = hangs = 0
                    started = time.perf_counter()
                    for _ in range(args.runs):
                        codes = run_once(script, when, selection, ending, args)
                        ok += all(code == expected for code in codes)
                        for code in codes:
                            seen[str(code)] += 1
                            if code is None:
                                hangs += 1
                            elif code in ABORT_CODES:
                                aborts += 1
                            elif code != expected:
                                other += 1
                    seconds = time.perf_counter() - started
                    codes_seen = ", ".join(f"{code}: {count}" for code, count in sorted(seen.items()))
                    row = (f"{selection}/{when}/{ending}", args.runs, expected, ok, aborts, other, hangs, codes_seen,
                           seconds / args.runs)
                    rows.append(row)
                    print(f"{row[0]:<20} runs {row[1]}, both ranks {expected}: {ok}, SIGABRT {aborts}, other {other}, "
                          f"hangs {hangs}  ({row[8]:.1f} s/run)", file=sys.stderr, flush=True)

    print(f"\n{args.runs} runs per combination, 2 gloo ranks, {args.classes} classes, d 64, "
          f"{args.steps} steps, rebuild_interval {args.interval}, rebuild_delay {args.delay}\n")
    print("| selection/import/ending | runs | expected exit | runs with both ranks as expected "
          "| rank exits by SIGABRT | other unexpected | hangs | exit codes seen (rank exits) | s/run |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row[:8]) + f" | {row[8]:.1f} |")


if __name__ == "__main__":
    main()
