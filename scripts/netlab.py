#!/usr/bin/env python3
"""A mini-cluster in network namespaces, for pyproxy's kernel tests and its demo.

pyproxy exists to program a kernel, so its traffic tests need a real node, real
pods and a real client, but must never touch the machine's own network. This
module builds exactly that inside namespaces it creates (and only those), with
addresses from 198.18.0.0/15, and tears it all down again::

                 client (198.18.100.2/24)          routes 198.18.0.0/16 via the node
                    | eth0
                    | eth0 198.18.100.1/24
    node  -------------------------------------  ip_forward=1, rp_filter=0; pyproxy runs here
      vpod1 198.18.0.1/32   vpod2 ...   vpod3 ...    route 198.18.1.N/32 dev vpodN
        |                     |           |
      pod1 eth0 198.18.1.1/32 pod2 ...    pod3 ...   default via 198.18.0.1 (on-link)

Pods sit on routed /32 veths with no bridge (and br_netfilter is never loaded),
so every pod-to-pod and hairpin packet is forwarded by the node and crosses its
netfilter hooks, exactly where pyproxy's rules live.

Service VIPs (ClusterIP 198.18.200.0/24, externalIPs 198.18.201.0/24,
LoadBalancer 198.18.202.0/24) reach the node over the pods' default routes and
the client's /16 route; the node DNATs them in PREROUTING. For the node's own
traffic, the route lookup happens *before* nat OUTPUT can DNAT, so the node needs
some route covering the VIPs or connect() fails with ENETUNREACH before any rule
sees the packet. The node therefore routes 198.18.192.0/18 via the client, like a
real node's default route to its gateway: a DNATed packet is re-routed to the
pod, and a VIP nobody programmed leaves towards the client, which does not
forward, and is dropped there (a TIMEOUT, as on a real network). The node also
holds a blackhole route for the pod CIDR (as Calico does for its blocks), so a
pod address that does not exist times out instead of drawing an ICMP error.

Probing is done by one long-lived agent process per namespace speaking JSON
lines on stdin/stdout, because `ip netns exec` per connection costs tens of
milliseconds. Every helper process (agent, echo server) exits by itself after at
most an hour, or when its parent is gone.

Use it as a library (``with Lab() as lab: ...``) or from the command line::

    netlab.py up --hold 600      # build a lab with echo servers, keep it until Ctrl-C
    netlab.py demo               # what scripts/demo.sh runs
    netlab.py destroy pp1a2b     # remove a lab left behind by a killed process
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
import json
import logging
import os
import re
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent

NODE_IP = "198.18.100.1"
CLIENT_IP = "198.18.100.2"
LINK_PREFIXLEN = 24
POD_GATEWAY = "198.18.0.1"
CLUSTER_CIDR = "198.18.1.0/24"
POD_IP_FORMAT = "198.18.1.{}"
CLIENT_ROUTE = "198.18.0.0/16"
VIP_ROUTE = "198.18.192.0/18"  # covers 198.18.200-202.x: ClusterIP, externalIP, LoadBalancer
MAX_PODS = 64  # keeps 198.18.1.99 free as a "no such pod" address

REFUSED = "REFUSED"
TIMEOUT = "TIMEOUT"
EMPTY = "EMPTY"

MAX_LIFETIME = 3600.0  # no helper process outlives this, even if orphaned
MAX_PROBE_COUNT = 10_000
MAX_PROBE_TIMEOUT = 30.0
START_TIMEOUT = 30.0  # Python can take seconds to start under User-mode Linux

Proto = Literal["tcp", "udp"]

_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{1,9}$")
_REFUSED_ERRNOS = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH}

log = logging.getLogger("netlab")


class LabError(RuntimeError):
    """The lab could not be built or a helper process misbehaved."""


@dataclass(frozen=True)
class Pod:
    """One pod namespace: its logical name, address, real netns and node-side veth."""

    name: str
    ip: str
    netns: str
    host_if: str


# --------------------------------------------------------------------------- probing


def _classify(exc: OSError) -> str:
    """Map a socket error to the probe vocabulary, keeping unexpected ones visible."""
    if isinstance(exc, TimeoutError) or exc.errno == errno.ETIMEDOUT:
        return TIMEOUT
    if exc.errno in _REFUSED_ERRNOS:
        return REFUSED
    name = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else type(exc).__name__
    return f"ERROR {name}"


def _tcp_probe(ip: str, port: int, timeout: float) -> str:
    """Connect, read one line until EOF or newline; the echo server speaks first."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.settimeout(timeout)
            sock.connect((ip, port))
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                data = sock.recv(4096)
                if not data:
                    break
                chunks.append(data)
                if b"\n" in data:
                    break
        except OSError as exc:
            return _classify(exc)
    return b"".join(chunks).decode(errors="replace").strip() or EMPTY


