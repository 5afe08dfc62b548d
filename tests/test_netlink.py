"""``benchmarks/netlink.py``: ranks in network namespaces on shaped veth links (needs root).

One 2-rank gloo job (``ALL_GATHER``) checks the wire counters against the payload and that the
shaper held the traffic back (its own counter of packets over the rate, not a timing); the other tests run plain ``python -c`` ranks or none.
Without root, ``ip`` or ``tc`` they skip with ``namespaces_available()``'s reason.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = str(Path(__file__).resolve().parents[1] / "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)

import netlink  # noqa: E402

AVAILABLE, REASON = netlink.namespaces_available()
needs_namespaces = pytest.mark.skipif(not AVAILABLE, reason=f"network namespaces: {REASON}")

PAYLOAD = 4 * 2 ** 20     # bytes each rank contributes to the all-gather (float32)
SHAPED_RATE = "160mbit"
LOOPBACK_PAYLOAD = 100_000

# Each rank: a warm-up all-gather, then one at SHAPED_RATE, counted on its veth and timed (an
# unshaped link's count varies with the machine's load: smaller segments, more headers).
ALL_GATHER = f"""
import json, os, re, subprocess, sys, time
sys.path.insert(0, {BENCHMARKS!r})
import torch, torch.distributed as dist
import netlink
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
x = torch.full(({PAYLOAD} // 4,), float(rank + 1))
gathered = [torch.empty_like(x) for _ in range(world)]
dist.all_gather(gathered, x)
netlink.shape({SHAPED_RATE!r})
dist.barrier()
start, began = netlink.tx_bytes(), time.perf_counter()
dist.all_gather(gathered, x)
dist.barrier()
sent = netlink.tx_bytes() - start
shaper = subprocess.run(["tc", "-s", "qdisc", "show", "dev", os.environ[netlink.IFNAME_VARIABLE]],
                        capture_output=True, text=True, check=True).stdout
print(json.dumps({{"sent": sent, "seconds": time.perf_counter() - began,
                   "overlimits": int(re.search(r"overlimits (\\d+)", shaper).group(1)),
                   "correct": all(bool((g == r + 1).all()) for r, g in enumerate(gathered))}}), flush=True)
dist.destroy_process_group()
"""


def python_rank(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def namespaces() -> set[str]:
    return {line.split(" ")[0] for line in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                          text=True, check=True).stdout.splitlines()}


def qdisc(link: netlink.NetLink, host: int) -> str:
    return subprocess.run(["tc", "-n", link.namespace(host), "qdisc", "show", "dev", link.ifname(host)],
                          capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def all_gather_job() -> list[dict]:
    with netlink.NetLink(hosts=2) as link:
        results = link.run_ranks(python_rank(ALL_GATHER), world_size=2, timeout=120,
                                 env={"OMP_NUM_THREADS": "1"})
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    return [json.loads(r.stdout) for r in results]


def test_rate_bits():
    assert netlink.rate_bits("160mbit") == 160_000_000
    assert netlink.rate_bits("1gbit") == 10 ** 9
    assert netlink.rate_bits("1.5 Gbit") == 1_500_000_000
    assert netlink.rate_bits(8000) == 8000
    with pytest.raises(ValueError):
        netlink.rate_bits("1gb")


def test_counters_outside_a_rank_need_an_ifname(monkeypatch):
    monkeypatch.delenv(netlink.IFNAME_VARIABLE, raising=False)
    with pytest.raises(RuntimeError, match=netlink.IFNAME_VARIABLE):
        netlink.tx_bytes()
    before = netlink.rx_bytes("lo")
    with socket.create_server(("127.0.0.1", 0)) as server:
        with socket.create_connection(server.getsockname()) as client, server.accept()[0] as peer:
            client.sendall(bytes(LOOPBACK_PAYLOAD))
            received = 0
            while received < LOOPBACK_PAYLOAD:
                received += len(peer.recv(65536))
    assert netlink.rx_bytes("lo") - before >= LOOPBACK_PAYLOAD


@needs_namespaces
def test_all_gather_crosses_the_link(all_gather_job):
    for rank in all_gather_job:
        assert rank["correct"]
        assert PAYLOAD <= rank["sent"] <= 1.10 * PAYLOAD


@needs_namespaces
def test_the_shaper_holds_back_what_exceeds_its_rate(all_gather_job):
    """4 MiB at 160 Mbit/s: the token bucket runs dry, and the qdisc counts the packets it held."""
    assert all(rank["overlimits"] > 0 for rank in all_gather_job)


@needs_namespaces
def test_rank_env_and_shaping_from_inside_a_rank():
    with netlink.NetLink(hosts=2, rate="1gbit") as link:
        assert all("tbf" in qdisc(link, h) and "rate 1Gbit" in qdisc(link, h) for h in range(2))
        env = link.rank_env(1, 2, 29999)
        assert env["MASTER_ADDR"] == link.host_address(0) != link.host_address(1)
        assert env["GLOO_SOCKET_IFNAME"] == env[netlink.IFNAME_VARIABLE] == link.ifname(1)
        assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_SIZE"]) == ("1", "2", "0", "1")
        code = (f"import os, sys; sys.path.insert(0, {BENCHMARKS!r}); import netlink; "
                f"netlink.shape(None if os.environ['RANK'] == '0' else {SHAPED_RATE!r}); "
                f"print(sorted(os.listdir('/sys/class/net')), netlink.tx_bytes() >= 0)")
        results = link.run_ranks(python_rank(code), world_size=2, timeout=30)
        assert [r.stdout.strip() for r in results] == [f"['{link.ifname(h)}', 'lo'] True" for h in range(2)]
        assert "tbf" not in qdisc(link, 0) and "rate 160Mbit" in qdisc(link, 1)


@needs_namespaces
def test_failing_rank_stops_the_others_and_a_hang_times_out():
    with netlink.NetLink(hosts=2) as link:
        results = link.run_ranks(lambda rank: python_rank(f"import sys, time; time.sleep(60 * {rank}); sys.exit(3)"),
                                 world_size=2, timeout=30)
        assert [r.returncode for r in results] == [3, -signal.SIGKILL]
        with pytest.raises(subprocess.TimeoutExpired):
            link.run_ranks(python_rank("import time; time.sleep(60)"), world_size=2, timeout=0.5)


@needs_namespaces
def test_no_namespace_outlives_the_link():
    with netlink.NetLink(hosts=2) as link:
        made = {link.namespace(0), link.namespace(1)}
        assert made <= namespaces()
    assert not made & namespaces()
    with pytest.raises(ZeroDivisionError):
        with netlink.NetLink(hosts=2) as link:
            made = {link.namespace(0), link.namespace(1)}
            1 / 0
    assert not made & namespaces()


@needs_namespaces
def test_sigterm_deletes_namespaces_and_kills_ranks():
    code = (f"import json, sys, time; sys.path.insert(0, {BENCHMARKS!r}); import netlink; "
            f"link = netlink.NetLink(hosts=2); rank = link.launch(['sleep', '60'], 0, 1, 29500); "
            f"print(json.dumps([link.namespace(0), link.namespace(1), rank.pid]), flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    *made, rank_pid = json.loads(parent.stdout.readline())
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == -signal.SIGTERM
    assert not set(made) & namespaces()
    with pytest.raises(ProcessLookupError):
        os.kill(rank_pid, 0)


@needs_namespaces
def test_namespaces_of_a_dead_process_are_removed():
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"hfc{dead.pid}_0h0"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        netlink.NetLink(hosts=1).close()
        assert stale not in namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)
