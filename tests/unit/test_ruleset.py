"""Ruleset: reading iptables-save, rendering restore payloads, cleanup.

The "existing" side of every render is what iptables-save would print after
the payloads were applied. A small fake kernel (``Kernel``) plays
iptables-restore --noflush and iptables-save for filter, nat and mangle. Like
kube-proxy's FakeIPTables it refuses what the kernel would refuse: rules in
missing chains, jumps to missing chains, deleting a chain that is not empty or
still referenced, names over 28 characters, a table without COMMIT. Any
error rejects the whole payload, so a test that applies a payload also checks
that the kernel would take it.

Convergence is Neutron's debug check: apply, read back, render again, and
expect nothing to do.
"""

from __future__ import annotations

import copy
import shlex
from collections.abc import Iterable
from ipaddress import ip_address, ip_network
from typing import Any

import pytest

from pyproxy.iptables import ruleset
from pyproxy.iptables.plan import PlanContext, plan
from pyproxy.iptables.ruleset import (
    Jump,
    RestorePayload,
    Ruleset,
    Table,
    is_owned_chain,
    is_owned_rule,
    iter_lines,
    parse_save,
    pending,
    render,
    render_cleanup,
)
from pyproxy.model import NodeInfo
from pyproxy.tracker import ChangeTracker
from tests.kernel import cluster

# ---------------------------------------------------------------------------
# A fake kernel: iptables-restore --noflush in, iptables-save out

BUILTIN = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
}
TARGETS = {"ACCEPT", "DROP", "RETURN", "REJECT", "DNAT", "SNAT", "MASQUERADE", "MARK", "LOG"}


class RestoreError(Exception):
    pass


def _target(rule: str) -> str | None:
    args = shlex.split(rule)
    for flag in ("-j", "-g"):
        if flag in args:
            return args[args.index(flag) + 1]
    return None


class Kernel:
    def __init__(self) -> None:
        self.tables: dict[str, dict[str, list[str]]] = {
            t: {c: [] for c in chains} for t, chains in BUILTIN.items()}
        self.restores = 0

    def restore(self, payload: RestorePayload | str) -> None:
        text = payload.text if isinstance(payload, RestorePayload) else payload
        staged = copy.deepcopy(self.tables)
        table: str | None = None
        for number, line in enumerate(text.splitlines(), 1):
            try:
                table = self._line(staged, table, line)
            except RestoreError as err:
                raise RestoreError(f"line {number} ({line!r}): {err}") from None
        if table is not None:
            raise RestoreError(f"*{table} without COMMIT")
        self.tables = staged
        self.restores += 1

    def _line(self, staged: dict[str, dict[str, list[str]]], table: str | None,
              line: str) -> str | None:
        if not line.strip() or line.startswith("#"):
            return table
        if line.startswith("*"):
            if table is not None:
                raise RestoreError(f"*{line[1:]} inside *{table}")
            if line[1:] not in staged:
                raise RestoreError("unknown table")
            return line[1:]
        if table is None:
            raise RestoreError("outside a table")
        chains = staged[table]
        if line == "COMMIT":
            for chain, rules in chains.items():
                for rule in rules:
                    target = _target(rule)
                    if target is not None and target not in TARGETS and target not in chains:
                        raise RestoreError(f"{chain}: jump to missing chain {target}")
            return None
        if line.startswith(":"):
            name, policy, _counters = line[1:].split()
            if name in BUILTIN[table]:
                if policy == "-":
                    raise RestoreError("built-in chain without a policy")
            elif policy != "-":
                raise RestoreError("user chain with a policy")
            elif len(name) > 28:
                raise RestoreError("chain name too long")
            else:
                chains[name] = []  # creates, or flushes an existing chain
            return table
        op, chain, *rest = line.split(" ", 2)
        if chain not in chains:
            raise RestoreError(f"no chain {chain}")
        rules = chains[chain]
        if op == "-A":
            rules.append(rest[0])
        elif op == "-I":
            position, rule = rest[0].split(" ", 1)
            if not 1 <= int(position) <= len(rules) + 1:
                raise RestoreError("index out of range")
            rules.insert(int(position) - 1, rule)
        elif op == "-D":
            if rest[0] not in rules:
                raise RestoreError("bad rule (does a matching rule exist in that chain?)")
            rules.remove(rest[0])
        elif op == "-X":
            if chain in BUILTIN[table]:
                raise RestoreError("cannot delete a built-in chain")
            if rules:
                raise RestoreError("chain is not empty")
            if any(_target(r) == chain for rs in chains.values() for r in rs):
                raise RestoreError("chain is still referenced")
            del chains[chain]
        else:
            raise RestoreError(f"unknown command {op}")
        return table

    def save(self) -> str:
        out: list[str] = []
        for table in ("filter", "mangle", "nat"):  # a foreign table between ours
            chains = self.tables[table]
            out.append("# Generated by iptables-save v1.8.9 (nf_tables) on Tue Jan  2 00:00:00")
            out.append(f"*{table}")
            user = sorted(c for c in chains if c not in BUILTIN[table])
            out += [f":{c} ACCEPT [0:0]" for c in BUILTIN[table]]
            out += [f":{c} - [0:0]" for c in user]
            for chain in (*BUILTIN[table], *user):
                out += [f"-A {chain} {rule}" for rule in chains[chain]]
            out.append("COMMIT")
            out.append("# Completed on Tue Jan  2 00:00:00")
        return "\n".join(out) + "\n"

    def read(self) -> Ruleset:
        return parse_save(self.save())

    def foreign(self) -> dict[str, dict[str, list[str]]]:
        """Everything that is not pyproxy's: other chains, and other rules in built-ins."""
        return {
            table: {chain: [r for r in rules if not is_owned_rule(r)]
                    for chain, rules in chains.items() if not is_owned_chain(chain)}
            for table, chains in self.tables.items()
        }

    def owned(self, table: str) -> dict[str, tuple[str, ...]]:
        return {c: tuple(r) for c, r in self.tables[table].items() if is_owned_chain(c)}


