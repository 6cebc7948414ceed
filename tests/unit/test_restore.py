"""The iptables program runners: a restore's input written in pieces, a save read by lines.

Real programs (cat, sh, printf, sleep) stand in for iptables here: what is
tested is the plumbing, pipes and timeouts included, not iptables.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterable, Iterator, Sequence

import pytest

from pyproxy.iptables.restore import (
    EXIT_RESOURCE_PROBLEM,
    Backend,
    IPTables,
    IPTablesError,
    _read_lines,
    _run,
    failure_context,
)
from pyproxy.iptables.ruleset import RestorePayload, StreamedPayload


def test_run_writes_the_pieces_in_order() -> None:
    proc = _run(["cat"], ("*nat\n", "-A X -j Y\n-A X", " -j Z\n", "COMMIT\n"))
    assert proc.returncode == 0
    assert proc.stdout == "*nat\n-A X -j Y\n-A X -j Z\nCOMMIT\n"


def test_run_of_a_program_that_stops_reading_gives_its_error() -> None:
    # 4 MB of input, more than a pipe holds: the writes meet the closed pipe.
    proc = _run(["sh", "-c", "echo 'line 1 failed' >&2; exit 2"], ["x" * 65536 + "\n"] * 64)
    assert (proc.returncode, proc.stderr.strip()) == (2, "line 1 failed")


def test_run_kills_a_program_past_its_timeout() -> None:
    proc = _run(["sleep", "10"], ["-A X -j Y\n"], timeout=0.2)
    assert proc.returncode == -signal.SIGKILL


def test_run_of_one_text_is_as_before() -> None:
    assert _run(["cat"], "a\nb\n").stdout == "a\nb\n"
    assert _run(["printf", "x"]).stdout == "x"


def test_read_lines_gives_the_output_as_it_comes_and_fails_after_it() -> None:
    assert list(_read_lines(["printf", "*nat\\nCOMMIT\\n"])) == ["*nat\n", "COMMIT\n"]
    lines = _read_lines(["sh", "-c", "echo '*nat'; echo 'no table' >&2; exit 3"])
    assert next(lines) == "*nat\n"
    with pytest.raises(IPTablesError, match=r"sh failed \(exit 3\): no table"):
        next(lines)
    with pytest.raises(IPTablesError, match=r"exit -9"):
        list(_read_lines(["sleep", "10"], timeout=0.2))


def test_read_lines_stopped_early_ends_the_program() -> None:
    lines = _read_lines(["yes"])
    assert next(lines) == "y\n"
    lines.close()  # returns: `yes` is killed, not waited for


class ScriptedRunner:
    """Answers save with fixed text and restore with scripted exit codes; keeps the input."""

    def __init__(self, save: str = "", restores: Sequence[int] = (0,)) -> None:
        self.save, self.restores = save, list(restores)
        self.inputs: list[str | Sequence[str] | None] = []

    def __call__(self, argv: Sequence[str], stdin: str | Sequence[str] | None = None,
                 timeout: float = 120) -> subprocess.CompletedProcess[str]:
        self.inputs.append(stdin)
        if argv[0].endswith("-save"):
            return subprocess.CompletedProcess(list(argv), 0, self.save, "")
        code = self.restores.pop(0)
        return subprocess.CompletedProcess(list(argv), code, "", f"Error on line {code}")


def test_save_lines_of_a_fake_runner_split_its_save() -> None:
    ipt = IPTables(Backend.LEGACY, runner=ScriptedRunner(save="*nat\nCOMMIT\n"))
    assert list(ipt.save_lines()) == ["*nat", "COMMIT"]


def test_save_lines_use_the_line_reader_given() -> None:
    asked: list[list[str]] = []

    def reader(argv: Sequence[str]) -> Iterator[str]:
        asked.append(list(argv))
        return iter(["*filter\n", "COMMIT\n"])

    ipt = IPTables(Backend.NFT, ipv6=True, runner=ScriptedRunner(), line_reader=reader)
    assert list(ipt.save_lines()) == ["*filter\n", "COMMIT\n"]
    assert asked == [["ip6tables-nft-save"]]


def test_restore_writes_the_payloads_pieces_and_retries_while_the_lock_is_busy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pyproxy.iptables.restore.time.sleep", lambda _: None)
    runner = ScriptedRunner(restores=(EXIT_RESOURCE_PROBLEM, 0))
    payload = RestorePayload(["*nat"])
    payload.extend(["-A PYPROXY-X -j DROP", "COMMIT"])
    IPTables(Backend.LEGACY, runner=runner).restore(payload)
    assert runner.inputs == [payload.pieces, payload.pieces]
    assert "".join(payload.pieces) == payload.text


def test_failed_restore_names_the_lines_around_the_failure() -> None:
    payload = RestorePayload(["*nat"])
    payload.extend(f"-A PYPROXY-X -j RULE{i}" for i in range(10))
    payload.append("COMMIT")
    with pytest.raises(IPTablesError) as err:
        IPTables(Backend.LEGACY, runner=ScriptedRunner(restores=(2,))).restore(payload)
    assert err.value.context.splitlines() == [
        "      1: *nat", ">     2: -A PYPROXY-X -j RULE0", "      3: -A PYPROXY-X -j RULE1",
        "      4: -A PYPROXY-X -j RULE2", "      5: -A PYPROXY-X -j RULE3"]
    assert failure_context(payload, "iptables-restore: line 12 failed").splitlines()[-1] \
        == ">    12: COMMIT"
    assert failure_context(payload, "no line number") == ""


def test_a_streamed_payload_is_rendered_as_written_and_again_for_the_errors_context() -> None:
    renders = 0

    def source() -> Iterator[str]:
        nonlocal renders
        renders += 1
        yield from ("*nat\n", "-A PYPROXY-X -j A\n-A PYPROXY-X -j B\n", "COMMIT\n")

    def runner(argv: Sequence[str], stdin: str | Iterable[str] | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
        script = "cat; echo 'iptables-restore: line 3 failed' >&2; exit 2"
        proc = _run(["sh", "-c", script], stdin, timeout)
        assert proc.stdout == "*nat\n-A PYPROXY-X -j A\n-A PYPROXY-X -j B\nCOMMIT\n"
        return proc

    with pytest.raises(IPTablesError) as err:
        IPTables(Backend.LEGACY, runner=runner).restore(StreamedPayload(source, 4))
    assert ">     3: -A PYPROXY-X -j B" in err.value.context.splitlines()
    assert renders == 2  # once as it was written, once for the lines around the failure