def _udp_exchange(sock: socket.socket, timeout: float) -> str:
    """Send one datagram on a connected socket and wait for one answer.

    The socket is connected so that an ICMP port unreachable (a REJECT) surfaces
    at once as ConnectionRefusedError instead of waiting for the timeout.
    """
    try:
        sock.settimeout(timeout)
        sock.send(b"probe\n")
        data = sock.recv(65535)
    except OSError as exc:
        return _classify(exc)
    return data.decode(errors="replace").strip() or EMPTY


def _udp_socket(ip: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((ip, port))
    return sock


def run_probe(
    proto: str, ip: str, port: int, count: int, timeout: float, same_socket: bool
) -> list[str]:
    """Probe ``count`` times from the current namespace; runs inside the agent."""
    replies: list[str] = []
    if proto == "tcp":
        return [_tcp_probe(ip, port, timeout) for _ in range(count)]
    if proto != "udp":
        raise ValueError(f"unknown protocol {proto!r}")
    if same_socket:
        try:
            sock = _udp_socket(ip, port)
        except OSError as exc:
            return [_classify(exc)] * count
        with sock:
            return [_udp_exchange(sock, timeout) for _ in range(count)]
    for _ in range(count):
        try:
            sock = _udp_socket(ip, port)
        except OSError as exc:
            replies.append(_classify(exc))
            continue
        with sock:
            replies.append(_udp_exchange(sock, timeout))
    return replies


def spread(replies: Iterable[str]) -> dict[str, int]:
    """Count who answered: the first word of each reply (a pod name, REFUSED, TIMEOUT...)."""
    counts = Counter((reply.split() or [EMPTY])[0] for reply in replies)
    return dict(sorted(counts.items()))


# --------------------------------------------------------------------------- helper processes


def _bound_lifetime(lifetime: float) -> None:
    """SIGALRM's default action ends the process: a hard cap even while blocked in a read."""
    signal.alarm(max(1, int(min(lifetime, MAX_LIFETIME))))


def serve_agent(lifetime: float = MAX_LIFETIME) -> int:
    """Answer JSON-line requests on stdin until EOF (the lab closed or died)."""
    _bound_lifetime(lifetime)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the lab, not the terminal, ends us
    for line in sys.stdin:
        try:
            req = json.loads(line)
            if req.get("op") == "ping":
                resp: dict[str, Any] = {"ok": True}
            elif req.get("op") == "probe":
                replies = run_probe(
                    str(req["proto"]),
                    str(req["ip"]),
                    int(req["port"]),
                    min(int(req.get("count", 1)), MAX_PROBE_COUNT),
                    min(float(req.get("timeout", 1.0)), MAX_PROBE_TIMEOUT),
                    bool(req.get("same_socket", False)),
                )
                resp = {"ok": True, "replies": replies}
            else:
                resp = {"ok": False, "error": f"unknown op {req.get('op')!r}"}
        except Exception as exc:  # report, keep serving: one bad request is not fatal
            resp = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(resp) + "\n")
        sys.stdout.flush()
    return 0


def serve_echo(
    name: str,
    tcp_ports: Sequence[int],
    udp_ports: Sequence[int],
    lifetime: float = MAX_LIFETIME,
    parent_pid: int | None = None,
) -> int:
    """Answer every TCP connection and UDP datagram with ``"<name> <peer_ip>\\n"``.

    The peer address in the answer is what lets tests see SNAT/masquerading from
    the pod's point of view. Prints READY once all sockets are bound, so the lab
    knows the kernel will queue connections from then on.
    """
    _bound_lifetime(lifetime)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    deadline = time.monotonic() + min(lifetime, MAX_LIFETIME)
    sel = selectors.DefaultSelector()
    try:
        for port in tcp_ports:
            tsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tsock.bind(("0.0.0.0", port))
            tsock.listen(256)
            tsock.setblocking(False)
            sel.register(tsock, selectors.EVENT_READ, "tcp")
        for port in udp_ports:
            usock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            usock.bind(("0.0.0.0", port))
            usock.setblocking(False)
            sel.register(usock, selectors.EVENT_READ, "udp")
    except OSError as exc:
        print(f"ERROR binding: {exc}", flush=True)
        return 1
    print("READY", flush=True)

    def answer(peer: tuple[str, int]) -> bytes:
        return f"{name} {peer[0]}\n".encode()

    while (left := deadline - time.monotonic()) > 0:
        if parent_pid is not None and os.getppid() != parent_pid:
            break  # orphaned: the lab is gone
        for key, _ in sel.select(timeout=min(left, 0.5)):
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            if key.data == "tcp":
                try:
                    conn, peer = sock.accept()
                except OSError:
                    continue
                with conn:
                    try:
                        conn.settimeout(1.0)
                        conn.sendall(answer(peer))
                        conn.setblocking(False)
                        with contextlib.suppress(OSError):
                            conn.recv(65536)  # drain, so close() sends FIN rather than RST
                    except OSError:
                        pass
            else:
                try:
                    _, peer = sock.recvfrom(65535)
                    sock.sendto(answer(peer), peer)
                except OSError:
                    continue
    return 0