# What a node held before pyproxy: Docker, kube-proxy and the kubelet.
FOREIGN = """\
*filter
:DOCKER - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-SERVICES - [0:0]
-A INPUT -j KUBE-FIREWALL
-A INPUT -s 198.18.250.2/32 -j ACCEPT
-A FORWARD -j DOCKER
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A DOCKER -d 172.17.0.2/32 ! -i docker0 -o docker0 -p tcp -m tcp --dport 80 -j ACCEPT
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "kube-system/kube-dns:dns-tcp has no endpoints" -m tcp --dport 53 -j REJECT --reject-with icmp-port-unreachable
COMMIT
*mangle
:KUBE-KUBELET-CANARY - [0:0]
-A PREROUTING -i eth1 -j MARK --set-xmark 0x1/0xffffffff
COMMIT
*nat
:DOCKER - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A DOCKER -i docker0 -j RETURN
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m comment --comment "default/kubernetes:https cluster IP" -m tcp --dport 443 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "default/kubernetes:https -> 10.180.0.1:6443" -j KUBE-SEP-SXIVWICOYRO3J4NJ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -s 10.180.0.1/32 -m comment --comment "default/kubernetes:https" -j KUBE-MARK-MASQ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -p tcp -m comment --comment "default/kubernetes:https" -m tcp -j DNAT --to-destination 10.180.0.1:6443
COMMIT
"""  # noqa: E501 - iptables-save lines, kept whole


def node_with_foreign_rules() -> Kernel:
    kernel = Kernel()
    kernel.restore(FOREIGN)
    return kernel


# ---------------------------------------------------------------------------
# Desired rulesets: a small hand-made one, and the planner's for the kernel scenarios

