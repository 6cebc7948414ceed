"""The nf_tables generation id: how a resync knows nobody has touched nftables.

Every nf_tables commit in a network namespace (any table, any family, any
program) increments one counter, and reading it is one netlink round trip of
about a millisecond, where iptables-nft-save of a 10,000-service table takes
about 3 s. So a periodic full resync may skip reading the kernel exactly when
the counter still holds the value it had right after pyproxy's own last
write, and that write is known to be the only commit since pyproxy last read
the kernel. legacy iptables has no such counter; there every full sync reads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

GenerationReader = Callable[[], "int | None"]


def read_generation() -> int | None:
    """The current nf_tables generation id, or None if it cannot be read.

    A socket per call (about 1 ms): nothing to keep alive between syncs, and
    safe from whichever thread runs the sync. None makes the caller read the
    kernel the slow way, which is always correct.
    """
    try:
        from pyroute2.netlink import NLM_F_REQUEST
        from pyroute2.netlink.nfnetlink.nftsocket import NFT_MSG_GETGEN, NFTSocket, nft_gen_msg

        with NFTSocket() as sock:
            replies = sock.request_get(nft_gen_msg(), NFT_MSG_GETGEN, msg_flags=NLM_F_REQUEST)
        return int(replies[0].get_attr("NFTA_GEN_ID"))
    except Exception as err:  # any failure only costs the fast path
        log.debug("cannot read the nf_tables generation", extra={"error": str(err)})
        return None


def commits(lines: Iterable[str]) -> int:
    """How many nf_tables commits an iptables-nft-restore payload makes: one per table.

    iptables-nft-restore sends one batch per ``*table`` section that holds a
    command (pyproxy never writes empty sections), and each batch bumps the
    generation by one; measured on iptables 1.8.9, a failed restore bumps it by
    none. Counting too few only costs a kernel read; never count too many.
    ``lines`` may also be a payload's pieces, where each ``*table`` line is a
    piece of its own.
    """
    return sum(1 for line in lines if line.startswith("*"))