class _LineReader:
    """Reads newline-terminated lines from a pipe with a deadline (no thread needed)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def readline(self, timeout: float) -> str | None:
        """One line without its newline; None on EOF; TimeoutError when the deadline passes."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            with selectors.DefaultSelector() as sel:
                sel.register(self.fd, selectors.EVENT_READ)
                if not sel.select(left):
                    continue
            data = os.read(self.fd, 65536)
            if not data:
                return None
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode(errors="replace")


class _Agent:
    """The lab's handle on one probe agent; serialises requests from several threads."""

    def __init__(self, ns: str, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.ns = ns
        self.proc = proc
        self.lock = threading.Lock()
        self.reader = _LineReader(proc.stdout.fileno())

    def request(self, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        with self.lock:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
                self.proc.stdin.flush()
                line = self.reader.readline(timeout)
            except (OSError, TimeoutError) as exc:
                raise LabError(f"probe agent in {self.ns} failed: {exc!r}") from exc
            if line is None:
                raise LabError(f"probe agent in {self.ns} exited ({self.proc.poll()})")
            resp: dict[str, Any] = json.loads(line)
            if not resp.get("ok"):
                raise LabError(f"probe agent in {self.ns}: {resp.get('error')}")
            return resp

    def close(self) -> None:
        """EOF on stdin is the agent's signal to exit; kill it if it does not."""
        with contextlib.suppress(Exception):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        _stop_processes([self.proc])


def _stop_processes(procs: Sequence[subprocess.Popen[Any]], grace: float = 2.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; always reaps, never raises."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.terminate()
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(5)
        except Exception:
            pass
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.close()


# --------------------------------------------------------------------------- namespaces


def list_netns() -> list[str]:
    """Names of all named network namespaces (``ip netns list`` without the ids)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def _lab_netns(prefix: str) -> list[str]:
    """The namespaces a lab with this prefix creates, and nothing else."""
    pattern = re.compile(rf"^{re.escape(prefix)}-(node|client|pod\d+)$")
    return [name for name in list_netns() if pattern.match(name)]


def remove_netns(names: Iterable[str]) -> None:
    """Kill what still runs inside each namespace, then delete it; never raises.

    Processes left inside would keep a deleted namespace (and its veths) alive.
    Only processes whose network namespace is one of ours are touched.
    """
    for name in names:
        pids = subprocess.run(
            ["ip", "netns", "pids", name], capture_output=True, text=True, check=False
        ).stdout.split()
        for pid in pids:
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        result = subprocess.run(
            ["ip", "netns", "del", name], capture_output=True, text=True, check=False
        )
        if result.returncode != 0 and name in list_netns():
            log.warning("could not delete netns %s: %s", name, result.stderr.strip())


def destroy_prefix(prefix: str) -> list[str]:
    """Remove a lab by prefix (for labs whose owner was killed); returns what was removed."""
    if not _PREFIX_RE.match(prefix):
        raise LabError(f"not a lab prefix: {prefix!r}")
    names = _lab_netns(prefix)
    remove_netns(names)
    return names


# --------------------------------------------------------------------------- the lab


class Lab:
    """The mini-cluster: ``node``, ``client`` and ``pod1..podN`` namespaces.

    Namespace names carry a random prefix (``pp<4 hex>-node``...) so that several
    labs, e.g. from parallel test runs, coexist. ``destroy()`` is idempotent and
    quiet, and also runs at interpreter exit if the owner forgot.

    Typical use in a kernel test::

        with Lab() as lab:                       # node, client, pod1..pod3
            lab.start_echo_all()                 # TCP 8080, 8081 and UDP 5353 in every pod
            lab.run("node", "iptables-restore", "--noflush", input=rules)
            replies = lab.probe("client", "tcp", "198.18.100.1", 30080, count=30)
            assert spread(replies) == {...}      # {"pod1": 9, "pod2": 11, ...}
    """

    def __init__(
        self,
        pods: int = 3,
        *,
        tcp_ports: Sequence[int] = (8080, 8081),
        udp_ports: Sequence[int] = (5353,),
        prefix: str | None = None,
        python: str | None = None,
    ) -> None:
        if not 1 <= pods <= MAX_PODS:
            raise ValueError(f"pods must be between 1 and {MAX_PODS}")
        existing = {name.split("-", 1)[0] for name in list_netns()}
        if prefix is None:
            prefix = "pp" + secrets.token_hex(2)
            while prefix in existing:
                prefix = "pp" + secrets.token_hex(2)
        elif not _PREFIX_RE.match(prefix):
            raise ValueError(f"prefix must match {_PREFIX_RE.pattern}")
        elif prefix in existing:
            raise LabError(f"namespaces with prefix {prefix!r} already exist")
        self.prefix = prefix
        self.tcp_ports = tuple(tcp_ports)
        self.udp_ports = tuple(udp_ports)
        self.python = python or sys.executable
        self.node_ip = NODE_IP
        self.client_ip = CLIENT_IP
        self.pod_gateway = POD_GATEWAY
        self.cluster_cidr = CLUSTER_CIDR
        self.pods = [
            Pod(f"pod{i}", POD_IP_FORMAT.format(i), f"{prefix}-pod{i}", f"vpod{i}")
            for i in range(1, pods + 1)
        ]
        self._created = False
        self._netns_made: list[str] = []
        self._agents: dict[str, _Agent] = {}
        self._agents_lock = threading.Lock()
        self._echo: dict[str, subprocess.Popen[bytes]] = {}
        self._spawned: list[subprocess.Popen[Any]] = []

    # -- names

    @property
    def logical_names(self) -> list[str]:
        """Every namespace's logical name: node, client, pod1..podN."""
        return ["node", "client", *(pod.name for pod in self.pods)]

    def ns_name(self, logical: str) -> str:
        """The real netns name for a logical one ("node", "client", "pod1"...)."""
        if logical not in self.logical_names:
            raise KeyError(f"no namespace {logical!r} in this lab ({self.logical_names})")
        return f"{self.prefix}-{logical}"

    def pod(self, name: str) -> Pod:
        """Look a pod up by logical name."""
        for pod in self.pods:
            if pod.name == name:
                return pod
        raise KeyError(f"no pod {name!r} in this lab")

    @property
    def processes(self) -> list[subprocess.Popen[Any]]:
        """Every helper process the lab started (agents, echo servers, spawned)."""
        return [
            *(agent.proc for agent in self._agents.values()),
            *self._echo.values(),
            *self._spawned,
        ]

    # -- lifecycle

    def __enter__(self) -> Lab:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def create(self) -> Lab:
        """Build the namespaces, links, addresses, routes and sysctls (about 0.3 s)."""
        if self._created:
            raise LabError("lab already created")
        self._created = True
        atexit.register(self.destroy)
        try:
            self._build()
        except BaseException:
            self.destroy()
            raise
        return self

    def _build(self) -> None:
        for logical in self.logical_names:
            name = self.ns_name(logical)
            _run(["ip", "netns", "add", name])
            self._netns_made.append(name)
        # New namespaces inherit the host's IPv4 conf (rp_filter, forwarding), so
        # set what the lab relies on before any interface exists to copy "default".
        # icmp_ratelimit/ratemask 0: a REJECT answers every probe, not 6 then 1/s.
        no_icmp_limit = {"net.ipv4.icmp_ratelimit": "0", "net.ipv4.icmp_ratemask": "0"}
        self._sysctl(
            "node",
            {
                "net.ipv4.ip_forward": "1",
                "net.ipv4.conf.all.rp_filter": "0",
                "net.ipv4.conf.default.rp_filter": "0",
                # A client->VIP packet nobody DNATed goes back out eth0; no ICMP
                # redirect may then teach the client a route behind a test's back.
                "net.ipv4.conf.all.send_redirects": "0",
                "net.ipv4.conf.default.send_redirects": "0",
                **no_icmp_limit,
            },
        )
        for logical in ["client", *(pod.name for pod in self.pods)]:
            # Not routers: a VIP packet nobody DNATed dies here instead of looping.
            self._sysctl(logical, {"net.ipv4.ip_forward": "0", **no_icmp_limit})

        client_ns = self.ns_name("client")
        node = [
            "link set lo up",
            f"link add eth0 type veth peer name eth0 netns {client_ns}",
            f"addr add {NODE_IP}/{LINK_PREFIXLEN} dev eth0",
            "link set eth0 up",
        ]
        for pod in self.pods:
            node += [
                f"link add {pod.host_if} type veth peer name eth0 netns {pod.netns}",
                f"addr add {POD_GATEWAY}/32 dev {pod.host_if}",
                f"link set {pod.host_if} up",
                f"route add {pod.ip}/32 dev {pod.host_if}",
            ]
        self._ip_batch("node", node)
        self._ip_batch(
            "client",
            [
                "link set lo up",
                f"addr add {CLIENT_IP}/{LINK_PREFIXLEN} dev eth0",
                "link set eth0 up",
                f"route add {CLIENT_ROUTE} via {NODE_IP} dev eth0",
            ],
        )
        for pod in self.pods:
            self._ip_batch(
                pod.name,
                [
                    "link set lo up",
                    f"addr add {pod.ip}/32 dev eth0",
                    "link set eth0 up",
                    f"route add {POD_GATEWAY} dev eth0 scope link",
                    f"route add default via {POD_GATEWAY} dev eth0",
                ],
            )
        # After the client's end is up, so the gateway is reachable.
        self._ip_batch(
            "node",
            [
                f"route add {VIP_ROUTE} via {CLIENT_IP} dev eth0",
                f"route add blackhole {CLUSTER_CIDR}",
            ],
        )

    def destroy(self) -> None:
        """Stop every helper process and delete the namespaces; idempotent, never raises."""
        try:
            atexit.unregister(self.destroy)
            with self._agents_lock:
                agents, self._agents = list(self._agents.values()), {}
            for agent in agents:
                agent.close()
            procs = [*self._echo.values(), *self._spawned]
            self._echo, self._spawned = {}, []
            _stop_processes(procs)
            names = [*self._netns_made, *_lab_netns(self.prefix)] if self._created else []
            self._netns_made = []
            remove_netns(dict.fromkeys(names))
        except Exception:  # destroy runs in finally blocks: never mask the real error
            log.warning("netlab destroy of %s failed", self.prefix, exc_info=True)

    # -- running things

    def run(
        self,
        ns: str,
        *argv: str,
        check: bool = True,
        timeout: float = 60.0,
        input: str | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in a namespace (via ``ip netns exec``) and capture its output."""
        return _run(
            ["ip", "netns", "exec", self.ns_name(ns), *argv],
            check=check,
            timeout=timeout,
            input=input,
            cwd=cwd,
        )

    def spawn(self, ns: str, *argv: str, **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start a long-running command in a namespace; destroy() stops it."""
        popen_kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns_name(ns), *argv], **popen_kwargs)
        self._spawned.append(proc)
        return proc

    def _ip_batch(self, ns: str, commands: list[str]) -> None:
        """One ``ip`` process per namespace for many commands: creation stays fast."""
        _run(["ip", "-n", self.ns_name(ns), "-batch", "-"], input="\n".join(commands) + "\n")

    def _sysctl(self, ns: str, values: dict[str, str]) -> None:
        """Set sysctls by writing /proc/sys in the namespace (procps may be absent)."""
        script = "; ".join(
            f"echo {value} > /proc/sys/{key.replace('.', '/')}" for key, value in values.items()
        )
        self.run(ns, "sh", "-ec", script)

    def _helper(self, ns: str, *args: str) -> subprocess.Popen[bytes]:
        """Start this script in a namespace, detached from the terminal's Ctrl-C."""
        return subprocess.Popen(
            ["ip", "netns", "exec", self.ns_name(ns), self.python, "-u", str(SCRIPT), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )

    # -- echo servers

    def start_echo(
        self,
        pod: str,
        tcp_ports: Sequence[int] | None = None,
        udp_ports: Sequence[int] | None = None,
        *,
        timeout: float = START_TIMEOUT,
    ) -> None:
        """Start (or restart) the echo server in a pod and wait until its ports are bound."""
        target = self.pod(pod)
        self.stop_echo(pod)
        tcp = self.tcp_ports if tcp_ports is None else tuple(tcp_ports)
        udp = self.udp_ports if udp_ports is None else tuple(udp_ports)
        proc = self._helper(
            target.name,
            "echo",
            "--name",
            target.name,
            "--tcp",
            ",".join(map(str, tcp)),
            "--udp",
            ",".join(map(str, udp)),
            "--parent-pid",
            str(os.getpid()),
        )
        self._echo[target.name] = proc
        assert proc.stdout is not None
        try:
            line = _LineReader(proc.stdout.fileno()).readline(timeout)
        except TimeoutError:
            line = f"no answer within {timeout} s"
        if line != "READY":
            self.stop_echo(pod)
            raise LabError(f"echo server in {pod} did not start: {line or 'exited'}")

    def start_echo_all(self) -> None:
        """Echo servers on the lab's default ports in every pod."""
        for pod in self.pods:
            self.start_echo(pod.name)

    def stop_echo(self, pod: str) -> None:
        """Stop a pod's echo server (e.g. to see a backend go away); no-op if none."""
        proc = self._echo.pop(self.pod(pod).name, None)
        if proc is not None:
            _stop_processes([proc])

    # -- probing

    def _agent(self, ns: str) -> _Agent:
        with self._agents_lock:
            agent = self._agents.get(ns)
            if agent is not None and agent.proc.poll() is None:
                return agent
            if agent is not None:  # it died (killed by a test?): reap it, start afresh
                agent.close()
            proc = self._helper(ns, "agent")
            agent = _Agent(ns, proc)
            self._agents[ns] = agent
        agent.request({"op": "ping"}, START_TIMEOUT)
        return agent

    def probe(
        self,
        ns: str,
        proto: Proto,
        ip: str,
        port: int,
        count: int = 1,
        timeout: float = 1.0,
        same_socket: bool = False,
    ) -> list[str]:
        """Connect ``count`` times from namespace ``ns``; one answer string per attempt.

        Each answer is the echo reply ("pod2 198.18.100.2"), REFUSED (RST or ICMP
        unreachable), TIMEOUT, EMPTY (connected but no data) or "ERROR <ERRNO>".
        UDP uses a new socket per datagram unless ``same_socket`` (one conntrack
        entry for all of them).
        """
        if proto not in ("tcp", "udp"):
            raise ValueError(f"proto must be 'tcp' or 'udp', not {proto!r}")
        if not 1 <= count <= MAX_PROBE_COUNT:
            raise ValueError(f"count must be between 1 and {MAX_PROBE_COUNT}")
        if not 0 < timeout <= MAX_PROBE_TIMEOUT:
            raise ValueError(f"timeout must be in (0, {MAX_PROBE_TIMEOUT}]")
        self.ns_name(ns)
        msg = {
            "op": "probe",
            "proto": proto,
            "ip": ip,
            "port": port,
            "count": count,
            "timeout": timeout,
            "same_socket": same_socket,
        }
        resp = self._agent(ns).request(msg, count * (timeout + 0.5) + 10.0)
        return [str(reply) for reply in resp["replies"]]


def _run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 60.0,
    input: str | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """subprocess.run with captured text output; a failure's message includes stderr."""
    result = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, input=input, cwd=cwd
    )
    if check and result.returncode != 0:
        exc = subprocess.CalledProcessError(
            result.returncode, list(argv), result.stdout, result.stderr
        )
        exc.add_note(f"stderr: {result.stderr.strip()}")
        raise exc
    return result


# --------------------------------------------------------------------------- demo


@dataclass(frozen=True)
class _DemoTarget:
    """One Service address the demo sends traffic to, and from which namespace."""

    service: str  # "demo/web ClusterIP"
    source: str
    proto: Proto
    ip: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}/{self.proto}"


def _demo_targets(manifests: Path, node_ip: str) -> list[_DemoTarget]:
    """Read the example Services so the demo always matches the manifests it programs.

    ClusterIPs are tried from pod1 (inside the cluster), NodePorts from the client
    (outside it); TCP Services come first.
    """
    import yaml  # only the demo needs it; agents and echo servers stay stdlib-only

    targets: list[_DemoTarget] = []
    for path in sorted(manifests.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict) or doc.get("kind") != "Service":
                continue
            name = f"{doc['metadata'].get('namespace', 'default')}/{doc['metadata']['name']}"
            spec = doc["spec"]
            for port in spec.get("ports", []):
                proto: Proto = "udp" if port.get("protocol", "TCP") == "UDP" else "tcp"
                if spec.get("clusterIP") not in (None, "", "None"):
                    cluster_ip = spec["clusterIP"]
                    targets.append(
                        _DemoTarget(f"{name} ClusterIP", "pod1", proto, cluster_ip, port["port"])
                    )
                if port.get("nodePort"):
                    targets.append(
                        _DemoTarget(f"{name} NodePort", "client", proto, node_ip, port["nodePort"])
                    )
    return sorted(targets, key=lambda t: t.proto == "udp")


def _header(title: str, *explanation: str) -> None:
    print(f"\n=== {title} " + "=" * max(3, 74 - len(title)))
    for line in explanation:
        print(f"  {line}")
    print(flush=True)


def _pyproxy_chain_counts(lab: Lab) -> list[tuple[str, str, str, int]]:
    """(backend, table, chain, rule count) for every PYPROXY chain, in either backend."""
    rows: list[tuple[str, str, str, int]] = []
    for backend, tool in (("nf_tables", "iptables-nft-save"), ("legacy", "iptables-legacy-save")):
        result = lab.run("node", tool, check=False)
        if result.returncode != 0:
            continue
        table = ""
        chains: dict[tuple[str, str], int] = {}
        jumps = 0
        for line in result.stdout.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":PYPROXY"):
                chains.setdefault((table, line[1:].split()[0]), 0)
            elif line.startswith("-A PYPROXY"):
                key = (table, line.split()[1])
                chains[key] = chains.get(key, 0) + 1
            elif line.startswith("-A ") and "PYPROXY" in line:
                jumps += 1
        rows += [(backend, t, c, n) for (t, c), n in sorted(chains.items())]
        if jumps:
            rows.append((backend, "*", "(jumps from built-in chains)", jumps))
    return rows