SVC_A, SEP_A1, SEP_A2 = "PYPROXY-SVC-AAAA", "PYPROXY-SEP-AAAA1", "PYPROXY-SEP-AAAA2"
SVC_B, SEP_B1 = "PYPROXY-SVC-BBBB", "PYPROXY-SEP-BBBB1"
JUMPS = (
    Jump(Table.FILTER, "INPUT", '-m comment --comment "pyproxy firewall" -j PYPROXY-FIREWALL'),
    Jump(Table.FILTER, "INPUT", '-m comment --comment "pyproxy services" -j PYPROXY-SERVICES'),
    Jump(Table.FILTER, "OUTPUT", '-m comment --comment "pyproxy services" -j PYPROXY-SERVICES'),
    Jump(Table.NAT, "PREROUTING", '-m comment --comment "pyproxy services" -j PYPROXY-SERVICES'),
    Jump(Table.NAT, "OUTPUT", '-m comment --comment "pyproxy services" -j PYPROXY-SERVICES'),
)


def dispatch(ip: str, chain: str) -> str:
    return f'-d {ip}/32 -p tcp -m comment --comment "{chain}" -m tcp --dport 80 -j {chain}'


def sep(ip: str) -> tuple[str, ...]:
    return (f"-s {ip}/32 -j PYPROXY-MARK-MASQ",
            f"-p tcp -m tcp -j DNAT --to-destination {ip}:8080")


def desired(*, with_b: bool = True, a_endpoints: Iterable[str] = ("10.1.0.1", "10.1.0.2"),
            ) -> Ruleset:
    rs = Ruleset()
    a_eps = list(a_endpoints)
    flt = rs.table(Table.FILTER)
    flt["PYPROXY-SERVICES"] = (
        '-d 10.0.0.9/32 -p tcp -m comment --comment "ns/none has no endpoints" -m tcp '
        "--dport 80 -j REJECT --reject-with icmp-port-unreachable",)
    flt["PYPROXY-FIREWALL"] = ()
    nat = rs.table(Table.NAT)
    nat["PYPROXY-SERVICES"] = (dispatch("10.0.0.1", SVC_A),
                               *((dispatch("10.0.0.2", SVC_B),) if with_b else ()))
    nat["PYPROXY-MARK-MASQ"] = ("-j MARK --set-xmark 0x4000/0x4000",)
    seps = (SEP_A1, SEP_A2)
    nat[SVC_A] = tuple(
        f"-m statistic --mode random --probability 0.50000000000 -j {seps[i]}"
        if i < len(a_eps) - 1 else f"-j {seps[i]}" for i in range(len(a_eps)))
    for chain, ip in zip(seps, a_eps, strict=False):
        nat[chain] = sep(ip)
    if with_b:
        nat[SVC_B] = (f"-j {SEP_B1}",)
        nat[SEP_B1] = sep("10.1.0.3")
    rs.jumps = JUMPS
    return rs


def planned(**ctx: Any) -> Ruleset:
    objs = cluster.objects()
    tracker = ChangeTracker(node_name=cluster.NODE)
    tracker.replace([o for o in objs if o["kind"] == "Service"],
                    [o for o in objs if o["kind"] == "EndpointSlice"])
    snap = tracker.checkout()
    ctx.setdefault("node", NodeInfo(cluster.NODE, (ip_address("198.18.100.1"),)))
    ctx.setdefault("cluster_cidrs", (ip_network("198.18.1.0/24"),))
    return plan(snap.services, snap.endpoints, PlanContext(**ctx)).ruleset


def applied(rs: Ruleset, kernel: Kernel | None = None) -> Kernel:
    kernel = kernel or node_with_foreign_rules()
    kernel.restore(render(rs, kernel.read()))
    return kernel


def lines_of(payload: RestorePayload) -> list[str]:
    return payload.text.splitlines()


# ---------------------------------------------------------------------------
# parse_save

