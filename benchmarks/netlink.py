"""Several hosts on one machine: network namespaces on shaped veth links, to measure communication.

Loopback cannot show what a collective costs: it has no link rate and no per-host byte counter.
``NetLink(hosts=N)`` makes N network namespaces ("hosts"), each with one veth ``hfc<i>``
(address 10.77.0.<i+1>/24) plugged into a Linux bridge that lives in one more namespace; the root
namespace is not touched. Each rank of a job runs in its own host, so gloo's traffic crosses a
real veth link: ``tc ... tbf rate R`` on a host's egress shapes it, and
``/sys/class/net/hfc<i>/statistics/tx_bytes`` inside the host counts what it put on the wire.

    with NetLink(hosts=2, rate="1gbit") as link:                 # in the parent
        results = link.run_ranks([sys.executable, "job.py"], world_size=2, timeout=300)

    # job.py, on each rank (dist.init_process_group("gloo") reads the env that NetLink sets):
    start = netlink.tx_bytes()                                   # this host's wire counter, bytes
    dist.all_reduce(x)
    sent = netlink.tx_bytes() - start
    netlink.shape("160mbit")                                     # re-shape this host's link (None: unshaped)

A rank's env (``NetLink.rank_env``) is what the ``deepspeed`` launcher gives a rank of a
one-rank-per-node job: ``MASTER_ADDR`` on host 0, ``LOCAL_RANK=0``, ``LOCAL_SIZE=1``,
``CROSS_RANK``/``CROSS_SIZE`` (node rank and count), and gloo on the host's veth
(``GLOO_SOCKET_IFNAME``). ``deepspeed.init_distributed`` needs nothing more. ``LOCAL_SIZE=1`` also
keeps DeepSpeed's CPU shared-memory all-reduce from starting (it starts when ``LOCAL_SIZE`` equals
the world size, and ``/dev/shm`` is shared by all namespaces); it serves only
``inference_all_reduce``, so training traffic takes gloo either way.

Shaping is egress only: a host sends at most ``rate`` but can receive from several hosts at once
faster than that. Addresses cannot collide between two links: each link's hosts see only their
own namespaces. Host 0's namespace is the link's own too, so its ports are all free and
``next_port()`` hands out 29500, 29501, ... (never one an earlier job may still hold in TIME_WAIT).

Needs root, and ``ip`` and ``tc`` from iproute2 (``apt-get install -y iproute2``);
``namespaces_available()`` says whether this machine can, and why not. A rank process runs as
root in its namespace, which is what ``shape`` needs; ``ip netns exec`` remounts ``/sys`` there,
so ``/sys/class/net`` shows the host's own devices (``lo`` and ``hfc<i>``).

Cleanup: ``close()`` (also ``__exit__``, an ``atexit`` hook and SIGTERM/SIGINT handlers that then
pass the signal on to the handler before them) kills the ranks this link launched and deletes its
namespaces, which takes its veths and bridge with them. Only a SIGKILL leaves namespaces behind;
the next ``NetLink`` deletes those whose process is gone (names are ``hfc<pid>_<k>h<i>`` and
``hfc<pid>_<k>br``).

Wire bytes exceed payload bytes: Ethernet, IP and TCP headers (66 bytes per frame of up to 1448
payload bytes at MTU 1500, 4.6 %), plus the ACKs a host sends for what it receives. veth does
GSO/TSO, so the counter sees one frame per super-packet of up to 64 KiB with one set of headers
(the tbf burst is at least 64 KiB so that tbf never splits one): the overhead is far below the
per-frame figure. Measured with ``--selftest`` (2 hosts, gloo, a 4 MiB float32 tensor), tx_bytes /
payload per rank and op is 1.002 at 1 Gbit/s and 160 Mbit/s (all_to_all_single up to 1.008) and
1.001-1.03 unshaped, for all_gather(_into_tensor), all_reduce (ring payload 2(N-1)/N bytes per
byte) and all_to_all_single ((N-1)/N). gloo's reduce_scatter_tensor sends what its all_reduce
does: 2.00x the ring reduce-scatter's (N-1)/N.

Time is gloo's as much as the link's. all_reduce reaches 0.89-0.95 of the rate at 1 Gbit/s and
0.95 at 160 Mbit/s (unshaped, 1.4-3 Gbit/s, bound by the CPU). Collectives that send both ways on
a pair at once reach less: all_to_all_single 0.60 and 0.49, all_gather 0.69 and 0.61. The link
carries both directions at full rate (one raw TCP connection carrying 2 MB each way at once:
110 ms at 160 Mbit/s), but gloo's isend/irecv of the same takes 107 ms on one rank and 212 ms on
the other: one direction after the other.

    python benchmarks/netlink.py --selftest
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import IO, Any, Callable, Sequence

SUBNET = "10.77.0"
BRIDGE = "br0"
FIRST_PORT = 29500
MIN_BURST = 64 * 1024          # bytes: one full GSO super-packet
BURST_PER_SECOND = 250         # burst = one 250th of a second at the rate (4 ms)
LATENCY = "50ms"               # the most a packet may wait in the tbf queue
IFNAME_VARIABLE = "HYBRIDFC_NETLINK_IFNAME"
RATE_UNITS = {"bit": 1, "kbit": 10 ** 3, "mbit": 10 ** 6, "gbit": 10 ** 9, "tbit": 10 ** 12}
NAMESPACE_PATTERN = re.compile(r"hfc(\d+)_\d+(h\d+|br)")

_instances = itertools.count()
_live: set[NetLink] = set()
_previous_handlers: dict[int, object] = {}


def _run(argv: Sequence[str]) -> str:
    """Run a command, return its stdout; a failure raises ``RuntimeError`` with its stderr."""
    done = subprocess.run(list(argv), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def rate_bits(rate: str | int) -> int:
    """A tc-style rate ("160mbit", "1gbit", or an int) in bits per second (k, m, g are powers of 1000)."""
    if isinstance(rate, int):
        return rate
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", rate.strip().lower())
    if not match or match.group(2) not in RATE_UNITS:
        raise ValueError(f"rate {rate!r}: expected a number with one of the units {sorted(RATE_UNITS)}")
    return int(float(match.group(1)) * RATE_UNITS[match.group(2)])


def _tc(namespace: str | None) -> list[str]:
    return ["tc"] if namespace is None else ["tc", "-n", namespace]


def _own_ifname() -> str:
    try:
        return os.environ[IFNAME_VARIABLE]
    except KeyError:
        raise RuntimeError(f"{IFNAME_VARIABLE} is unset (not a rank of a NetLink): pass ifname") from None


def shape(rate: str | int | None, ifname: str | None = None, namespace: str | None = None) -> None:
    """Limit the egress of ``ifname`` (default: this rank's veth) to ``rate``; None removes the limit.

    A token bucket (tbf) with a burst of 4 ms at the rate (at least 64 KiB) and at most 50 ms of
    queue. ``namespace`` runs ``tc`` there (from the parent); a rank leaves it None.
    """
    ifname = ifname or _own_ifname()
    if rate is None:
        if "tbf" in _run([*_tc(namespace), "qdisc", "show", "dev", ifname]):
            _run([*_tc(namespace), "qdisc", "del", "dev", ifname, "root"])
        return
    bits = rate_bits(rate)
    burst = max(MIN_BURST, bits // 8 // BURST_PER_SECOND)
    _run([*_tc(namespace), "qdisc", "replace", "dev", ifname, "root", "tbf",
          "rate", f"{bits}bit", "burst", str(burst), "latency", LATENCY])


def _counter(name: str, ifname: str | None) -> int:
    return int(Path("/sys/class/net", ifname or _own_ifname(), "statistics", name).read_text())


def tx_bytes(ifname: str | None = None) -> int:
    """Bytes this host has sent on ``ifname`` (default: this rank's veth), headers included."""
    return _counter("tx_bytes", ifname)


def rx_bytes(ifname: str | None = None) -> int:
    """Bytes this host has received on ``ifname`` (default: this rank's veth), headers included."""
    return _counter("rx_bytes", ifname)


def namespaces_available() -> tuple[bool, str]:
    """Whether a ``NetLink`` can be made here (a 1-host shaped probe is made and deleted), and why not."""
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return False, f"{' and '.join(missing)} not found (iproute2: apt-get install -y iproute2)"
    try:
        NetLink(hosts=1, rate="1gbit").close()
    except RuntimeError as exc:
        return False, str(exc)
    return True, ""


class NetLink:
    """``hosts`` network namespaces, each with a veth on a shared bridge; see the module docstring.

    Made on construction; ``close()`` (or leaving the ``with`` block) deletes everything.
    """

    def __init__(self, hosts: int = 2, rate: str | int | None = None) -> None:
        if not 1 <= hosts <= 250:
            raise ValueError(f"hosts must be in [1, 250], got {hosts}")
        self.hosts = hosts
        self._tag = f"hfc{os.getpid()}_{next(_instances)}"
        self._owner = os.getpid()
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._ports = itertools.count(FIRST_PORT)
        _remove_stale_namespaces()
        _install_signal_handlers()
        _live.add(self)
        try:
            self._build()
            self.shape(rate)
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        bridge = self._add_namespace(f"{self._tag}br")
        _run(["ip", "-n", bridge, "link", "add", BRIDGE, "type", "bridge"])
        _run(["ip", "-n", bridge, "link", "set", BRIDGE, "addrgenmode", "none", "up"])
        for host in range(self.hosts):
            self._add_host(host, bridge)

    def _add_namespace(self, name: str) -> str:
        _run(["ip", "netns", "add", name])
        self._namespaces.append(name)
        return name

    def _add_host(self, host: int, bridge: str) -> None:
        """Host namespace, veth ``hfc<host>`` in it, its peer ``p<host>`` on the bridge; no IPv6
        (no neighbour discovery chatter in the counters)."""
        namespace, ifname, port = self._add_namespace(self.namespace(host)), self.ifname(host), f"p{host}"
        _run(["ip", "-n", bridge, "link", "add", port, "type", "veth", "peer", "name", ifname, "netns", namespace])
        _run(["ip", "-n", bridge, "link", "set", port, "addrgenmode", "none", "master", BRIDGE, "up"])
        _run(["ip", "-n", namespace, "addr", "add", f"{self.host_address(host)}/24", "dev", ifname])
        _run(["ip", "-n", namespace, "link", "set", ifname, "addrgenmode", "none", "up"])
        _run(["ip", "-n", namespace, "link", "set", "lo", "up"])

    def _check(self, host: int) -> int:
        if not 0 <= host < self.hosts:
            raise IndexError(f"host {host} of a {self.hosts}-host link")
        return host

    def namespace(self, host: int) -> str:
        """Name of the network namespace of ``host`` (for ``ip netns exec``, ``ip -n``, ``tc -n``)."""
        return f"{self._tag}h{self._check(host)}"

    def ifname(self, host: int) -> str:
        """Name of the veth inside ``host``'s namespace."""
        return f"hfc{self._check(host)}"

    def host_address(self, host: int) -> str:
        """IPv4 address of ``host``'s veth."""
        return f"{SUBNET}.{self._check(host) + 1}"

    def shape(self, rate: str | int | None, host: int | None = None) -> None:
        """Limit the egress of ``host`` (None: every host) to ``rate``; None removes the limit."""
        for h in range(self.hosts) if host is None else [host]:
            shape(rate, self.ifname(h), self.namespace(h))

    def next_port(self) -> int:
        """A master port not yet handed out on this link (host 0's namespace is the link's own)."""
        return next(self._ports)

    def rank_env(self, rank: int, world_size: int, master_port: int) -> dict[str, str]:
        """The env of ``rank`` (on host ``rank``) for ``init_process_group("gloo")`` / DeepSpeed."""
        if world_size > self.hosts or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of {world_size} on a {self.hosts}-host link (one rank per host)")
        ifname = self.ifname(rank)
        return {"MASTER_ADDR": self.host_address(0), "MASTER_PORT": str(master_port),
                "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0", "LOCAL_SIZE": "1",
                "CROSS_RANK": str(rank), "CROSS_SIZE": str(world_size),
                "GLOO_SOCKET_IFNAME": ifname, IFNAME_VARIABLE: ifname}

    def launch(self, argv: Sequence[str], rank: int, world_size: int, master_port: int,
               env: dict[str, str] | None = None, **popen_kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` as ``rank`` in its host's namespace, in a session of its own.

        Its env: ``os.environ``, then ``rank_env``, then ``env``. ``close()`` kills it if it still runs.
        """
        full_env = {**os.environ, **self.rank_env(rank, world_size, master_port), **(env or {})}
        proc = subprocess.Popen(["ip", "netns", "exec", self.namespace(rank), *argv], env=full_env,
                                start_new_session=True, **popen_kwargs)
        self._procs.append(proc)
        return proc

    def run_ranks(self, argv: Sequence[str] | Callable[[int], Sequence[str]], world_size: int, timeout: float,
                  env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess]:
        """Run a job: ``argv`` (or ``argv(rank)``) on ranks 0..world_size-1, on a fresh master port.

        Returns each rank's exit code and output (text), in rank order. As soon as one rank fails,
        the others are killed (they would wait for it forever) and read -9. A job still running
        after ``timeout`` seconds is killed and raises ``subprocess.TimeoutExpired`` whose stderr
        holds every rank's.
        """
        port = self.next_port()
        with contextlib.ExitStack() as files:
            logs = [(files.enter_context(tempfile.TemporaryFile()), files.enter_context(tempfile.TemporaryFile()))
                    for _ in range(world_size)]
            procs = []
            try:
                for rank, (out, err) in enumerate(logs):
                    rank_argv = argv(rank) if callable(argv) else argv
                    procs.append(self.launch(rank_argv, rank, world_size, port, env, stdout=out, stderr=err))
                finished = _wait(procs, timeout)
            finally:
                _kill(procs)
            results = [subprocess.CompletedProcess(p.args, p.returncode, _text(out), _text(err))
                       for p, (out, err) in zip(procs, logs)]
        if not finished:
            raise subprocess.TimeoutExpired(procs[0].args, timeout, stderr="".join(
                f"--- rank {rank} ({r.returncode}):\n{r.stderr}" for rank, r in enumerate(results)))
        return results

    def close(self) -> None:
        """Kill this link's ranks that still run and delete its namespaces (idempotent)."""
        if os.getpid() != self._owner:
            return
        _kill(self._procs)
        for name in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self._namespaces.clear()
        _live.discard(self)

    def __enter__(self) -> NetLink:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _wait(procs: list[subprocess.Popen], timeout: float) -> bool:
    """Wait until every process has exited or one has failed (True), or ``timeout`` s pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        if all(code is not None for code in codes) or any(code not in (None, 0) for code in codes):
            return True
        time.sleep(0.02)
    return False


def _kill(procs: list[subprocess.Popen]) -> None:
    """SIGKILL the sessions of the processes still running (each leads its own) and reap them."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _text(file: IO[bytes]) -> str:
    file.seek(0)
    return file.read().decode(errors="replace")


def _remove_stale_namespaces() -> None:
    """Delete the namespaces of NetLinks whose process is gone (it was SIGKILLed)."""
    for line in _run(["ip", "netns", "list"]).splitlines():
        match = NAMESPACE_PATTERN.fullmatch(line.split(" ")[0])
        if match and not _alive(int(match.group(1))):
            subprocess.run(["ip", "netns", "del", match.group(0)], capture_output=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def _close_all() -> None:
    for link in list(_live):
        link.close()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """Close every link, then do what the signal did before: call that handler, or die of it."""
    _close_all()
    previous = _previous_handlers.get(signum)
    if callable(previous):
        previous(signum, frame)
    else:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_signal_handlers() -> None:
    """Put ``_on_signal`` in front of SIGTERM's and SIGINT's handlers (main thread only; an ignored
    signal stays ignored)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)
        if previous not in (_on_signal, signal.SIG_IGN):
            _previous_handlers[signum] = previous
            signal.signal(signum, _on_signal)


atexit.register(_close_all)

SELFTEST_RATES = (None, "1gbit", "160mbit")
SELFTEST_BYTES = 4 * 2 ** 20   # float32 tensor of every collective, bytes (per rank)
SELFTEST_REPEATS = 7


def _selftest_rank() -> None:
    """A rank of the self-test: per rate, per collective, one JSON line of bytes sent and seconds per op."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    n, size = dist.get_world_size(), SELFTEST_BYTES
    x = torch.ones(size // 4)
    gathered, flat = [torch.empty_like(x) for _ in range(n)], torch.empty(n * x.numel())
    exchanged, part = torch.empty_like(x), torch.empty(x.numel() // n)
    collectives = {  # name: (op, payload bytes a ring algorithm sends per rank)
        "all_gather": (lambda: dist.all_gather(gathered, x), (n - 1) * size),
        "all_gather_into_tensor": (lambda: dist.all_gather_into_tensor(flat, x), (n - 1) * size),
        "all_reduce": (lambda: dist.all_reduce(x.clone()), 2 * (n - 1) * size // n),
        "all_to_all_single": (lambda: dist.all_to_all_single(exchanged, x), (n - 1) * size // n),
        "reduce_scatter_tensor": (lambda: dist.reduce_scatter_tensor(part, x), (n - 1) * size // n),
    }
    for rate in SELFTEST_RATES:
        dist.barrier()
        shape(rate)
        for name, (op, payload) in collectives.items():
            op()
            dist.barrier()
            sent, seconds = tx_bytes(), []
            for _ in range(SELFTEST_REPEATS):
                start = time.perf_counter()
                op()
                seconds.append(time.perf_counter() - start)
            dist.barrier()  # the peer has received all of it: every byte is past this host's qdisc
            sent = tx_bytes() - sent
            print(json.dumps({"rate": rate, "op": name, "payload": payload, "sent": sent / SELFTEST_REPEATS,
                              "seconds": statistics.median(seconds)}), flush=True)
    dist.destroy_process_group()


def selftest() -> int:
    """2 hosts, a 2-rank gloo job: per rate and collective, payload vs wire bytes and throughput."""
    ok, reason = namespaces_available()
    if not ok:
        print(f"netlink: network namespaces unavailable: {reason}")
        return 1
    with NetLink(hosts=2) as link:
        results = link.run_ranks([sys.executable, str(Path(__file__).resolve()), "--selftest-rank"],
                                 world_size=2, timeout=600, env={"OMP_NUM_THREADS": "1"})
    if any(r.returncode for r in results):
        print("".join(f"--- rank {rank} ({r.returncode}):\n{r.stderr}" for rank, r in enumerate(results)))
        return 1
    rows = [[json.loads(line) for line in r.stdout.splitlines()] for r in results]
    print(f"{'rate':>8} {'collective':<23} {'payload B':>10} {'tx rank 0':>10} {'tx rank 1':>10} "
          f"{'tx/payload':>10} {'ms/op':>7} {'Gbit/s':>7}")
    for per_rank in zip(*rows):
        first, seconds = per_rank[0], max(row["seconds"] for row in per_rank)
        ratio = max(row["sent"] for row in per_rank) / first["payload"]
        print(f"{first['rate'] or 'none':>8} {first['op']:<23} {first['payload']:>10} "
              f"{per_rank[0]['sent']:>10.0f} {per_rank[1]['sent']:>10.0f} {ratio:>10.4f} "
              f"{seconds * 1e3:>7.1f} {first['payload'] * 8 / seconds / 1e9:>7.3f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--selftest", action="store_true", help="measure a 2-host link at three rates")
    parser.add_argument("--selftest-rank", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.selftest_rank:
        _selftest_rank()
        return 0
    if args.selftest:
        return selftest()
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