def _print_chain_counts(lab: Lab) -> int:
    """Print the PYPROXY chains with their rule counts; returns how many chains exist."""
    rows = _pyproxy_chain_counts(lab)
    if not rows:
        print("  no PYPROXY chains in the node namespace")
        return 0
    print(f"  {'backend':<10} {'table':<7} {'chain':<40} {'rules':>5}")
    for backend, table, chain, count in rows:
        print(f"  {backend:<10} {table:<7} {chain:<40} {count:>5}")
    chains = sum(1 for row in rows if not row[2].startswith("("))
    print(f"  total: {chains} PYPROXY chains, {sum(row[3] for row in rows)} rules")
    return chains


def _show_output(result: subprocess.CompletedProcess[str], limit: int = 20) -> None:
    lines = (result.stdout + result.stderr).strip().splitlines()
    if len(lines) > limit:
        print(f"  | ... ({len(lines) - limit} earlier lines not shown)")
    for line in lines[-limit:]:
        print(f"  | {line}")


def _demo_traffic(lab: Lab, targets: Sequence[_DemoTarget], probes: int) -> bool:
    """Send ``probes`` new connections to each target; True if pods answered them all."""
    names = [pod.name for pod in lab.pods]
    print(
        f"  {'Service':<20} {'address':<24} {'from':<7}"
        + "".join(f"{n:>5}" for n in names)
        + f"{'other':>6}   pods saw source"
    )
    ok = True
    for t in targets:
        replies = lab.probe(t.source, t.proto, t.ip, t.port, count=probes, timeout=1.0)
        counts = spread(replies)
        others = {who: n for who, n in counts.items() if who not in names}
        sources = sorted({r.split()[1] for r in replies if r.split()[0] in names})
        print(
            f"  {t.service:<20} {t.address:<24} {t.source:<7}"
            + "".join(f"{counts.get(n, 0):>5}" for n in names)
            + f"{sum(others.values()):>6}   {', '.join(sources)}"
        )
        if others:
            ok = False
            print(f"  {'':<20} not answered by a pod: {others}")
    return ok


