#!/usr/bin/env python3
"""Run one command inside User-mode Linux, where the kernel has IPVS.

The machines here run a kernel without IPVS, so the IPVS tests run inside the
Debian package ``user-mode-linux``: a 6.1 kernel as an ordinary program
(``linux.uml``) booted with the host's filesystem as its root (hostfs). The
project's checkout and ``.venv`` are therefore visible unchanged inside it, and
nothing has to be built or copied::

    python scripts/uml.py run -- .venv/bin/pytest -q -p no:cacheprovider tests/ipvs
    python scripts/uml.py run --mem 1024M --timeout 900 -- ipvsadm -Ln

or, from Python, ``run_in_uml(argv, timeout=...) -> (exit code, output)``.

One run works like this. A fresh temporary directory holds a generated init
script, the command's output file and a few small bookkeeping files. The kernel
runs that script as PID 1; it mounts /proc, /sys and tmpfs on /run and /dev/shm,
and points TMPDIR at /run/tmp (so ``ip netns``, the xtables lock and the tests'
temporary files stay inside the guest and never reach the host's directories
through hostfs; /tmp itself stays the host's, where a CI clone may live), loads
the modules the IPVS tests need, runs the command with its output appended to a
file on the host filesystem, records the exit code in another such file and
halts. The host copies the output to the terminal while it grows, waits (never
longer than the timeout), and returns the recorded exit code: linux.uml's own
exit status says nothing about the command.

Two quirks of this host/guest pair are handled here, both measured:

* linux.uml 6.1 saves the guest's FPU registers with ``PTRACE_SETREGSET
  (NT_X86_XSTATE)`` using a fixed-size buffer. On hosts whose XSAVE area is
  larger (AVX-512, AMX) the host kernel answers EFAULT and the guest's init dies
  at once ("ptrace set fp regs failed, errno = 14", fixed upstream only in later
  kernels). linux.uml falls back to the plain FXSAVE registers when the
  NT_X86_XSTATE read fails at start-up, so on x86_64 it is started under a
  seccomp filter that makes exactly that ptrace request fail with EIO.
* In that FXSAVE mode the upper halves of the AVX/AVX-512 registers are not
  kept per guest context, and glibc's AVX string functions then crash or
  return garbage inside the guest (``ls`` segfaulted, printf lost its
  arguments, Python hung). The guest's environment therefore tells glibc
  (GLIBC_TUNABLES) and OpenSSL (OPENSSL_ia32cap) to use SSE code only.

No linux.uml process outlives a run. linux.uml forks helper processes that do
not die with it, so a small guard process (this script re-invoked) starts it in
a process group of its own and SIGKILLs and reaps that whole group when the
kernel halts, on timeout, on Ctrl-C or SIGTERM, and also when the caller is
killed outright (the guard's parent-death signal). The command inside is also
bounded by ``timeout`` so that a guest left on its own still halts by itself.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import ctypes
import os
import platform
import re
import secrets
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent

UML_BINARY = "linux.uml"
MODULES_DIR = Path("/usr/lib/uml/modules")
IN_UML_ENV = "PYPROXY_IN_UML"  # set to "1" for the command; tests/ipvs looks for it

# What the IPVS tests (and pyproxy's IPVS mode, which also writes iptables and
# ipset rules) may need. Modules never load on their own inside the guest.
MODULES = (
    "ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_lc", "ip_vs_wlc", "ip_vs_sh", "ip_vs_mh",
    "nf_conntrack", "nf_nat", "nf_conntrack_netlink", "nfnetlink",
    "ip_tables", "iptable_nat", "iptable_filter", "ipt_REJECT",
    "xt_comment", "xt_mark", "xt_MASQUERADE", "xt_statistic", "xt_conntrack",
    "xt_addrtype", "xt_set", "xt_tcpudp", "xt_multiport", "xt_nat", "xt_recent",
    "veth", "dummy",
    "ip_set", "ip_set_hash_ip", "ip_set_hash_ipport", "ip_set_hash_ipportip",
    "ip_set_hash_ipportnet", "ip_set_hash_net", "ip_set_bitmap_port",
)  # fmt: skip

GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# SSE-only code paths in the guest; see the module docstring for why.
GLIBC_TUNABLES = "glibc.cpu.hwcaps=" + ",".join(
    f"-{name}"
    for name in (
        "AVX", "AVX2", "AVX512F", "AVX512VL", "AVX512BW", "AVX512DQ", "AVX512CD",
        "AVX_Fast_Unaligned_Load", "ERMS", "FSRM",
    )
)  # fmt: skip
# First word: CPUID.1 (AVX, FMA, F16C, XOP); second word: all of CPUID.7.
OPENSSL_IA32CAP = "~0x3000180000000000:~0xffffffffffffffff"

EXIT_TIMEOUT = 124  # as timeout(1)
EXIT_NO_RESULT = 125  # the guest halted or crashed without recording an exit code
POLL_INTERVAL = 0.2
RUNDIR_PREFIX = "pyproxy-uml-"  # the guard's cwd; it removes it if the caller was killed

_MEM_RE = re.compile(r"^[1-9][0-9]*[KMG]$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class UmlError(RuntimeError):
    """User-mode Linux cannot be started here (not installed, bad arguments)."""


@dataclass
class UmlRun:
    """Everything one run produced; ``returncode`` is the command's exit code."""

    returncode: int
    output: str  # the command's output, then ``note`` if there is one
    note: str = ""  # what went wrong around the command (timeout, no exit code)
    console: str = ""
    timed_out: bool = False
    missing_modules: list[str] = field(default_factory=list)
    setup_log: str = ""
    # Seconds: host start -> init running, init -> command starts (mounts and
    # modules), the command itself, command end -> kernel gone, and the total.
    boot: float | None = None
    setup: float | None = None
    command: float | None = None
    halt: float | None = None
    total: float = 0.0

    def timings(self) -> str:
        """One human line: where the wall-clock time of the run went."""

        def fmt(value: float | None) -> str:
            return "?" if value is None else f"{value:.1f} s"

        return (
            f"boot {fmt(self.boot)}, setup {fmt(self.setup)} (mounts, modules), "
            f"command {fmt(self.command)}, halt {fmt(self.halt)}, total {fmt(self.total)}"
        )