SAVE = """\
# Generated by iptables-save v1.8.9 (nf_tables) on Tue Jan  2 00:00:00 2024
*raw
:PREROUTING ACCEPT [10:600]
:PYPROXY-IN-RAW - [0:0]
-A PREROUTING -j PYPROXY-IN-RAW
COMMIT
*filter
:INPUT ACCEPT [120:7200]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:PYPROXY-EMPTY - [0:0]
:PYPROXY-SERVICES - [0:0]

-A INPUT -m comment --comment "pyproxy services" -j PYPROXY-SERVICES
-A INPUT -s 198.18.250.2/32 -j ACCEPT
-A PYPROXY-SERVICES -d 10.0.0.9/32 -p tcp -m comment --comment "ns/none has no endpoints" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable
-A PYPROXY-SERVICES -d 10.0.0.8/32 -p tcp -m comment --comment ns/plain -m tcp --dport 80 -j DROP
COMMIT
# Completed on Tue Jan  2 00:00:00 2024
*mangle
:PREROUTING ACCEPT [0:0]
:KUBE-KUBELET-CANARY - [0:0]
-A PREROUTING -j MARK --set-xmark 0x1/0xffffffff
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:PYPROXY-SVC-AAAA - [0:0]
-A PREROUTING -m comment --comment "pyproxy services" -j PYPROXY-SERVICES
-A PYPROXY-SVC-AAAA -m statistic --mode random --probability 0.33333333349 -j PYPROXY-SEP-AAAA1
-A PYPROXY-SVC-AAAA -j PYPROXY-SEP-AAAA2
COMMIT
"""  # noqa: E501


def test_parse_save_reads_chains_and_rules_of_filter_and_nat() -> None:
    rs = parse_save(SAVE)
    flt = rs.table(Table.FILTER)
    assert list(flt) == ["INPUT", "FORWARD", "OUTPUT", "PYPROXY-EMPTY", "PYPROXY-SERVICES"]
    assert flt["INPUT"] == ('-m comment --comment "pyproxy services" -j PYPROXY-SERVICES',
                            "-s 198.18.250.2/32 -j ACCEPT")
    assert flt["FORWARD"] == flt["OUTPUT"] == flt["PYPROXY-EMPTY"] == ()
    # Rule text is kept as printed, quotes included, in order.
    assert flt["PYPROXY-SERVICES"] == (
        '-d 10.0.0.9/32 -p tcp -m comment --comment "ns/none has no endpoints" -m tcp '
        "--dport 80 -j REJECT --reject-with icmp-port-unreachable",
        "-d 10.0.0.8/32 -p tcp -m comment --comment ns/plain -m tcp --dport 80 -j DROP")
    nat = rs.table(Table.NAT)
    assert list(nat) == ["PREROUTING", "POSTROUTING", "PYPROXY-SVC-AAAA"]
    assert nat["PYPROXY-SVC-AAAA"] == (
        "-m statistic --mode random --probability 0.33333333349 -j PYPROXY-SEP-AAAA1",
        "-j PYPROXY-SEP-AAAA2")
    assert rs.owned_chains(Table.FILTER) == {"PYPROXY-EMPTY", "PYPROXY-SERVICES"}
    assert rs.rule_count(Table.NAT) == 3
    assert rs.jumps == ()


def test_parse_save_skips_foreign_tables() -> None:
    rs = parse_save(SAVE)
    assert set(rs.chains) == {Table.FILTER, Table.NAT}
    every_chain = {c for chains in rs.chains.values() for c in chains}
    assert "PYPROXY-IN-RAW" not in every_chain  # raw is not ours, whatever the name
    assert "KUBE-KUBELET-CANARY" not in every_chain
    assert not any("0x1/0xffffffff" in r for _, _, r in rs.iter_rules())


def test_parse_save_of_nothing() -> None:
    for text in ("", "# Generated by iptables-save\n", "*mangle\n:PREROUTING ACCEPT [0:0]\n"
                 "COMMIT\n"):
        rs = parse_save(text)
        assert rs.table(Table.FILTER) == {} and rs.table(Table.NAT) == {}


