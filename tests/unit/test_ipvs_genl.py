"""The fast codec of pyproxy.ipvs.genl against pyroute2's own encoder. No kernel needed.

A Layout compiles pyroute2's message declarations; what it packs must be what
pyroute2 itself would send, byte for byte, and what it unpacks must read what
the kernel sends (IPVS addresses come as 16 bytes whatever the family).
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import pytest
from pyroute2.netlink.nfnetlink.ipset import ipset_msg
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg

from pyproxy.ipvs.genl import (
    IPSET_CMD_ADD,
    IPSET_CMD_CREATE,
    IPSET_CMD_LIST,
    IPSET_PROTOCOL,
    IPVS_CMD_NEW_DEST,
    IPVS_CMD_NEW_SERVICE,
    IPVS_CMD_SET_CONFIG,
    Layout,
    _error_of,
    _raw,
    address_request,
    decoder,
    ipset_adt,
    ipset_request,
    ipset_type,
    ipvs_msg,
    ipvs_request,
)
from pyproxy.ipvs.netlink import (
    _dest_full,
    _entry_attrs,
    _parse_dest,
    _parse_members,
    _parse_service,
    _service_full,
)
from pyproxy.ipvs.plan import SetEntry, VirtualServerKey
from pyproxy.model import Protocol

FAMILY_ID = 0x22


def pyroute2_bytes(cls: Any, mtype: int, attrs: Any, flags: int = 0, **fields: Any) -> bytes:
    msg = cls()
    for name, value in fields.items():
        msg[name] = value
    msg["attrs"] = attrs
    msg["header"]["type"] = mtype
    msg["header"]["flags"] = flags
    return _raw(msg)


@pytest.mark.parametrize("address, timeout", [("198.18.200.10", 0), ("fd00::10", 600)])
def test_ipvs_requests_are_what_pyroute2_would_send(address: str, timeout: int) -> None:
    key = VirtualServerKey(Protocol.TCP, address, 80)
    service = [_service_full(key, "rr", timeout)]
    assert ipvs_request(FAMILY_ID, IPVS_CMD_NEW_SERVICE, service) == pyroute2_bytes(
        ipvs_msg, FAMILY_ID, service, cmd=IPVS_CMD_NEW_SERVICE, version=1)
    dest = [_service_full(key, "rr", 0), _dest_full(address, 8080, 1)]
    assert ipvs_request(FAMILY_ID, IPVS_CMD_NEW_DEST, dest) == pyroute2_bytes(
        ipvs_msg, FAMILY_ID, dest, cmd=IPVS_CMD_NEW_DEST, version=1)
    config = [("IPVS_CMD_ATTR_TIMEOUT_TCP", 900), ("IPVS_CMD_ATTR_TIMEOUT_UDP", 300)]
    raw = ipvs_request(FAMILY_ID, IPVS_CMD_SET_CONFIG, config)
    assert raw == pyroute2_bytes(ipvs_msg, FAMILY_ID, config, cmd=IPVS_CMD_SET_CONFIG, version=1)
    assert struct.unpack_from("=I", raw, 24)[0] == 900  # a u32, not pyroute2's "hex"


def test_ipset_requests_are_what_pyroute2_would_send() -> None:
    entries = [_entry_attrs(SetEntry("198.18.200.10", "tcp", 80)),
               _entry_attrs(SetEntry("198.18.202.11", "tcp", 80, "198.18.150.0/24")),
               _entry_attrs(SetEntry("fd00::1", "udp", 53, "fd00::1")),
               _entry_attrs(SetEntry(port=30080))]
    attrs = [["IPSET_ATTR_SETNAME", "PYPROXY-X"], *ipset_adt(entries)]
    assert ipset_request(IPSET_CMD_ADD, attrs) == pyroute2_bytes(
        ipset_msg, ipset_type(IPSET_CMD_ADD), [["IPSET_ATTR_PROTOCOL", IPSET_PROTOCOL], *attrs],
        nfgen_family=socket.AF_INET)
    create = [["IPSET_ATTR_SETNAME", "PYPROXY-P"], ["IPSET_ATTR_TYPENAME", "bitmap:port"],
              ["IPSET_ATTR_REVISION", 3], ["IPSET_ATTR_FAMILY", 2],
              ["IPSET_ATTR_DATA", {"attrs": [["IPSET_ATTR_PORT_FROM", 0],
                                             ["IPSET_ATTR_PORT_TO", 65535]]}]]
    assert ipset_request(IPSET_CMD_CREATE, create) == pyroute2_bytes(
        ipset_msg, ipset_type(IPSET_CMD_CREATE),
        [["IPSET_ATTR_PROTOCOL", IPSET_PROTOCOL], *create], nfgen_family=socket.AF_INET)


def test_address_requests_are_what_pyroute2_would_send() -> None:
    attrs = [("IFA_LOCAL", "198.18.200.10"), ("IFA_ADDRESS", "198.18.200.10")]
    assert address_request(20, attrs, 0x500, family=2, prefixlen=32, index=7) == pyroute2_bytes(
        ifaddrmsg, 20, attrs, 0x500, family=2, prefixlen=32, index=7)


def kernel_service(address: str, af: int) -> bytes:
    """A service as the kernel dumps it: the address in 16 bytes, stats included."""
    def nla(kind: int, payload: bytes) -> bytes:
        pad = b"\0" * (-len(payload) % 4)
        return struct.pack("=HH", 4 + len(payload), kind) + payload + pad

    addr = socket.inet_pton(af, address).ljust(16, b"\0")
    inner = b"".join([
        nla(1, struct.pack("=H", af)), nla(2, struct.pack("=H", 6)), nla(3, addr),
        nla(4, struct.pack(">H", 80)), nla(6, b"rr\0"), nla(7, struct.pack("=II", 3, 0xFFFF)),
        nla(8, struct.pack("=I", 600)), nla(9, struct.pack("=I", 0xFFFFFFFF)),
        nla(10 | 0x8000, nla(1, struct.pack("=I", 5))),  # stats: skipped
    ])
    body = struct.pack("=BBH", 1, 1, 0) + nla(1 | 0x8000, inner)
    return struct.pack("=IHHII", 16 + len(body), FAMILY_ID, 2, 1, 0) + body


@pytest.mark.parametrize("address, af", [("198.18.200.12", socket.AF_INET),
                                         ("fd00::12", socket.AF_INET6)])
def test_kernel_dumps_decode(address: str, af: int) -> None:
    msg = decoder("ipvs").unpack(kernel_service(address, af))
    assert _parse_service(msg) == (VirtualServerKey(Protocol.TCP, address, 80), "rr", 600)
    dest = ipvs_request(FAMILY_ID, IPVS_CMD_NEW_DEST, [
        _service_full(VirtualServerKey(Protocol.TCP, address, 80), "rr", 0),
        ("IPVS_CMD_ATTR_DEST", {"attrs": [
            ("IPVS_DEST_ATTR_ADDR", address), ("IPVS_DEST_ATTR_PORT", 8080),
            ("IPVS_DEST_ATTR_FWD_METHOD", 3), ("IPVS_DEST_ATTR_WEIGHT", 0),
            ("IPVS_DEST_ATTR_ACTIVE_CONNS", 2), ("IPVS_DEST_ATTR_INACT_CONNS", 5),
            ("IPVS_DEST_ATTR_ADDR_FAMILY", af)]})])
    rs = _parse_dest(decoder("ipvs").unpack(dest))
    assert (rs.address, rs.port, rs.weight, rs.active, rs.inactive, rs.masquerade) == (
        address, 8080, 0, 2, 5, False)


def test_ipset_listing_decodes_to_plan_entries() -> None:
    entries = {
        "hash:ip,port": SetEntry("198.18.200.10", "tcp", 80),
        "hash:ip,port,ip": SetEntry("198.18.1.1", "udp", 5353, "198.18.1.1"),
        "hash:ip,port,net": SetEntry("198.18.202.11", "tcp", 80, "198.18.150.0/24"),
        "hash:ip": SetEntry("198.18.200.10"),
        "bitmap:port": SetEntry(port=30080),
    }
    for set_type, entry in entries.items():
        raw = Layout(ipset_msg, {"IPSET_ATTR_DATA": ipset_msg.cadt_data}).message(
            ipset_type(IPSET_CMD_LIST),
            [["IPSET_ATTR_SETNAME", "PYPROXY-X"], ["IPSET_ATTR_TYPENAME", set_type],
             *ipset_adt([_entry_attrs(entry)] * 2)[1:]], nfgen_family=2)
        msg = decoder("ipset-reply").unpack(raw)
        assert msg.get("IPSET_ATTR_TYPENAME") == set_type
        assert _parse_members(msg, set_type) == [entry, entry]


def test_error_answers_carry_the_kernels_text() -> None:
    text = b"Invalid scheduler\0"
    tlv = struct.pack("=HH", 4 + len(text), 1) + text + b"\0" * (-len(text) % 4)
    request = struct.pack("=IHHII", 40, FAMILY_ID, 1, 9, 0)
    body = struct.pack("=i", -22) + request + tlv
    flags = 0x100 | 0x200  # NLM_F_CAPPED | NLM_F_ACK_TLVS
    message = struct.pack("=IHHII", 16 + len(body), 2, flags, 9, 0) + body
    assert _error_of(memoryview(message)) == (22, "Invalid scheduler")
