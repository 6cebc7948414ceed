"""The only code that runs iptables programs: backend detection, save, restore.

iptables is driven through iptables-save / iptables-restore, as kube-proxy
does: one restore is one atomic transaction per table, and it is orders of
magnitude faster than rule-by-rule calls (see the README for figures).
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
import re
import subprocess
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass

from pyproxy.iptables.generation import GenerationReader, read_generation
from pyproxy.iptables.ruleset import RestorePayload, iter_lines

log = logging.getLogger(__name__)

# Called as _run is: (argv, stdin=None, timeout=120); a restore's stdin is its pieces.
Runner = Callable[..., subprocess.CompletedProcess[str]]
LineReader = Callable[[Sequence[str]], Iterator[str]]

# iptables exits 4 when it could not take the xtables lock (RESOURCE_PROBLEM).
EXIT_RESOURCE_PROBLEM = 4
HINT_CHAIN = "KUBE-IPTABLES-HINT"  # kubelet's marker of the backend the host uses


class Backend(enum.StrEnum):
    LEGACY = "legacy"
    NFT = "nft"


class IPTablesError(RuntimeError):
    """A failed iptables program, with the payload lines around the failure."""

    def __init__(self, message: str, context: str = "") -> None:
        super().__init__(message + (f"\n{context}" if context else ""))
        self.context = context


def _run(argv: Sequence[str], stdin: str | Iterable[str] | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a program to its end; ``stdin`` is its input, one text or its pieces in order.

    Pieces are written one at a time, never joined: a full restore at 10,000
    services is 30 MB, and joining it and then encoding all of it for the pipe
    made a full sync's peak memory. Its output waits in its pipes until the
    input is written (iptables-restore writes any only as it gives up); past
    ``timeout`` it is killed.
    """
    if stdin is None or isinstance(stdin, str):
        return subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
    with subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):  # it stopped reading: stderr says why
                for piece in stdin:
                    proc.stdin.write(piece)
            out, err = proc.communicate()  # flushes and closes its input, reads its output
        finally:
            timer.cancel()
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)


def _read_lines(argv: Sequence[str], timeout: float = 120) -> Generator[str, None, None]:
    """A program's output a line at a time, as it writes it; IPTablesError if it fails.

    For iptables-save at scale: 30 MB at 10,000 services, which as one string,
    plus the bytes it is decoded from and the pieces those are read in, was
    most of a full sync's peak memory. Its error output, at most a few lines,
    waits in its pipe until the output ends; past ``timeout`` it is killed.
    """
    with subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            assert proc.stdout is not None and proc.stderr is not None
            yield from proc.stdout
            errors = proc.stderr.read()
            returncode = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:  # the reader stopped early
                proc.kill()
    if returncode != 0:
        raise IPTablesError(f"{argv[0]} failed (exit {returncode}): {errors.strip()}")


def detect_backend(runner: Runner = _run) -> Backend:
    """Which backend the host's other tools use, as kubernetes-sigs/iptables-wrappers decides.

    The kubelet's hint chain wins; otherwise whichever backend holds more
    rules (legacy as soon as it holds 10 or more), since rules written to the
    other backend would be invisible to the host's own `iptables`.
    """
    for backend in (Backend.NFT, Backend.LEGACY):
        out = runner([f"iptables-{backend}-save", "-t", "mangle"])
        if out.returncode == 0 and HINT_CHAIN in out.stdout:
            return backend
    counts = {}
    for backend in (Backend.LEGACY, Backend.NFT):
        lines = 0
        for tool in (f"iptables-{backend}-save", f"ip6tables-{backend}-save"):
            try:
                out = runner([tool])
            except (OSError, subprocess.TimeoutExpired):
                continue
            if out.returncode == 0:
                lines += sum(1 for line in out.stdout.splitlines() if line.startswith("-"))
        counts[backend] = lines
    if counts[Backend.LEGACY] >= 10 or counts[Backend.LEGACY] > counts[Backend.NFT]:
        return Backend.LEGACY
    return Backend.NFT


@dataclass
class IPTables:
    """iptables-save and iptables-restore of one backend and one IP family."""

    backend: Backend
    ipv6: bool = False
    wait_seconds: int = 5
    retries: int = 3
    runner: Runner = _run
    # nf_tables only. The real reader goes with the real runner: a fake iptables
    # in a unit test has no generation unless the test gives it one.
    generation_reader: GenerationReader | None = None
    # save_lines' reader; by default the real one with the real runner (as above).
    line_reader: LineReader | None = None

    def generation(self) -> int | None:
        """The nf_tables generation id (pyproxy.iptables.generation); None on legacy."""
        if self.backend is not Backend.NFT:
            return None
        if self.generation_reader is not None:
            return self.generation_reader()
        return read_generation() if self.runner is _run else None

    def _tool(self, verb: str) -> str:
        return f"{'ip6' if self.ipv6 else 'ip'}tables-{self.backend}-{verb}"

    def save(self) -> str:
        """Every table as iptables-save prints it (readers keep filter and nat).

        One call, not one per table: on nf_tables each call reads the whole
        ruleset from the kernel, so two calls cost twice as much.
        """
        proc = self.runner([self._tool("save")])
        if proc.returncode != 0:
            raise IPTablesError(f"{self._tool('save')} failed: {proc.stderr.strip()}")
        return proc.stdout

    def save_lines(self) -> Iterator[str]:
        """What save() returns, a line at a time as iptables-save prints it (_read_lines)."""
        argv = [self._tool("save")]
        if self.line_reader is not None:
            return self.line_reader(argv)
        if self.runner is _run:
            return _read_lines(argv)
        return iter_lines(self.save())

    def chain_exists(self, table: str, chain: str) -> bool:
        """Cheap (one chain, not the ruleset): for the canary check between syncs."""
        tool = f"{'ip6' if self.ipv6 else 'ip'}tables-{self.backend}"
        proc = self.runner([tool, "-w", str(self.wait_seconds), "-t", table, "-S", chain])
        return proc.returncode == 0

    def restore(self, payload: RestorePayload) -> None:
        """Apply one --noflush transaction; retried while the xtables lock is busy."""
        if not payload:
            return
        argv = [self._tool("restore"), "--noflush", f"--wait={self.wait_seconds}"]
        for attempt in range(1, self.retries + 1):
            proc = self.runner(argv, payload.pieces)
            if proc.returncode == 0:
                return
            if proc.returncode == EXIT_RESOURCE_PROBLEM and attempt < self.retries:
                log.warning("xtables lock busy, retrying", extra={"attempt": attempt})
                time.sleep(0.2 * attempt)
                continue
            raise IPTablesError(
                f"{self._tool('restore')} failed (exit {proc.returncode}): "
                f"{proc.stderr.strip()}",
                failure_context(payload, proc.stderr),
            )


_LINE_RE = re.compile(r"line:? (\d+)")


def failure_context(payload: RestorePayload, stderr: str, around: int = 3) -> str:
    """The numbered payload lines around the one iptables-restore complained about."""
    match = _LINE_RE.search(stderr)
    if not match:
        return ""
    failed = int(match.group(1))
    lo = max(1, failed - around)
    near = itertools.islice(payload.iter_lines(), lo - 1, failed + around)
    return "\n".join(
        f"{'>' if n == failed else ' '}{n:6d}: {line}" for n, line in enumerate(near, lo)
    )
