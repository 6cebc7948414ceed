"""The long-running agent end to end: `pyproxy run` against the tests' API server, real kernel.

Each test starts pyproxy as a real process in the lab's node namespace
(scripts/netlab.py), talking to a FakeKubeAPI that listens on that namespace's
loopback, and checks what matters from outside: packets between the lab's
namespaces, the node's iptables-save, the agent's /healthz, /metrics and
health-check node ports, its log and the API server's request log. All rules
live in the lab's own namespaces; every wait is a bounded poll.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.api.agent_harness import (
    CLUSTER_CIDR,
    GATEWAY,
    NODE,
    NODE_IP,
    NS,
    POD_IPS,
    PROXY_NAME_LABEL,
    SELECTOR,
    Env,
    config_map,
    config_text,
    endpoint,
    endpoint_slice,
    http_get,
    http_port,
    jumps_of_plan,
    jumps_of_save,
    metric,
    node_object,
    owned_of,
    service,
    wait_for,
)
from tests.kernel.lab import PYPROXY, needs_root, netlab

pytestmark = [pytest.mark.kernel, needs_root]

REFUSED, TIMEOUT = netlab.REFUSED, netlab.TIMEOUT
PODS = ("pod1", "pod2", "pod3")


@pytest.fixture(scope="module")
def lab() -> Iterator[Any]:
    with netlab.Lab() as lab:
        lab.start_echo_all()
        yield lab


@pytest.fixture
def env(lab: Any, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Env]:
    """A fresh API server (FakeKubeAPI options via indirect parametrization) and this node."""
    e = Env(lab, tmp_path, **getattr(request, "param", {}))
    try:
        e.api.create(node_object())
        yield e
    finally:
        e.close()


def pods_of(replies: list[str]) -> set[str]:
    return {r.split()[0] for r in replies}


def peers_of(replies: list[str]) -> set[str]:
    return {r.split()[1] for r in replies if len(r.split()) == 2}


def answered_by_pod(replies: list[str]) -> bool:
    return all(r.split()[0] in PODS for r in replies)


def web(ip: str = "198.18.200.10", **kw: Any) -> dict[str, Any]:
    return service("web", ip, **kw)


def web_slice(*pods: str, **kw: Any) -> dict[str, Any]:
    return endpoint_slice("web", [endpoint(p) for p in pods], **kw)


def svc_chain_rules(env: Env, comment: str) -> dict[str, tuple[str, ...]]:
    """The nat chains of one service port, recognised by their comments (`t/web:http`)."""
    return {name: rules for name, rules in env.owned().get("nat", {}).items()
            if name.startswith(("PYPROXY-SVC-", "PYPROXY-SEP-", "PYPROXY-SVL-"))
            and any(f'"{comment}' in r for r in rules)}


# -- 1. real traffic ---------------------------------------------------------------------------


def test_service_created_through_the_api_answers_and_deleted_is_refused(env: Env) -> None:
    env.agent()
    vip = "198.18.200.10"
    t0 = time.monotonic()
    env.api.create(web(vip, type="NodePort", ports=[http_port(node_port=30080)],
                       externalTrafficPolicy="Cluster"))
    env.api.create(web_slice(*PODS))
    wait_for(lambda: answered_by_pod(env.probe("pod2", vip, 80, timeout=0.2)), 3.0,
             "the ClusterIP to answer")
    wait_for(lambda: answered_by_pod(env.probe("client", NODE_IP, 30080, timeout=0.2)), 3.0,
             "the NodePort to answer")
    took = time.monotonic() - t0
    assert took <= 2.0, f"the new Service answered only after {took:.2f} s"
    replies = env.probe("client", NODE_IP, 30080, count=30)
    assert pods_of(replies) == set(PODS), replies
    assert peers_of(replies) == {GATEWAY}

    t1 = time.monotonic()
    env.api.delete("Service", NS, "web")
    env.api.delete("EndpointSlice", NS, "web-a")
    wait_for(lambda: env.probe("client", NODE_IP, 30080, timeout=0.3) == [REFUSED], 3.0,
             "the NodePort to be refused")
    took = time.monotonic() - t1
    assert took <= 2.0, f"the deleted Service was refused only after {took:.2f} s"
    # The ClusterIP is nobody's now: not answered by any pod, and no chain is left for it.
    assert not answered_by_pod(env.probe("pod2", vip, 80, count=3, timeout=0.3))
    assert not [c for c in env.owned()["nat"] if c.startswith(("PYPROXY-SVC", "PYPROXY-SEP"))]


# -- 2. convergence under churn and faults -----------------------------------------------------


PORT_CHOICES = [("http", 80, 8080, "TCP"), ("alt", 81, 8081, "TCP"), ("dns", 53, 5353, "UDP")]
SLICE_PORTS = [("http", 8080, "TCP"), ("alt", 8081, "TCP"), ("dns", 5353, "UDP"),
               ("", 8080, "TCP")]
N_SERVICES = 24


def _random_service(rng: random.Random, i: int) -> dict[str, Any]:
    ns = "t" if i % 2 == 0 else "u"
    kind = rng.choice(["ClusterIP", "ClusterIP", "NodePort", "LoadBalancer"])
    chosen = rng.sample(PORT_CHOICES, rng.choice([1, 1, 2, 3]))
    unnamed = len(chosen) == 1 and rng.random() < 0.3
    ports = []
    for idx, (name, port, target, proto) in enumerate(chosen):
        p: dict[str, Any] = {"port": port, "targetPort": target, "protocol": proto}
        if not unnamed:
            p["name"] = name
        if kind != "ClusterIP":
            p["nodePort"] = 30000 + i * 3 + idx
        ports.append(p)
    spec: dict[str, Any] = {}
    labels: dict[str, str] = {}
    status = None
    if rng.random() < 0.25:
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": rng.choice([60, 10800])}}
    if kind != "ClusterIP":
        spec["externalTrafficPolicy"] = rng.choice(["Cluster", "Local"])
    if kind == "LoadBalancer":
        status = {"loadBalancer": {"ingress": [{"ip": f"198.18.202.{100 + i}",
                                                "ipMode": "VIP"}]}}
        if rng.random() < 0.3:
            spec["loadBalancerSourceRanges"] = [rng.choice(["198.18.100.0/24",
                                                            "198.18.150.0/24"])]
        if spec["externalTrafficPolicy"] == "Local":
            spec["healthCheckNodePort"] = 32000 + i
    if rng.random() < 0.2:
        spec["externalIPs"] = [f"198.18.201.{100 + i}"]
    if rng.random() < 0.15:
        spec["internalTrafficPolicy"] = "Local"
    if rng.random() < 0.08:
        labels[PROXY_NAME_LABEL] = "other"  # another proxy's: the agent must ignore it
    return service(f"s{i}", f"198.18.200.{100 + i}", ns=ns, type=kind, ports=ports,
                   labels=labels, status=status, **spec)


def _random_endpoint(rng: random.Random, pod: str) -> dict[str, Any]:
    roll = rng.random()
    if roll < 0.7:
        return endpoint(pod)
    if roll < 0.85:
        return endpoint(pod, ready=False, serving=True, terminating=True)
    return endpoint(pod, ready=False, serving=rng.random() < 0.5, terminating=False)


def _random_slice(rng: random.Random, i: int, suffix: str) -> dict[str, Any]:
    ns = "t" if i % 2 == 0 else "u"
    pods = rng.sample(PODS, rng.randint(0, 3))
    eps = [_random_endpoint(rng, p) for p in pods] if pods or rng.random() < 0.5 else None
    ports = [{"name": n, "port": p, "protocol": proto}
             for n, p, proto in rng.sample(SLICE_PORTS, rng.randint(1, 3))]
    sl = endpoint_slice(f"s{i}", eps, ns=ns, suffix=suffix, ports=ports)
    for ep in sl["endpoints"] or []:
        ep["targetRef"]["namespace"] = ns
    return sl


def _malformed(rng: random.Random, i: int) -> dict[str, Any]:
    what = rng.choice(["ip", "port", "address"])
    if what == "address":
        sl = _random_slice(rng, i, rng.choice("ab"))
        sl["endpoints"] = [{"addresses": ["not-an-ip"], "conditions": {"ready": True}}]
        return sl
    svc = _random_service(rng, i)
    if what == "ip":
        svc["spec"]["clusterIP"] = svc["spec"]["clusterIPs"][0] = "198.18.300.1"
    else:
        svc["spec"]["ports"][0]["port"] = 70000
    return svc


def _inject_fault(env: Env, n: int) -> str:
    """One fault of each kind in turn; "outage" is ended by the caller (see below)."""
    api = env.api
    kind = ("cut", "outage", "429", "500", "hang", "quiet-compact")[n % 6]
    if kind == "cut":
        api.cut_streams()
    elif kind == "outage":
        api.go_down()  # writes go on meanwhile; the caller compacts, then brings it back
    elif kind == "429":
        api.fail_next(1, 429, retry_after=1, path_contains="endpointslices")
        api.cut_streams()
    elif kind == "500":
        api.fail_next(1, 500)
        api.cut_streams()
    elif kind == "hang":
        api.hang_next(1, 1.0, path_contains="services")
        api.cut_streams()
    else:
        api.compact()  # while the watches stay open: only a later re-watch or relist sees it
    return kind


# Faults come every few hundred milliseconds here, not every few hours: bookmarks (real
# servers send one a minute) come as often, so a quiet informer still sees progress between
# two faults and its backoff starts over, as it would with faults at a real pace.
@pytest.mark.parametrize("env", [{"bookmark_interval": 0.2}], indirect=True)
def test_converges_to_plan_after_random_churn_with_faults(env: Env) -> None:
    rng = random.Random(20240611)
    agent = env.agent()
    present: dict[tuple[str, str, str], bool] = {}  # (kind, ns, name) -> exists
    faults: list[str] = []
    outage_ends: float | None = None
    malformed = 0

    def upsert(obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        present[(obj["kind"], meta["namespace"], meta["name"])] = True
        env.api.apply(obj)

    writes = 0
    while writes < 500:  # 500 creates, updates and deletes
        i = rng.randrange(N_SERVICES)
        ns = "t" if i % 2 == 0 else "u"
        roll = rng.random()
        if roll < 0.03:
            upsert(_malformed(rng, i))
            malformed += 1
        elif roll < 0.38:
            upsert(_random_service(rng, i))
        elif roll < 0.75:
            upsert(_random_slice(rng, i, rng.choice("ab")))
        else:
            kind = "Service" if roll < 0.87 else "EndpointSlice"
            name = f"s{i}" if kind == "Service" else f"s{i}-{rng.choice('ab')}"
            if not present.pop((kind, ns, name), False):
                continue  # nothing to delete: draw again
            env.api.delete(kind, ns, name)
        writes += 1
        fault_due = writes % 36 == 18 and writes < 450
        if outage_ends is not None and (fault_due or time.monotonic() >= outage_ends):
            time.sleep(max(0.0, outage_ends - time.monotonic()))
            # Writes happened while it was down and the history is gone: every informer's
            # resourceVersion is too old now, so each must relist (410 on its re-watch).
            env.api.compact()
            env.api.come_up()
            outage_ends = None
        if fault_due:
            # Each fault hits an agent whose three watches are open again, so the writes
            # in between reach it partly while it recovers and partly through live watches.
            assert env.api.wait_for_watches(3, timeout=10), f"no recovery after {faults}"
            faults.append(_inject_fault(env, len(faults)))
            if faults[-1] == "outage":  # longer than a first backoff: connects are refused
                outage_ends = time.monotonic() + 1.2
        time.sleep(0.004)
    assert malformed >= 5 and len(faults) == 12, (malformed, faults)

    manifests = env.tmp / "final"
    env.dump_manifests(manifests)
    planned_text = env.plan(manifests)
    planned = owned_of(planned_text)
    assert len(planned["nat"]) > 20, "the final objects should program a good number of chains"

    state: dict[str, Any] = {}

    def converged() -> bool:
        save = env.save()
        state["save"] = save
        return owned_of(save) == planned and jumps_of_save(save) == jumps_of_plan(planned_text)

    try:
        wait_for(converged, 20.0, "the programmed rules to equal `pyproxy plan`", interval=0.2)
    except AssertionError:
        have = owned_of(state["save"])
        diff = {t: sorted(set(have.get(t, {}).items()) ^ set(planned.get(t, {}).items()))
                for t in ("filter", "nat")}
        raise AssertionError(f"not converged; differing chains: {diff}\n"
                             f"{agent.log[-4000:]}") from None
    # The backoff starts over after progress: after all those faults, one more cut stream
    # costs under a second, not the up to 30 s of a backoff that kept growing.
    env.api.cut_streams()
    t0 = time.monotonic()
    env.api.create(service("final", "198.18.200.250"))
    wait_for(lambda: "198.18.200.250/32" in env.save(), 4.0, "a change after one more cut")
    took = time.monotonic() - t0
    assert took <= 2.0, f"a change after the faults took {took:.2f} s to be applied"

    # The faults were real: relists after 410s, backoff after errors, and the agent lived.
    log = agent.log
    for informer in ("services", "endpointslices"):
        assert f'relisting" informer={informer}' in log, f"{informer} never relisted"
        lists = [q for path, q in env.gets(f"/{informer}") if "watch" not in q]
        assert len(lists) >= 2, f"{informer}: no relist in the request log"
    for error in ("429", "500", "ProtocolError", "NewConnectionError"):
        assert re.search(rf"backing off.*{error}", log), f"no {error} reached the agent"
    assert re.search(r'skipping invalid object" kind=(Service|EndpointSlice)', log)
    assert agent.running


# -- 3. API server down ------------------------------------------------------------------------


def test_api_server_down_changes_nothing_and_return_is_picked_up(env: Env) -> None:
    env.api.create(web())
    env.api.create(web_slice("pod1"))
    agent = env.agent(config=config_text(iptables={"syncPeriod": "1s"}))
    wait_for(lambda: "--to-destination 198.18.1.1:8080" in env.save(), 5.0, "web's rules")
    before = env.save()

    env.api.go_down()
    samples = []
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        samples.append(env.save())
        status, body = env.healthz()
        assert status == 200 and body["healthy"], body
        time.sleep(0.25)
    assert all(s == before for s in samples), "rules changed while the API server was away"
    assert agent.log_lines(r"list/watch failed; backing off"), "the agent never noticed"
    assert pods_of(env.probe("pod2", "198.18.200.10", 80, count=5)) == {"pod1"}

    env.api.come_up()
    t0 = time.monotonic()
    env.api.update(web_slice("pod1", "pod3"))
    wait_for(lambda: "--to-destination 198.18.1.3:8080" in env.save(), 4.0,
             "the change made after the API server's return")
    took = time.monotonic() - t0
    assert took <= 2.0, f"the change was applied {took:.2f} s after the API server returned"
    assert pods_of(env.probe("pod2", "198.18.200.10", 80, count=30)) == {"pod1", "pod3"}


# -- 4. malformed objects ----------------------------------------------------------------------


def test_malformed_objects_are_skipped_and_named(env: Env) -> None:
    env.api.create(web(type="NodePort", ports=[http_port(node_port=30080)]))
    env.api.create(web_slice(*PODS))
    bad_ip = service("bad-ip", "198.18.300.1")
    env.api.create(bad_ip)  # present at the first list
    agent = env.agent()

    bad_port = service("bad-port", "198.18.200.99", ports=[http_port(70000)])
    bad_slice = endpoint_slice("web", [{"addresses": ["not-an-ip"]}], suffix="broken")
    turned_bad = service("turned-bad", "198.18.200.98")
    env.api.create(turned_bad)
    env.api.create(endpoint_slice("turned-bad", [endpoint("pod1")]))
    wait_for(lambda: "198.18.200.98/32" in env.save(), 3.0, "turned-bad's rules")
    env.api.create(bad_port)  # arrive in the watch stream
    env.api.create(bad_slice)
    turned_bad["spec"]["ports"][0]["port"] = 70000
    env.api.update(turned_bad)

    agent.wait_log(r"kind=Service object=t/bad-ip field=spec\.clusterIPs?(\[0\])? ")
    agent.wait_log(r"kind=Service object=t/bad-port field=spec.ports\[0\].port\b")
    agent.wait_log(r"kind=EndpointSlice object=t/web-broken field=endpoints\[0\].addresses\[0\]")
    agent.wait_log(r"kind=Service object=t/turned-bad field=spec.ports\[0\].port\b")
    # The broken ones are treated as absent; the rest converge and carry traffic.
    wait_for(lambda: "198.18.200.98/32" not in env.save(), 3.0, "turned-bad to be removed")
    save = env.save()
    assert "198.18.200.99" not in save and "198.18.300.1" not in save
    assert pods_of(env.probe("client", NODE_IP, 30080, count=30)) == set(PODS)
    samples = env.metrics()
    assert (metric(samples, "pyproxy_invalid_objects_total", kind="Service") or 0) >= 3
    assert (metric(samples, "pyproxy_invalid_objects_total", kind="EndpointSlice") or 0) >= 1
    assert agent.running


# -- 5. the kube-proxy ConfigMap ---------------------------------------------------------------


def test_configmap_edits_apply_or_are_refused(env: Env) -> None:
    cm = config_map(config_text())
    env.api.create(cm)
    env.api.create(web())
    env.api.create(web_slice(*PODS))
    agent = env.agent(configmap="kube-system/kube-proxy")
    vip_match = r"-d 198\.18\.200\.10/32 -p tcp -m comment --comment \"t/web:http cluster IP\""

    def masq_rule() -> str | None:
        for rule in env.nat_rules():
            if re.search(vip_match, rule) and rule.endswith("-j PYPROXY-MARK-MASQ"):
                return rule
        return None

    wait_for(masq_rule, 5.0, "web's masquerade rule")
    assert masq_rule().startswith(f"! -s {CLUSTER_CIDR} ")  # type: ignore[union-attr]
    others = [r for r in env.probe("pod2", "198.18.200.10", 80, count=30)
              if not r.startswith("pod2 ")]
    assert peers_of(others) == {POD_IPS["pod2"]}, "pod traffic is not masqueraded by default"

    # masqueradeAll: true turns the rule unconditional and SNATs pod traffic too.
    cm["data"]["config.conf"] = config_text(iptables={"masqueradeAll": True})
    env.api.update(cm)
    agent.wait_log(r'configuration applied" changed=\S*iptables\.masquerade_all')
    wait_for(lambda: (masq_rule() or "").startswith("-d "), 3.0, "an unconditional masquerade")
    others = [r for r in env.probe("pod2", "198.18.200.10", 80, count=30)
              if not r.startswith("pod2 ")]
    assert others and peers_of(others) == {GATEWAY}

    # A new syncPeriod is applied without a restart.
    cm["data"]["config.conf"] = config_text(iptables={"masqueradeAll": True,
                                                      "syncPeriod": "7s"})
    env.api.update(cm)
    changed = agent.wait_log(
        r'configuration applied" changed=(\S*iptables\.sync_period\S*)').group(1)
    assert "masquerade_all" not in changed, "only what changed is named"

    # mode: ipvs cannot run here: refused, counted, and iptables keeps serving.
    before = env.save()
    cm["data"]["config.conf"] = config_text(mode="ipvs", iptables={"masqueradeAll": True,
                                                                   "syncPeriod": "7s"})
    env.api.update(cm)
    agent.wait_log(r"mode change refused.*iptables keeps running.*requested_mode=ipvs")
    wait_for(lambda: metric(env.metrics(), "pyproxy_config_rejected_total") == 1.0, 3.0,
             "pyproxy_config_rejected_total to count the refusal")
    assert env.save() == before
    assert pods_of(env.probe("client", "198.18.200.10", 80, count=20)) == set(PODS)
    assert agent.running


def test_invalid_configuration_stops_the_start_before_the_kernel(env: Env) -> None:
    bad = config_text(iptables={"masqueradeBit": 40})
    env.api.create(config_map(bad))
    argv = [PYPROXY, "run", "--kubeconfig", str(env.kubeconfig), "--hostname-override", NODE,
            "--iptables-backend", "nft"]
    from_cm = env.lab.run("node", *argv, "--config-configmap", "kube-system/kube-proxy",
                          check=False, timeout=30)
    conf = env.tmp / "bad.conf"
    conf.write_text(bad)
    from_file = env.lab.run("node", *argv, "--config", str(conf), check=False, timeout=30)
    for result in (from_cm, from_file):
        assert result.returncode != 0
        assert "iptables.masqueradeBit" in result.stderr, result.stderr
    assert "PYPROXY" not in env.save(), "the kernel was touched"
    assert "PYPROXY" not in env.lab.run("node", "iptables-legacy-save").stdout


# -- 6. healthz follows failing syncs ----------------------------------------------------------


def test_healthz_unhealthy_while_syncs_fail_and_healthy_after(env: Env) -> None:
    env.api.create(web())
    env.api.create(web_slice("pod1"))
    agent = env.agent(config=config_text(iptables={"syncPeriod": "1s"}))
    chains = wait_for(lambda: [c for c in svc_chain_rules(env, "t/web:http")
                               if c.startswith("PYPROXY-SVC-")], 5.0, "web's service chain")
    # Someone else's chain uses web's chain: the kernel refuses to delete it (EBUSY).
    env.ipt("-t", "nat", "-N", "FOREIGN-USER")
    env.ipt("-t", "nat", "-A", "FOREIGN-USER", "-d", "198.18.250.1/32", "-j", chains[0])
    try:
        assert env.healthz()[0] == 200
        t0 = time.monotonic()
        env.api.delete("Service", NS, "web")  # its chain must go
        agent.wait_log(r"sync failed; retrying", timeout=3.0)
        if time.monotonic() - t0 < 1.5:
            assert env.healthz()[0] == 200, "unhealthy before 2 x syncPeriod had passed"
        wait_for(lambda: env.healthz()[0] == 503, 5.0, "/healthz to turn 503")
        assert time.monotonic() - t0 >= 1.95, "unhealthy before 2 x syncPeriod"
        status, body = env.healthz()
        assert status == 503 and body["healthy"] is False, body
        assert env.healthz("/livez")[0] == 503
        assert len(agent.log_lines(r"sync failed; retrying")) >= 2, "retries must keep failing"
        assert chains[0] in env.owned()["nat"], "the failed transaction must change nothing"
        samples = env.metrics()
        assert (metric(samples, "kubeproxy_sync_proxy_rules_iptables_restore_failures_total")
                or 0) >= 2
        assert metric(samples, "kubeproxy_sync_proxy_rules_service_changes_pending") == 1
    finally:
        env.ipt("-t", "nat", "-F", "FOREIGN-USER", check=False)
        env.ipt("-t", "nat", "-X", "FOREIGN-USER", check=False)
    wait_for(lambda: env.healthz()[0] == 200, 8.0, "/healthz to recover")
    assert env.healthz()[1]["healthy"] is True
    wait_for(lambda: chains[0] not in env.owned()["nat"], 3.0, "web's chain to be removed")
    samples = env.metrics()
    assert metric(samples, "kubeproxy_sync_proxy_rules_service_changes_pending") == 0

    # A node the autoscaler is about to delete fails /healthz (LBs drain it); /livez does not.
    env.api.update({**node_object(), "spec": {"taints": [
        {"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]}})
    wait_for(lambda: env.healthz()[0] == 503, 3.0, "/healthz to drain the node")
    assert env.healthz()[1]["nodeEligible"] is False
    assert env.healthz("/livez")[0] == 200


# -- 7. metrics --------------------------------------------------------------------------------


def test_metrics_endpoint_serves_kube_proxy_metrics(env: Env) -> None:
    env.api.create(web())
    env.api.create(web_slice("pod1"))
    # eTP=Local NodePort whose only endpoint is on another node: no local endpoints.
    env.api.create(service("local", "198.18.200.16", type="NodePort",
                           ports=[http_port(node_port=30081)], externalTrafficPolicy="Local"))
    env.api.create(endpoint_slice("local", [endpoint("pod3")]))
    env.agent()
    wait_for(lambda: "--to-destination 198.18.1.3:8080" in env.save(), 3.0, "local's rules")
    # Two changes apart: at least the second is a partial sync, whatever the first joined.
    partial = "kubeproxy_sync_partial_proxy_rules_duration_seconds_count"
    before = 0.0
    for pods in (("pod1", "pod2"), ("pod2",)):
        before = metric(env.metrics(), partial) or 0
        env.api.update(web_slice(*pods))
        wanted = {f"--to-destination {POD_IPS[p]}:8080" for p in pods}
        wait_for(lambda: wanted == {r.split(" -j DNAT ")[1] for r in env.nat_rules()  # noqa: B023
                                    if "t/web:http" in r and " -j DNAT " in r}, 3.0,
                 "the change")

    env.api.create(service("late", "198.18.200.17"))  # and one Service change
    wait_for(lambda: "198.18.200.17/32" in env.save(), 3.0, "late's rules")

    def counted() -> dict[Any, float] | None:
        s = env.metrics()
        return s if (metric(s, partial) or 0) > before else None

    samples = wait_for(counted, 3.0, "a partial sync to be counted")

    def m(name: str, **labels: str) -> float:
        value = metric(samples, name, **labels)
        assert value is not None, f"{name}{labels} not served"
        return value

    assert m("kubeproxy_sync_proxy_rules_duration_seconds_count") >= 2
    assert m("kubeproxy_sync_full_proxy_rules_duration_seconds_count") >= 1
    total = m("kubeproxy_sync_proxy_rules_duration_seconds_sum")
    assert 0 < total < 10 * m("kubeproxy_sync_proxy_rules_duration_seconds_count")
    assert m("kubeproxy_sync_proxy_rules_duration_seconds_bucket", le="+Inf") == m(
        "kubeproxy_sync_proxy_rules_duration_seconds_count")
    count = m("kubeproxy_network_programming_duration_seconds_count")
    assert count >= 1
    assert 0 <= m("kubeproxy_network_programming_duration_seconds_sum") / count < 2.0
    assert m("kubeproxy_sync_proxy_rules_iptables_restore_failures_total") == 0
    owned = env.owned()
    for table in ("filter", "nat"):
        rules = sum(len(r) for r in owned[table].values())
        assert m("kubeproxy_sync_proxy_rules_iptables_total", table=table) == rules, table
    assert m("kubeproxy_sync_proxy_rules_no_local_endpoints_total",
             traffic_policy="external") == 1
    assert m("kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 0
    assert m("kubeproxy_sync_proxy_rules_service_changes_pending") == 0
    # Changes seen through the watch (the first list is the starting state, not a change).
    assert m("kubeproxy_sync_proxy_rules_endpoint_changes_total") == 2
    assert m("kubeproxy_sync_proxy_rules_service_changes_total") == 1
    assert m("kubeproxy_sync_proxy_rules_last_timestamp_seconds") > time.time() - 60


# -- 8. health-check node port -----------------------------------------------------------------


def test_health_check_node_port_follows_local_endpoints(env: Env) -> None:
    env.agent()
    client_ns = env.lab.ns_name("client")
    lb = service("lb", "198.18.200.19", type="LoadBalancer",
                 ports=[http_port(node_port=30083)], externalTrafficPolicy="Local",
                 healthCheckNodePort=32100,
                 status={"loadBalancer": {"ingress": [{"ip": "198.18.202.10",
                                                       "ipMode": "VIP"}]}})
    env.api.create(lb)
    env.api.create(endpoint_slice("lb", [endpoint("pod1"), endpoint("pod3")]))

    def check() -> tuple[int, dict[str, Any]] | None:
        try:
            status, body = http_get(client_ns, NODE_IP, 32100, "/", timeout=1.0)
        except OSError:
            return None
        return status, json.loads(body)

    # The Service and its slice arrive separately: 503 (no local endpoint yet) may come first.
    status, body = wait_for(lambda: (r := check()) is not None and r[0] == 200 and r, 3.0,
                            lambda: f"the health check node port to answer 200: {check()}")
    assert body["localEndpoints"] == 1
    assert body["service"] == {"namespace": NS, "name": "lb"}
    # LB traffic stays on this node's endpoint.
    assert pods_of(env.probe("client", "198.18.202.10", 80, count=20)) == {"pod1"}

    env.api.update(endpoint_slice("lb", [endpoint("pod3")]))
    wait_for(lambda: (r := check()) is not None and r[0] == 503, 2.0,
             "503 once the local endpoint is gone")
    assert check() == (503, {**body, "localEndpoints": 0})

    env.api.delete("Service", NS, "lb")
    wait_for(lambda: check() is None, 2.0, "the listener to close with its Service")


# -- 9. informer behaviour ---------------------------------------------------------------------


def test_informers_list_and_watch_like_kube_proxy(env: Env) -> None:
    env.api.create(web())
    env.api.create(web_slice("pod1"))
    env.api.fail_next(3, 500, path_contains="/endpointslices?")
    agent = env.agent(wait_ready=False)
    t0 = time.monotonic()
    ok_list_seen = False
    while time.monotonic() - t0 < 15:
        save = env.save()  # first the kernel, then the request log: no race
        slice_lists = [q for _, q in env.gets("/endpointslices") if "watch" not in q]
        if len(slice_lists) < 4:
            assert "PYPROXY" not in save, "rules programmed before EndpointSlices were listed"
        else:
            ok_list_seen = True
            break
        time.sleep(0.05)
    assert ok_list_seen, f"the EndpointSlice list was never retried:\n{agent.log}"
    assert len(agent.log_lines(r"backing off.*informer=endpointslices|"
                               r"informer=endpointslices.*backing off")) >= 1
    wait_for(lambda: "--to-destination 198.18.1.1:8080" in env.save(), 5.0, "web's rules")

    for resource in ("/api/v1/services", "/apis/discovery.k8s.io/v1/endpointslices"):
        reqs = [q for path, q in env.gets(resource) if path == resource]
        lists = [q for q in reqs if "watch" not in q]
        watches = [q for q in reqs if q.get("watch") in ("true", "1")]
        assert lists and watches, reqs
        for q in lists:
            assert q["labelSelector"] == SELECTOR
            assert int(q["limit"]) > 0
        for q in watches:
            assert q["labelSelector"] == SELECTOR
            assert q["allowWatchBookmarks"] == "true"
            assert 300 <= int(q["timeoutSeconds"]) <= 600
        # Nothing was written after the objects above, so the list's RV is the current one.
        assert watches[0].get("resourceVersion") == env.api.resource_version, \
            "the watch must start from the list's resourceVersion"
    node_watch = [q for p, q in env.gets("/api/v1/nodes") if q.get("watch")]
    assert node_watch and node_watch[0]["fieldSelector"] == f"metadata.name={NODE}"


def test_service_proxy_name_selects_only_labelled_services(env: Env) -> None:
    mine = {PROXY_NAME_LABEL: "alt"}
    env.api.create(service("mine", "198.18.200.30", labels=mine))
    env.api.create(endpoint_slice("mine", [endpoint("pod1")], labels=mine))
    env.api.create(service("theirs", "198.18.200.31"))
    env.api.create(endpoint_slice("theirs", [endpoint("pod2")]))
    other = {PROXY_NAME_LABEL: "other"}
    env.api.create(service("other", "198.18.200.32", labels=other))
    env.api.create(endpoint_slice("other", [endpoint("pod3")], labels=other))
    env.agent("--service-proxy-name", "alt")
    wait_for(lambda: "--to-destination 198.18.1.1:8080" in env.save(), 3.0, "mine's rules")
    save = env.save()
    assert "198.18.200.31" not in save and "198.18.200.32" not in save
    assert pods_of(env.probe("pod2", "198.18.200.30", 80, count=5)) == {"pod1"}
    assert env.probe("pod1", "198.18.200.31", 80, timeout=0.3) == [TIMEOUT]
    lists = [q for _, q in env.gets("/api/v1/services") if "watch" not in q]
    assert lists[0]["labelSelector"] == f"!service.kubernetes.io/headless,{PROXY_NAME_LABEL}=alt"

    # Relabelling moves Services in and out (the watch's selector transitions).
    env.api.update(service("theirs", "198.18.200.31", labels=mine))
    env.api.update(endpoint_slice("theirs", [endpoint("pod2")], labels=mine))
    env.api.update(service("mine", "198.18.200.30"))

    def moved() -> bool:
        save = env.save()
        return "--to-destination 198.18.1.2:8080" in save and "198.18.200.30/32" not in save

    wait_for(moved, 3.0, "theirs (with its endpoints) in, mine out")
    assert pods_of(env.probe("pod1", "198.18.200.31", 80, count=5)) == {"pod2"}