def run_demo(manifests: str, pyproxy: str, probes: int, state_file: str | None = None) -> int:
    """Build a lab, let pyproxy program it, show traffic, clean up. Returns an exit code."""
    targets = _demo_targets(ROOT / manifests, NODE_IP)
    ok = True
    _header(
        "1. A mini-cluster in network namespaces",
        "One node (where pyproxy runs), a client outside the cluster, three pods.",
        "Pods hang off the node on routed /32 veths, so all their traffic crosses the",
        "node's netfilter. Nothing outside these namespaces is touched.",
    )
    with Lab(pods=3) as lab:
        if state_file:  # lets demo.sh's EXIT trap remove the lab even if we are killed
            Path(state_file).write_text(lab.prefix + "\n")
        print(f"  {'node':<7} {lab.ns_name('node'):<15} {NODE_IP:<13} pyproxy runs here")
        print(f"  {'client':<7} {lab.ns_name('client'):<15} {CLIENT_IP:<13} outside the cluster")
        for pod in lab.pods:
            print(f"  {pod.name:<7} {pod.netns:<15} {pod.ip:<13} node side: {pod.host_if}")
        lab.start_echo_all()
        tcp, udp = ", ".join(map(str, lab.tcp_ports)), ", ".join(map(str, lab.udp_ports))
        print(f"  Each pod runs an echo server on TCP {tcp} and UDP {udp},")
        print("  answering '<pod name> <source IP it saw>'.")

        _header(
            "2. Before pyproxy: pods answer, Service addresses do not",
            "TIMEOUT: no rule DNATs the ClusterIP yet, so its packets go nowhere.",
            "REFUSED: nothing listens on the NodePort, so the node answers with a reset.",
        )
        for pod in lab.pods:
            port = lab.tcp_ports[0]
            reply = lab.probe("client", "tcp", pod.ip, port)[0]
            print(f"  {'client':<7} -> {f'{pod.ip}:{port}/tcp':<24} {reply:<24} ({pod.name})")
        for t in targets:
            reply = lab.probe(t.source, t.proto, t.ip, t.port, timeout=0.5)[0]
            print(f"  {t.source:<7} -> {t.address:<24} {reply:<24} ({t.service})")

        _header(
            "3. pyproxy programs the node from the manifests (one sync, then exit)",
            f"Manifests: {manifests}/ (Services, EndpointSlices, the Node object).",
        )
        argv = [
            pyproxy, "run", "--mode", "iptables", "--manifests", manifests,
            "--hostname-override", "node-a", "--cluster-cidr", CLUSTER_CIDR, "--once",
        ]  # fmt: skip
        print(f"  $ ip netns exec {lab.ns_name('node')} {' '.join(argv)}")
        result = lab.run("node", *argv, check=False, timeout=120, cwd=ROOT)
        _show_output(result)
        if result.returncode != 0:
            print(f"  pyproxy run failed with exit code {result.returncode}; skipping to cleanup")
            ok = False
        else:
            _header(
                "4. The rules it wrote (iptables-save in the node, PYPROXY chains only)",
                "SVC chains pick an endpoint at random, SEP chains DNAT to one pod,",
                "MARK-MASQ/POSTROUTING masquerade traffic from outside the cluster CIDR.",
            )
            if not _print_chain_counts(lab):
                ok = False

            _header(
                f"5. Real traffic: {probes} new connections to each Service address",
                "Columns pod1..pod3 count which pod answered. NodePort traffic from the client",
                f"is masqueraded, so the pods see the node ({POD_GATEWAY}). pod1's own ClusterIP",
                "traffic keeps its address, except when it lands on pod1 itself (hairpin).",
            )
            ok = _demo_traffic(lab, targets, probes) and ok

        _header(
            "6. pyproxy cleanup removes every rule it owns",
            "(it looks at both iptables backends, so one of them may report 0 lines)",
        )
        print(f"  $ ip netns exec {lab.ns_name('node')} {pyproxy} cleanup")
        result = lab.run("node", pyproxy, "cleanup", check=False, timeout=120, cwd=ROOT)
        _show_output(result)
        if result.returncode != 0:
            print(f"  pyproxy cleanup failed with exit code {result.returncode}")
            ok = False
        if _print_chain_counts(lab):
            ok = False

        _header("7. Tearing the mini-cluster down")
    print(f"  removed the namespaces {lab.prefix}-* and every process in them")
    print("\nDEMO " + ("OK" if ok else "FAILED: see above"))
    return 0 if ok else 1