def test_parse_save_round_trips_through_the_kernel() -> None:
    kernel = applied(planned())
    first = kernel.read()
    for table in ("filter", "nat"):
        assert first.table(Table(table)) == {c: tuple(r) for c, r in kernel.tables[table].items()}
    # Printing the parsed ruleset again and re-reading it changes nothing.
    again = Kernel()
    again.tables.update(
        {str(t): {c: list(r) for c, r in chains.items()} for t, chains in first.chains.items()})
    assert again.read().chains == first.chains


def test_parse_save_reads_lines_as_they_come_and_long_texts_a_block_at_a_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    whole = parse_save(SAVE)
    # IPTables.save_lines gives the lines as the pipe does, newlines included.
    assert parse_save(iter(SAVE.splitlines(keepends=True))) == whole
    monkeypatch.setattr(ruleset, "_BLOCK", 7)  # blocks shorter than a line
    assert list(iter_lines(SAVE)) == SAVE.splitlines()
    assert list(iter_lines(SAVE.rstrip("\n"))) == SAVE.splitlines()
    assert parse_save(SAVE) == whole


def test_parse_save_like_the_plan_shares_the_plans_strings_and_nothing_else() -> None:
    want = planned()
    kernel = applied(want)
    drifted = next(c for c in kernel.owned("nat") if kernel.tables["nat"][c][1:])
    kernel.tables["nat"][drifted][1] += " --random"  # someone edited the second rule
    text = kernel.save()
    shared = parse_save(text, like=want)
    assert shared == parse_save(text)  # the same ruleset, whatever it shares
    for table in (Table.FILTER, Table.NAT):
        for chain, rules in want.table(table).items():
            if chain != drifted:
                assert shared.table(table)[chain] is rules  # the plan's own tuple
    first, second, *_ = shared.table(Table.NAT)[drifted]
    assert first is want.table(Table.NAT)[drifted][0]  # equal rules are still shared
    assert second == want.table(Table.NAT)[drifted][1] + " --random"  # the kernel's rule
    # Foreign rules in built-in chains are the kernel's, never taken from the plan.
    assert shared.table(Table.FILTER)["INPUT"] == parse_save(text).table(Table.FILTER)["INPUT"]


def test_restore_payload_is_its_text_built_a_block_at_a_time() -> None:
    payload = RestorePayload(["*nat"])
    payload.extend(f"-A PYPROXY-X -j RULE{i}" for i in range(3))
    payload.extend([])  # nothing to add adds nothing
    payload.append("COMMIT")
    assert payload.line_count == 5 and payload
    assert payload.text == "*nat\n" + "".join(f"-A PYPROXY-X -j RULE{i}\n" for i in range(3)) \
        + "COMMIT\n"
    assert payload.lines == list(payload.iter_lines()) == payload.text.splitlines()
    assert payload.text is payload.text  # joined once
    payload.append("*filter")  # and again after more lines
    assert payload.text.endswith("COMMIT\n*filter\n") and payload.line_count == 6
    assert payload == RestorePayload(payload.lines) != RestorePayload(payload.lines[:-1])
    assert not RestorePayload() and RestorePayload().text == "" and RestorePayload().lines == []


def test_planned_rules_survive_restore_and_save_unchanged() -> None:
    want = planned()
    kernel = applied(want)
    for table in (Table.FILTER, Table.NAT):
        assert kernel.owned(str(table)) == want.table(table)


# ---------------------------------------------------------------------------
# render: from nothing


def test_render_from_nothing_declares_every_owned_chain_and_inserts_jumps() -> None:
    want = desired()
    payload = render(want, Ruleset())
    lines = lines_of(payload)
    for table in (Table.FILTER, Table.NAT):
        block = lines[lines.index(f"*{table}"):]
        block = block[:block.index("COMMIT") + 1]
        declared = [ln[1:].split()[0] for ln in block if ln.startswith(":")]
        assert sorted(declared) == sorted(want.table(table)), table
        for chain, rules in want.table(table).items():
            assert [ln for ln in block if ln.startswith(f"-A {chain} ")] == [
                f"-A {chain} {r}" for r in rules]
        inserted = [ln for ln in block if ln.startswith("-I ")]
        assert sorted(inserted) == sorted(
            f"-I {j.chain} 1 {j.rule}" for j in JUMPS if j.table is table)
    assert not any(ln.startswith("-X") for ln in lines)


