"""Stale UDP flows on a real kernel: after a sync, the next datagram from the SAME socket.

A UDP client that keeps one socket open keeps one conntrack entry, refreshed by
every datagram, so the rules only ever see its first datagram. These tests hold
such a socket open across a re-sync (a small client process of their own, in a
lab namespace) and check that pyproxy deleted the entry the new rules would
otherwise never get to decide about:

- an endpoint removed from a UDP service: the next datagram reaches a live one
  (ClusterIP from a pod, NodePort from outside; `pyproxy run --once`, which
  reconciles, and a long-running agent, which diffs against its last sync);
- a UDP service that gains its first endpoint: the next datagram is answered.

Runs on both iptables backends in a fresh mini-cluster (scripts/netlab.py).
"""

from __future__ import annotations

import re
import selectors
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kernel import cluster
from tests.kernel.lab import PYPROXY, needs_root, netlab

pytestmark = [pytest.mark.kernel, needs_root]

REFUSED, TIMEOUT = netlab.REFUSED, netlab.TIMEOUT
NODE_IP = "198.18.100.1"
VIPS = {"two": "198.18.200.70", "first": "198.18.200.71", "late": "198.18.200.72",
        "agent": "198.18.200.73"}
NODE_PORT = 30070
SLICE_PORTS = [{"name": "dns", "port": 5353, "protocol": "UDP"}]

# The client: one connected UDP socket for its whole life. Each stdin line is a
# timeout; it sends one datagram and prints the answer, REFUSED or TIMEOUT.
# It ends at EOF on stdin, or after two minutes whatever happens.
CLIENT = r"""
import signal, socket, sys
signal.alarm(120)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.connect((sys.argv[1], int(sys.argv[2])))
print("READY", flush=True)
for line in sys.stdin:
    sock.settimeout(float(line))
    try:
        sock.send(b"probe\n")
        answer = sock.recv(4096).decode(errors="replace").strip()
    except ConnectionRefusedError:
        answer = "REFUSED"
    except TimeoutError:
        answer = "TIMEOUT"
    except OSError as exc:
        answer = f"ERROR {exc.errno}"
    print(answer, flush=True)
"""