# --------------------------------------------------------------------------- CLI


def _ports(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: helper processes (agent, echo) and operator commands."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    p_agent = sub.add_parser("agent", help="probe agent: JSON lines on stdin/stdout")
    p_agent.add_argument("--lifetime", type=float, default=MAX_LIFETIME)

    p_echo = sub.add_parser("echo", help="echo server answering '<name> <peer-ip>'")
    p_echo.add_argument("--name", required=True)
    p_echo.add_argument("--tcp", type=_ports, default=[])
    p_echo.add_argument("--udp", type=_ports, default=[])
    p_echo.add_argument("--lifetime", type=float, default=MAX_LIFETIME)
    p_echo.add_argument("--parent-pid", type=int, default=None)

    p_up = sub.add_parser("up", help="build a lab with echo servers and keep it for a while")
    p_up.add_argument("--pods", type=int, default=3)
    p_up.add_argument("--hold", type=float, default=600.0, help="seconds (max 3600)")

    p_destroy = sub.add_parser("destroy", help="remove the namespaces of a lab by its prefix")
    p_destroy.add_argument("prefix")

    sub.add_parser("list", help="list namespaces that look like netlab labs")

    p_demo = sub.add_parser("demo", help="pyproxy end to end (what scripts/demo.sh runs)")
    p_demo.add_argument("--manifests", default="manifests/examples")
    p_demo.add_argument("--pyproxy", default=".venv/bin/pyproxy")
    p_demo.add_argument("--probes", type=int, default=30)
    p_demo.add_argument("--state-file", default=None)

    args = parser.parse_args(argv)
    if args.cmd == "agent":
        return serve_agent(args.lifetime)
    if args.cmd == "echo":
        return serve_echo(args.name, args.tcp, args.udp, args.lifetime, args.parent_pid)
    if args.cmd == "destroy":
        try:
            removed = destroy_prefix(args.prefix)
        except LabError as exc:
            parser.error(str(exc))
        print("removed: " + (" ".join(removed) if removed else "nothing"))
        return 0
    if args.cmd == "list":
        for name in list_netns():
            if re.match(r"^[a-z][a-z0-9]{1,9}-(node|client|pod\d+)$", name):
                print(name)
        return 0
    # Turn SIGTERM into SystemExit so `with Lab()` tears down on kill, not only on Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.cmd == "up":
        with Lab(pods=args.pods) as lab:
            lab.start_echo_all()
            for logical in lab.logical_names:
                print(f"{logical:<7} ip netns exec {lab.ns_name(logical)} ...")
            print(
                f"holding for {min(args.hold, MAX_LIFETIME):.0f} s; Ctrl-C to tear down", flush=True
            )
            with contextlib.suppress(KeyboardInterrupt):
                time.sleep(min(args.hold, MAX_LIFETIME))
        return 0
    return run_demo(args.manifests, args.pyproxy, args.probes, args.state_file)


if __name__ == "__main__":
    sys.exit(main())