def test_render_from_nothing_applies_on_a_busy_node() -> None:
    kernel = node_with_foreign_rules()
    before = kernel.foreign()
    kernel.restore(render(desired(), kernel.read()))
    for table in (Table.FILTER, Table.NAT):
        assert kernel.owned(str(table)) == desired().table(table)
    # The jumps come first, in the planned order, ahead of what was there.
    assert kernel.tables["filter"]["INPUT"] == [
        JUMPS[0].rule, JUMPS[1].rule, "-j KUBE-FIREWALL", "-s 198.18.250.2/32 -j ACCEPT"]
    assert kernel.tables["nat"]["PREROUTING"][0] == JUMPS[3].rule
    assert kernel.foreign() == before


def test_planned_jumps_keep_their_order() -> None:
    want = planned()
    kernel = applied(want)
    for table, chain in (("filter", "INPUT"), ("filter", "FORWARD"), ("filter", "OUTPUT"),
                         ("nat", "PREROUTING"), ("nat", "OUTPUT"), ("nat", "POSTROUTING")):
        expected = [j.rule for j in want.jumps if str(j.table) == table and j.chain == chain]
        assert expected
        assert kernel.tables[table][chain][:len(expected)] == expected, chain


# ---------------------------------------------------------------------------
# render: convergence and minimal changes


@pytest.mark.parametrize("make", [desired, planned], ids=["small", "planned"])
def test_second_render_is_empty(make: Any) -> None:
    kernel = applied(make())
    payload = render(make(), kernel.read(), only=())
    assert not payload
    assert payload.text == ""


def test_render_against_the_last_applied_plan_is_empty() -> None:
    # A partial sync diffs against what it wrote, jumps included, without reading the kernel.
    assert not render(planned(), planned(), only=())


def test_full_render_rewrites_owned_chains_but_leaves_the_node_as_it_was() -> None:
    kernel = applied(desired())
    saved = kernel.save()
    payload = render(desired(), kernel.read())  # only=None: a full sync
    lines = lines_of(payload)
    assert f":{SVC_A} - [0:0]" in lines
    assert not any(ln.startswith(("-I", "-X")) for ln in lines)
    kernel.restore(payload)
    assert kernel.save() == saved


def test_changed_chain_is_written_alone() -> None:
    kernel = applied(desired())
    changed = desired(a_endpoints=("10.1.0.1", "10.1.0.5"))
    payload = render(changed, kernel.read(), only=())
    assert lines_of(payload) == [
        "*nat",
        f":{SEP_A2} - [0:0]",
        *(f"-A {SEP_A2} {r}" for r in sep("10.1.0.5")),
        "COMMIT",
    ]
    kernel.restore(payload)
    assert not render(changed, kernel.read(), only=())


def test_only_forces_the_named_chains() -> None:
    kernel = applied(desired())
    payload = render(desired(), kernel.read(), only=[SEP_B1])
    assert lines_of(payload) == [
        "*nat", f":{SEP_B1} - [0:0]", *(f"-A {SEP_B1} {r}" for r in sep("10.1.0.3")), "COMMIT"]


def test_new_service_is_written_with_its_dispatch_rule() -> None:
    kernel = applied(desired(with_b=False))
    payload = render(desired(), kernel.read(), only=())
    declared = {ln[1:].split()[0] for ln in lines_of(payload) if ln.startswith(":")}
    assert declared == {"PYPROXY-SERVICES", SVC_B, SEP_B1}
    kernel.restore(payload)
    assert kernel.owned("nat") == desired().table(Table.NAT)