class UDPClient:
    """A client socket that stays open in a lab namespace across syncs."""

    def __init__(self, lab: Any, ns: str, ip: str, port: int) -> None:
        self.proc: subprocess.Popen[str] = lab.spawn(
            ns, sys.executable, "-u", "-c", CLIENT, ip, str(port),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._line(30.0) == "READY"

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise AssertionError(f"UDP client silent for {timeout} s")
        return self.proc.stdout.readline().strip()

    def send(self, timeout: float = 1.0) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{timeout}\n")
        self.proc.stdin.flush()
        return self._line(timeout + 10.0)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def pod_of(reply: str) -> str:
    return reply.split()[0]


def udp_service(name: str, node_port: int = 0) -> dict[str, Any]:
    port: dict[str, Any] = {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}
    spec: dict[str, Any] = {"type": "ClusterIP", "clusterIP": VIPS[name],
                            "clusterIPs": [VIPS[name]], "ports": [port]}
    if node_port:
        spec["type"] = "NodePort"
        spec["externalTrafficPolicy"] = "Cluster"
        port["nodePort"] = node_port
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": cluster.NS}, "spec": spec}


def udp_slice(name: str, pods: list[str]) -> dict[str, Any]:
    return cluster.endpoint_slice(name, [cluster.endpoint(p) for p in pods] or None,
                                  ports=SLICE_PORTS)


class Node:
    """The lab, the backend under test, and a manifests directory pyproxy reads."""

    def __init__(self, lab: Any, backend: str, manifests: Path) -> None:
        self.lab, self.backend, self.manifests = lab, backend, manifests

    def argv(self) -> list[str]:
        return [PYPROXY, "run", "--manifests", str(self.manifests),
                "--hostname-override", cluster.NODE, "--cluster-cidr", "198.18.1.0/24",
                "--iptables-backend", self.backend]

    def write(self, objs: list[dict[str, Any]]) -> None:
        cluster.write(self.manifests, objs)

    def sync(self, objs: list[dict[str, Any]]) -> str:
        """`pyproxy run --once` on exactly these objects; its log."""
        self.write(objs)
        result: subprocess.CompletedProcess[str] = self.lab.run("node", *self.argv(), "--once")
        return result.stderr

    def flows(self, vip: str) -> str:
        """The node's UDP conntrack entries to one address, as conntrack(8) lists them."""
        out: str = self.lab.run("node", "conntrack", "-L", "-p", "udp", "--orig-dst", vip,
                                check=False).stdout
        return out

    def save(self) -> str:
        out: str = self.lab.run("node", f"iptables-{self.backend}-save", "-t", "nat").stdout
        return out


@pytest.fixture(scope="module", params=["nft", "legacy"])
def node(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Node]:
    with netlab.Lab() as lab:
        lab.start_echo_all()
        yield Node(lab, request.param, tmp_path_factory.mktemp(f"ct-{request.param}"))


@pytest.fixture
def clients(node: Node) -> Iterator[Callable[[str, str, int], UDPClient]]:
    made: list[UDPClient] = []

    def make(ns: str, ip: str, port: int) -> UDPClient:
        made.append(UDPClient(node.lab, ns, ip, port))
        return made[-1]

    yield make
    for c in made:
        c.close()


def pinned_pod(client: UDPClient) -> str:
    """Send until the flow is known to stick to one pod; that pod's name."""
    replies = [client.send() for _ in range(4)]
    pods = {pod_of(r) for r in replies}
    assert len(pods) == 1 and pods <= {"pod1", "pod2"}, replies
    return pods.pop()


OTHER = {"pod1": "pod2", "pod2": "pod1"}


@pytest.mark.parametrize(("ns", "target"), [("pod3", "cluster-ip"), ("client", "node-port")])
def test_removed_endpoint_next_datagram_reaches_a_live_one(
        node: Node, clients: Callable[[str, str, int], UDPClient], ns: str, target: str
) -> None:
    ip, port = (VIPS["two"], 53) if target == "cluster-ip" else (NODE_IP, NODE_PORT)
    node.sync([udp_service("two", NODE_PORT), udp_slice("two", ["pod1", "pod2"])])
    client = clients(ns, ip, port)
    gone = pinned_pod(client)

    log = node.sync([udp_service("two", NODE_PORT), udp_slice("two", [OTHER[gone]])])

    # The removed pod still runs and would answer: only a deleted entry moves the flow.
    reply = client.send()
    assert pod_of(reply) == OTHER[gone], f"{reply!r} after {gone} was removed\n{log}"
    assert [pod_of(client.send()) for _ in range(3)] == [OTHER[gone]] * 3
    assert re.search(r'msg="deleted stale conntrack entries" service=t/two .*entries=[1-9]',
                     log), log


def test_long_running_agent_deletes_flows_of_a_removed_endpoint(
        node: Node, clients: Callable[[str, str, int], UDPClient], tmp_path: Path) -> None:
    """The same through partial syncs of one process, which diff against their last sync."""
    objs = [udp_service("agent"), udp_slice("agent", ["pod1", "pod2"])]
    node.write(objs)
    log_path = tmp_path / "agent.log"
    with open(log_path, "wb") as out:
        agent = node.lab.spawn("node", *node.argv(), stdout=out, stderr=out,
                               stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: VIPS["agent"] in node.save(), "the agent's first sync", agent)
        client = clients("pod3", VIPS["agent"], 53)
        gone = pinned_pod(client)
        gone_ip = cluster.POD_IPS[gone]
        node.write([udp_service("agent"), udp_slice("agent", [OTHER[gone]])])
        wait_for(lambda: f"{gone_ip}:5353" not in node.save(), "the agent's re-sync", agent)
        # The entries are deleted right after the write, by the same sync: give it a moment.
        deadline = time.monotonic() + 2.0
        while "deleted stale conntrack" not in log_path.read_text() and (
                time.monotonic() < deadline):
            time.sleep(0.05)

        reply = client.send()
        assert pod_of(reply) == OTHER[gone], f"{reply!r}\n{log_path.read_text()}"
        log = log_path.read_text()
        assert re.search(r"deleted stale conntrack entries.*service=t/agent.*"
                         r'reason="endpoint no longer usable" entries=1', log), log
    finally:
        agent.terminate()
        try:
            agent.wait(10)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(5)


def wait_for(check: Callable[[], bool], what: str, proc: subprocess.Popen[Any],
             timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"pyproxy exited ({proc.returncode}) waiting for {what}")
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_first_endpoint_after_reject_is_answered(
        node: Node, clients: Callable[[str, str, int], UDPClient]) -> None:
    """A service with no endpoints REJECTs: refused, and nothing is left tracked.

    REJECT drops the datagram before conntrack confirms its entry, so this
    passes with or without the cleanup; the next test is the one that needs it.
    """
    node.sync([udp_service("first"), udp_slice("first", [])])
    client = clients("pod3", VIPS["first"], 53)
    assert client.send() == REFUSED
    assert client.send() == REFUSED
    assert VIPS["first"] not in node.flows(VIPS["first"])

    node.sync([udp_service("first"), udp_slice("first", ["pod1"])])
    assert pod_of(client.send()) == "pod1"


def test_first_endpoint_after_unprogrammed_vip_is_answered(
        node: Node, clients: Callable[[str, str, int], UDPClient]) -> None:
    """Datagrams sent before the service was programmed are tracked to the bare address.

    They leave by the node's route and are never answered (TIMEOUT), and each
    one refreshes the entry, so without the cleanup the client would stay
    blackholed for as long as it keeps sending.
    """
    node.sync([udp_service("first"), udp_slice("first", ["pod1"])])  # "late" not yet there
    client = clients("client", VIPS["late"], 53)
    assert client.send(timeout=0.5) == TIMEOUT
    assert "UNREPLIED" in node.flows(VIPS["late"]), "the datagram should be tracked"

    log = node.sync([udp_service("first"), udp_slice("first", ["pod1"]),
                     udp_service("late"), udp_slice("late", ["pod2"])])

    reply = client.send()
    assert pod_of(reply) == "pod2", f"{reply!r}\n{log}"
    assert re.search(r"deleted stale conntrack entries.*service=t/late", log), log