# --------------------------------------------------------------------------- host checks


def find_uml() -> str:
    """The linux.uml program, or UmlError with the install hint."""
    path = shutil.which(UML_BINARY)
    if path is None:
        raise UmlError(f"{UML_BINARY} not found: apt-get install -y user-mode-linux")
    return path


def modules_root(uml: str) -> Path:
    """The modules directory of this linux.uml (``<MODULES_DIR>/<version>``)."""
    dirs = sorted(p for p in MODULES_DIR.glob("*") if (p / "modules.dep").is_file())
    if not dirs:
        raise UmlError(f"no User-mode Linux modules under {MODULES_DIR}")
    if len(dirs) == 1:
        return dirs[0]
    version = subprocess.run(
        [uml, "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout.strip()
    for candidate in dirs:
        if candidate.name == version:
            return candidate
    raise UmlError(f"no modules for linux.uml {version!r} among {[d.name for d in dirs]}")


def available_modules(moddir: Path) -> set[str]:
    """Module names the kernel can provide, loadable or built in ('-' read as '_')."""
    names: set[str] = set()
    for index, sep in (("modules.dep", ":"), ("modules.builtin", None)):
        path = moddir / index
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            entry = line.split(sep, 1)[0].strip() if sep else line.strip()
            if entry:
                names.add(Path(entry).name.split(".ko", 1)[0].replace("-", "_"))
    return names


# --------------------------------------------------------------------------- the init script


def _init_script(
    argv: Sequence[str],
    *,
    rundir: Path,
    modroot: Path,
    modules: Sequence[str],
    cwd: Path,
    env: Mapping[str, str],
    timeout: float,
) -> str:
    """The shell script the guest kernel runs as PID 1.

    The host's /tmp stays visible (the repository itself may live there, as in
    a CI clone); the command's temporary files go to a tmpfs instead
    (TMPDIR=/run/tmp), so they never travel through hostfs. The command's own
    environment is exactly ``env`` plus TMPDIR:
    ``env -i`` drops what the kernel hands to init (TERM, HOME and any unknown
    boot parameters).
    """
    q = shlex.quote
    env_words = " ".join(q(f"{k}={v}") for k, v in sorted(env.items()))
    mods = " ".join(q(m) for m in modules)
    limit = max(1, int(timeout))
    return f"""#!/bin/sh
# Generated by scripts/uml.py: PID 1 inside User-mode Linux, for one command.
export PATH={q(GUEST_PATH)} GLIBC_TUNABLES={q(GLIBC_TUNABLES)} \\
    OPENSSL_ia32cap={q(OPENSSL_IA32CAP)} LANG=C.UTF-8
exec 3>>{q(str(rundir / "output"))} 4>>{q(str(rundir / "stamps"))} \\
    5>>{q(str(rundir / "setup.log"))} 6>{q(str(rundir / "rc"))} </dev/null
stamp() {{ echo "$1 $(date +%s.%N)" >&4; }}
stamp init
mount -t proc proc /proc 2>&5
mount -t sysfs sysfs /sys 2>&5
grep -q ' /dev ' /proc/mounts || mount -t devtmpfs devtmpfs /dev 2>&5
mkdir -p /dev/shm /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm 2>&5
mount -t devpts devpts /dev/pts 2>&5
mount -t tmpfs -o mode=755 tmpfs /run 2>&5
echo uml > /proc/sys/kernel/hostname
ip link set lo up 2>&5
if ! modprobe -a -d {q(str(modroot))} {mods} 2>/dev/null; then
    for m in {mods}; do
        modprobe -d {q(str(modroot))} "$m" 2>&5 || echo "uml: could not load $m" >&5
    done
fi
mkdir -p /run/tmp && chmod 1777 /run/tmp
stamp ready
if cd {q(str(cwd))}; then
    env -i TMPDIR=/run/tmp {env_words} timeout -k 10 {limit} {shlex.join(argv)} \\
        </dev/null >&3 2>&3 3>&- 4>&- 5>&- 6>&-
    rc=$?
else
    echo "uml: cannot cd to {cwd}" >&3
    rc=126
fi
stamp done
echo "$rc" >&6
exec 3>&- 4>&- 5>&- 6>&-
sync
halt -f
poweroff -f
echo o > /proc/sysrq-trigger
sleep 60
"""


# --------------------------------------------------------------------------- running linux.uml


def _seccomp_filter() -> bytes:
    """BPF program: ptrace(PTRACE_GETREGSET, _, NT_X86_XSTATE, _) fails with EIO.

    Everything else is allowed. Guest system calls never reach seccomp (UML
    intercepts them with PTRACE_SYSEMU first), so only linux.uml's own probe of
    the XSAVE register set is affected; it then uses FXSAVE registers.
    """
    ld_abs, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_RET|K
    checks = [  # (offset in struct seccomp_data, value): all must match to deny
        (4, 0xC000003E),  # arch == AUDIT_ARCH_X86_64
        (0, 101),  # nr == __NR_ptrace
        (16, 0x4204), (20, 0),  # args[0] == PTRACE_GETREGSET (low, high word)
        (32, 0x202), (36, 0),  # args[2] == NT_X86_XSTATE
    ]  # fmt: skip
    allow_at = 2 * len(checks) + 1
    prog = []
    for i, (offset, value) in enumerate(checks):
        prog.append(struct.pack("HBBI", ld_abs, 0, 0, offset))
        prog.append(struct.pack("HBBI", jeq, 0, allow_at - (2 * i + 2), value))
    prog.append(struct.pack("HBBI", ret, 0, 0, 0x00050000 | 5))  # SECCOMP_RET_ERRNO | EIO
    prog.append(struct.pack("HBBI", ret, 0, 0, 0x7FFF0000))  # SECCOMP_RET_ALLOW
    return b"".join(prog)


_PR_SET_PDEATHSIG = 1
_PR_SET_SECCOMP = 22
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NO_NEW_PRIVS = 38
_SECCOMP_MODE_FILTER = 2


class _Stop(Exception):
    """Raised by the guard's signal handlers: tear the kernel down now."""


def _prctl(libc: ctypes.CDLL, option: int, arg: int) -> None:
    if libc.prctl(option, arg, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option})")


def _exec_kernel(libc: ctypes.CDLL, guard_pid: int, argv: Sequence[str]) -> None:
    """In the forked child: own process group, die with the guard, seccomp filter, exec."""
    os.setpgid(0, 0)
    _prctl(libc, _PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != guard_pid:
        os._exit(1)  # the guard died before the death signal was armed
    if platform.machine() == "x86_64":

        class SockFprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

        code = _seccomp_filter()
        buf = ctypes.create_string_buffer(code, len(code))
        prog = SockFprog(len(code) // 8, ctypes.cast(buf, ctypes.c_void_p))
        _prctl(libc, _PR_SET_NO_NEW_PRIVS, 1)
        libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                               ctypes.c_ulong]  # fmt: skip
        if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")
    os.execv(argv[0], list(argv))


def _guard(parent: int, argv: Sequence[str]) -> int:
    """Run linux.uml as a child and make sure none of its processes outlive it.

    linux.uml forks helper processes. Killing only the main one (as a parent-death
    signal would) leaves them running, so this small process sits between the
    caller and the kernel: it starts linux.uml in a process group of its own,
    and when the kernel halts, when it gets SIGTERM (the caller's timeout or
    Ctrl-C) or when the caller dies (parent-death signal SIGTERM), it SIGKILLs
    that whole group and, as a child subreaper, reaps every process of it.
    Runs as this script re-invoked, not in a ``preexec_fn``, which is unsafe in
    threaded callers such as pytest. Its working directory is the run directory,
    which it removes only if the caller died without doing so.
    """
    libc = ctypes.CDLL(None, use_errno=True)

    def stop(_signum: int, _frame: object) -> None:
        raise _Stop

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    _prctl(libc, _PR_SET_PDEATHSIG, signal.SIGTERM)
    _prctl(libc, _PR_SET_CHILD_SUBREAPER, 1)
    if os.getppid() != parent:
        return 1  # the caller is already gone
    guard_pid = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            _exec_kernel(libc, guard_pid, argv)
        except BaseException:
            traceback.print_exc()  # into the console log, which a failed run shows
        finally:
            os._exit(127)
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)  # also here, so the group exists before any kill below
    status = 1
    try:
        _, wait_status = os.waitpid(pid, 0)
        status = os.waitstatus_to_exitcode(wait_status)
    except _Stop:
        status = 143
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:  # the kernel and its orphaned helpers
            try:
                if os.waitpid(-1, os.WNOHANG) == (0, 0):
                    time.sleep(0.05)
            except ChildProcessError:
                break
        rundir = Path.cwd()
        if os.getppid() != parent and rundir.name.startswith(RUNDIR_PREFIX):
            shutil.rmtree(rundir, ignore_errors=True)  # the caller died before its cleanup
    return status


def _stop_guard(proc: subprocess.Popen[bytes]) -> None:
    """Ask the guard to kill the kernel; if it does not exit, kill its group outright."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def _read_stamps(path: Path) -> dict[str, float]:
    stamps: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                stamps[name] = float(value)
    return stamps


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def boot(
    argv: Sequence[str],
    *,
    timeout: float,
    mem: str = "1024M",
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    echo: Callable[[str], None] | None = None,
) -> UmlRun:
    """Boot User-mode Linux, run ``argv`` in it, halt; the whole run bounded by ``timeout``.

    ``cwd`` defaults to the repository root; ``env`` adds to the guest's fixed
    environment (PATH, LANG, HOME, PYPROXY_IN_UML=1 and the SSE-only settings).
    ``echo`` receives the command's output while it runs.
    """
    if not argv:
        raise UmlError("no command given")
    if not _MEM_RE.match(mem):
        raise UmlError(f"--mem must look like 1024M, not {mem!r}")
    if timeout <= 0:
        raise UmlError("timeout must be positive")
    workdir = Path(cwd).resolve() if cwd is not None else ROOT
    guest_env = {
        "PATH": GUEST_PATH,
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "GLIBC_TUNABLES": GLIBC_TUNABLES,
        "OPENSSL_ia32cap": OPENSSL_IA32CAP,
        IN_UML_ENV: "1",
    }
    for name, value in (env or {}).items():
        if not _ENV_NAME_RE.match(name):
            raise UmlError(f"not an environment variable name: {name!r}")
        guest_env[name] = value

    uml = find_uml()
    moddir = modules_root(uml)
    present = available_modules(moddir)
    modules = [m for m in MODULES if m in present]
    missing = [m for m in MODULES if m not in present]

    start = time.monotonic()
    start_wall = time.time()
    rundir = Path(tempfile.mkdtemp(prefix=RUNDIR_PREFIX))
    proc: subprocess.Popen[bytes] | None = None
    timed_out = False
    output = b""
    try:
        modroot = rundir / "modroot"
        (modroot / "lib").mkdir(parents=True)
        (modroot / "lib" / "modules").symlink_to(moddir.parent)
        for name in ("output", "stamps", "setup.log"):
            (rundir / name).touch()
        init = rundir / "init.sh"
        init.write_text(
            _init_script(
                argv,
                rundir=rundir,
                modroot=modroot,
                modules=modules,
                cwd=workdir,
                env=guest_env,
                timeout=timeout,
            )
        )
        init.chmod(0o755)
        umid = "pyproxy-" + secrets.token_hex(4)
        kernel_argv = [
            uml,
            f"mem={mem}",
            "root=/dev/root",
            "rootfstype=hostfs",
            "rootflags=/",
            "rw",
            f"init={init}",
            f"umid={umid}",
            f"uml_dir={rundir}",  # its pid file and mconsole socket, not ~/.uml
            "con=null",
            "con0=fd:0,fd:1",
        ]
        with open(rundir / "console", "wb") as console:
            proc = subprocess.Popen(
                [sys.executable, str(SCRIPT), "_guard", str(os.getpid()), "--", *kernel_argv],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # no terminal signals: the guard decides
                cwd=rundir,
            )
        deadline = start + timeout
        # Incremental: a UTF-8 character may be split between two reads.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        with open(rundir / "output", "rb") as out:
            while True:
                exited = proc.poll() is not None  # read once more after the exit
                chunk = out.read()
                output += chunk
                if echo is not None and (text := decoder.decode(chunk, final=exited)):
                    echo(text)
                if exited:
                    break
                if time.monotonic() >= deadline:
                    timed_out = True
                    break
                time.sleep(POLL_INTERVAL)
    finally:
        if proc is not None:
            _stop_guard(proc)  # no-op after a clean halt; else ends every linux.uml process
        end = time.monotonic()
        try:
            console_text = (rundir / "console").read_text(errors="replace")
            rc_text = (rundir / "rc").read_text().strip() if (rundir / "rc").exists() else ""
            setup_log = (rundir / "setup.log").read_text(errors="replace")
            stamps = _read_stamps(rundir / "stamps")
        except OSError:
            console_text, rc_text, setup_log, stamps = "", "", "", {}
        shutil.rmtree(rundir, ignore_errors=True)

    note = ""
    if timed_out:
        returncode = EXIT_TIMEOUT
        note = f"uml: timed out after {timeout:.0f} s; killed the kernel\n"
    elif rc_text.isdigit():
        returncode = int(rc_text)
    else:
        returncode = EXIT_NO_RESULT
        note = "uml: the guest recorded no exit code; its last console lines:\n"
        note += _tail(console_text, 40) + "\n"

    def since(a: str, b: str) -> float | None:
        return stamps[b] - stamps[a] if a in stamps and b in stamps else None

    stamps["start"] = start_wall
    return UmlRun(
        returncode=returncode,
        output=output.decode(errors="replace") + (f"\n{note}" if note else ""),
        note=note,
        console=console_text,
        timed_out=timed_out,
        missing_modules=missing,
        setup_log=setup_log,
        boot=since("start", "init"),
        setup=since("init", "ready"),
        command=since("ready", "done"),
        halt=(start_wall + (end - start) - stamps["done"]) if "done" in stamps else None,
        total=end - start,
    )


def run_in_uml(argv: list[str], *, timeout: float, mem: str = "1024M") -> tuple[int, str]:
    """Run ``argv`` inside User-mode Linux from the repository root.

    Returns the command's exit code (124 on timeout, 125 if the guest recorded
    none) and its combined stdout and stderr.
    """
    result = boot(argv, timeout=timeout, mem=mem)
    return result.returncode, result.output


# --------------------------------------------------------------------------- CLI


def _parse_env(items: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise UmlError(f"--env wants NAME=VALUE, not {item!r}")
        env[name] = value
    return env


def _raise_exit(signum: int, _frame: object) -> None:
    """SIGTERM/SIGHUP become SystemExit so that boot()'s finally kills the kernel."""
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``run [options] -- CMD...``; exits with CMD's exit code."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["_guard"] and args_in[2:3] == ["--"]:  # internal: see _guard()
        return _guard(int(args_in[1]), args_in[3:])

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="boot, run CMD inside, halt; exit with CMD's code")
    p_run.add_argument("--mem", default="1024M", help="guest memory (default 1024M)")
    p_run.add_argument("--timeout", type=float, default=900.0,
                       help="seconds for the whole run, boot included (default 900)")  # fmt: skip
    p_run.add_argument("--cwd", default=None, help="directory to run CMD in (default: repo root)")
    p_run.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                       help="extra environment for CMD (repeatable)")  # fmt: skip
    p_run.add_argument("--console", action="store_true",
                       help="print the guest kernel's console log afterwards")  # fmt: skip
    p_run.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    args = parser.parse_args(args_in)

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_exit)

    tail = ["\n"]  # the last character echoed, so our own lines start on a line of their own

    def echo(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
        tail[0] = text[-1]

    try:
        result = boot(
            command,
            timeout=args.timeout,
            mem=args.mem,
            cwd=args.cwd,
            env=_parse_env(args.env),
            echo=echo,
        )
    except UmlError as exc:
        print(f"uml: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\numl: interrupted; the kernel was killed", file=sys.stderr)
        return 130
    if tail[0] != "\n":
        print(flush=True)
    if result.note:
        print(result.note, end="", file=sys.stderr)
    if args.console:
        print("--- guest console ---\n" + result.console, file=sys.stderr)
    if result.missing_modules:
        print(f"uml: not in this kernel: {' '.join(result.missing_modules)}", file=sys.stderr)
    if result.setup_log.strip():
        print("uml: setup problems:\n" + result.setup_log.rstrip(), file=sys.stderr)
    print(f"uml: exit {result.returncode}; {result.timings()}", file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