def test_stale_owned_chains_are_flushed_and_deleted() -> None:
    kernel = applied(desired())
    smaller = desired(with_b=False, a_endpoints=("10.1.0.1",))
    payload = render(smaller, kernel.read(), only=())
    lines = lines_of(payload)
    for stale in (SVC_B, SEP_B1, SEP_A2):
        assert f":{stale} - [0:0]" in lines
        assert f"-X {stale}" in lines
        # Deleted only after the rules that jumped to it were rewritten.
        assert lines.index(f"-X {stale}") > max(
            i for i, ln in enumerate(lines) if ln.startswith("-A "))
    kernel.restore(payload)  # the kernel refuses -X of a chain still referenced
    assert kernel.owned("nat") == smaller.table(Table.NAT)
    assert not render(smaller, kernel.read(), only=())


def test_stale_chain_in_filter_is_deleted() -> None:
    kernel = applied(desired())
    fewer = desired()
    del fewer.table(Table.FILTER)["PYPROXY-FIREWALL"]
    fewer.jumps = tuple(j for j in JUMPS if "FIREWALL" not in j.rule)
    payload = render(fewer, kernel.read(), only=())
    assert "-X PYPROXY-FIREWALL" in lines_of(payload)


def test_stale_chain_still_jumped_to_from_a_builtin_chain() -> None:
    kernel = applied(desired())
    fewer = desired()
    del fewer.table(Table.FILTER)["PYPROXY-FIREWALL"]
    fewer.jumps = tuple(j for j in JUMPS if "FIREWALL" not in j.rule)
    kernel.restore(render(fewer, kernel.read(), only=()))
    assert "PYPROXY-FIREWALL" not in kernel.tables["filter"]
    assert not any("PYPROXY-FIREWALL" in r for r in kernel.tables["filter"]["INPUT"])


def test_missing_jump_is_inserted_alone() -> None:
    kernel = applied(desired())
    kernel.tables["nat"]["PREROUTING"].remove(JUMPS[3].rule)  # someone flushed it
    payload = render(desired(), kernel.read(), only=())
    assert lines_of(payload) == ["*nat", f"-I PREROUTING 1 {JUMPS[3].rule}", "COMMIT"]
    kernel.restore(payload)
    assert kernel.tables["nat"]["PREROUTING"][0] == JUMPS[3].rule
    assert not render(desired(), kernel.read(), only=())


def test_jump_that_is_no_longer_first_is_left_alone() -> None:
    # As kube-proxy's EnsureRule: present is enough; no churn against other writers.
    kernel = applied(desired())
    kernel.tables["filter"]["INPUT"].insert(0, "-j DOCKER-USER-LIKE")
    kernel.tables["filter"]["DOCKER-USER-LIKE"] = []
    assert not render(desired(), kernel.read(), only=())


# ---------------------------------------------------------------------------
# Foreign chains and rules


def _payload_touches_only_owned(payload: RestorePayload) -> None:
    for line in lines_of(payload):
        if line.startswith(("*", "COMMIT")):
            continue
        if line.startswith(":"):
            assert is_owned_chain(line[1:].split()[0]), line
            continue
        op, chain, rest = (line.split(" ", 2) + [""])[:3]
        if op == "-I":
            assert is_owned_rule(rest.split(" ", 1)[1]), line
        elif op == "-D":
            assert is_owned_rule(rest), line
        else:
            assert op in ("-A", "-X") and is_owned_chain(chain), line


def test_foreign_chains_and_rules_are_never_touched() -> None:
    kernel = node_with_foreign_rules()
    before = kernel.foreign()
    mangle = copy.deepcopy(kernel.tables["mangle"])
    steps = [desired(), desired(a_endpoints=("10.1.0.7",)), desired(with_b=False), planned()]
    for want in steps:
        for only in (None, ()):
            payload = render(want, kernel.read(), only=only)
            _payload_touches_only_owned(payload)
            kernel.restore(payload)
            assert kernel.foreign() == before
    assert kernel.tables["mangle"] == mangle
    assert kernel.tables["nat"]["KUBE-SERVICES"] == before["nat"]["KUBE-SERVICES"]
    assert "DOCKER" in kernel.tables["filter"] and "DOCKER" in kernel.tables["nat"]


# ---------------------------------------------------------------------------
# render_cleanup


def test_cleanup_removes_owned_chains_and_jumps_only() -> None:
    kernel = node_with_foreign_rules()
    before = copy.deepcopy(kernel.tables)
    applied(planned(), kernel)
    kernel.tables["nat"]["KUBE-SERVICES"].append("-j PYPROXY-SERVICES")  # a foreign-chain jump
    payload = render_cleanup(kernel.read())
    _deletes_only(payload, "PYPROXY-")
    kernel.restore(payload)  # the foreign chain's jump goes too, or -X would fail
    assert kernel.tables == before
    assert not render_cleanup(kernel.read())


def test_cleanup_with_kube_proxy_prefix_removes_kube_proxys_rules() -> None:
    kernel = node_with_foreign_rules()
    applied(desired(), kernel)
    ours = {t: kernel.owned(t) for t in ("filter", "nat")}
    payload = render_cleanup(kernel.read(), owned=("KUBE-",))
    _deletes_only(payload, "KUBE-")
    kernel.restore(payload)
    for table in ("filter", "nat"):
        assert not [c for c in kernel.tables[table] if c.startswith("KUBE-")], table
        assert not [r for rs in kernel.tables[table].values() for r in rs if "KUBE-" in r]
        assert kernel.owned(table) == ours[table]
    assert kernel.tables["nat"]["PREROUTING"] == [
        JUMPS[3].rule, "-m addrtype --dst-type LOCAL -j DOCKER"]
    assert kernel.tables["filter"]["INPUT"] == [
        JUMPS[0].rule, JUMPS[1].rule, "-s 198.18.250.2/32 -j ACCEPT"]
    assert "DOCKER" in kernel.tables["nat"]
    assert "KUBE-KUBELET-CANARY" in kernel.tables["mangle"]  # not a table pyproxy reads
    # pyproxy's own rules still converge afterwards.
    assert not render(desired(), kernel.read(), only=())


def test_cleanup_of_a_clean_node_is_empty() -> None:
    assert not render_cleanup(node_with_foreign_rules().read())
    assert not render_cleanup(Ruleset())


def _deletes_only(payload: RestorePayload, prefix: str) -> None:
    for line in lines_of(payload):
        if line.startswith(("*", "COMMIT")):
            continue
        if line.startswith(":"):
            assert line[1:].startswith(prefix), line
            continue
        if line.startswith("-X "):
            assert line[3:].startswith(prefix), line
            continue
        assert line.startswith("-D "), line
        target = _target(line.split(" ", 2)[2])
        assert target is not None and target.startswith(prefix), line


# ---------------------------------------------------------------------------
# sizing first, then one transaction or one per dispatch shard


@pytest.mark.parametrize("make", [planned, desired])
def test_pending_counts_exactly_the_lines_it_renders(make: Any) -> None:
    kernel = node_with_foreign_rules()
    for existing in (kernel.read(), applied(desired()).read(), Ruleset()):
        for only in (None, ()):
            todo = pending(make(), existing, only=only)
            assert todo.line_count == len(lines_of(todo.render()))
            assert todo.stream().text == todo.render().text  # rendered the same, if streamed


def test_transactions_program_what_one_would_with_the_hooks_last() -> None:
    want = planned()
    kernel = node_with_foreign_rules()
    todo = pending(want, kernel.read(), only=())
    txs = list(todo.transactions())
    assert len(txs) > 2  # the shared chains, the shards, the hooks
    hooks = [ln for tx in txs for ln in lines_of(tx) if ln.startswith("-I ")]
    assert hooks and all(ln in lines_of(txs[-1]) for ln in hooks)
    for tx in txs:
        kernel.restore(tx)  # each must apply on its own, in order
    for table in (Table.FILTER, Table.NAT):
        assert kernel.owned(table) == want.table(table)
    assert not render(want, kernel.read(), only=())
    assert sum(tx.line_count for tx in txs) >= todo.line_count
