"""Child processes for deployment (SuperLink, SuperNode, `flwr run`): started so none outlives its owner.

Each child gets its own session (Ctrl-C reaches only the owner, which then stops children in order) and
``PR_SET_PDEATHSIG`` (a SIGKILLed owner still takes its children down). Flower's own helpers
(SuperExec, ServerApp, ClientApp processes) watch their parent's pid and exit with it; ``stop`` also
signals every descendant it can see so nothing is left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

_PR_SET_PDEATHSIG = 1


class ProcessError(RuntimeError):
    """A child process that could not be started or died early; one line with the fix."""


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def executable(name: str) -> str:
    """A console script installed beside this Python (the venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise ProcessError(f"`{name}` not found beside {sys.executable} or on PATH: install the project (`make install`)")
    return found


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower children: this venv first on PATH (Flower spawns `flower-superexec`,
    `flwr-serverapp`, `flwr-clientapp` by name), no telemetry, no hub access."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def _listening_inodes(port: int) -> set[str] | None:
    """Socket inodes listening on TCP ``port`` (any address), from /proc/net; None where unreadable."""
    found, readable = set(), False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                found.add(cols[9])
    return found if readable else None


def port_listeners(port: int) -> list[int] | None:
    """The pids (that this user may inspect) holding a socket that listens on TCP ``port``; None if unknown."""
    inodes = _listening_inodes(port)
    if inodes is None:
        return None
    wanted = {f"socket:[{i}]" for i in inodes}
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in wanted for fd in (entry / "fd").iterdir()):
                pids.append(int(entry.name))
    return pids


def _describe(pid: int) -> str:
    try:
        cmd = " ".join(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").split())
    except OSError:
        return f"process {pid}"
    return f"process {pid} ({cmd[:80]})" if cmd else f"process {pid}"


def check_port_free(host: str, port: int, what: str = "the port") -> None:
    """Refuse a port another process listens on, by binding it as the server will (SO_REUSEADDR, so a
    just-closed connection's TIME_WAIT does not count). Probing by connecting is not enough: a port held by
    another coordinator answers, and this one would submit its run there."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ProcessError(f"cannot resolve host {host!r} ({e.strerror}): fix federation.host / --host") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise ProcessError(f"cannot listen on {host}:{port} ({e.strerror}): pick another port with --port "
                                   "(federation.port) or another --host") from None
            holders = port_listeners(port) or []
            by = f" by {_describe(holders[0])}" if holders else ""
            raise ProcessError(f"{what} {host}:{port} is already in use{by}: stop that process or pick another "
                               "port with --port (federation.port)") from None


class Child:
    """One child process; its output goes line by line to a log file and to ``on_line``."""

    def __init__(self, name: str, argv: Sequence[str], log_path: str | Path, *, env: dict[str, str] | None = None,
                 cwd: str | Path | None = None, on_line: Callable[[str], None] | None = None):
        self.name = name
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.on_line = on_line
        self._tail: list[str] = []
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env or child_env(), cwd=cwd, start_new_session=True, preexec_fn=_die_with_parent,
            text=True, errors="replace", bufsize=1,
        )
        self._reader = threading.Thread(target=self._pump, name=f"{name}-output", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log_path, "a", encoding="utf-8") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                self._tail = (self._tail + [line.rstrip("\n")])[-40:]
                if self.on_line is not None:
                    with contextlib.suppress(Exception):
                        self.on_line(line.rstrip("\n"))

    def tail(self, n: int = 15) -> str:
        return "\n".join(self._tail[-n:])

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._reader.join(timeout=5)
        return rc

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM the child and everything under it, wait ``grace`` seconds, then SIGKILL what is left."""
        family = descendants(self.pid) if self.running() else []
        for pid in [self.pid, *family]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        rc = None
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None and not any(alive(p) for p in family):
                break
            time.sleep(0.1)
        for pid in [self.pid, *family]:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        rc = self.proc.wait()
        self._reader.join(timeout=5)
        return rc


def sweep(env_name: str, env_value: str, grace: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL, every live process whose environment has ``env_name=env_value``; returns them.

    Children inherit their parent's environment, so a marker set for one run's children (its ``FLWR_HOME``)
    finds all of them, also those re-parented to init when a middle process died first (Ray's agents when
    its raylet is killed)."""
    needle = b"\0" + f"{env_name}={env_value}".encode() + b"\0"  # a whole entry, not a suffix of another
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in b"\0" + (entry / "environ").read_bytes() + b"\0" and alive(int(entry.name)):
                found.append(int(entry.name))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in found:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 0)
        while any(alive(p) for p in found) and time.monotonic() < deadline:
            time.sleep(0.1)
    return found


def wait_for_port(child: Child, host: str, port: int, timeout: float) -> None:
    """Block until ``child`` (or a process under it) listens on ``host:port``; a child that exits first, or
    another process answering there, is an error (the former with the child's log tail)."""
    probe = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.running():
            raise ProcessError(f"{child.name} exited with code {child.proc.returncode} before listening on "
                               f"{host}:{port}; its log ({child.log_path}) ends with:\n{child.tail()}")
        if port_open(probe, port):
            holders = port_listeners(port)
            if holders is None or set(holders) & {child.pid, *descendants(child.pid)}:
                return
            # Someone else answers there (it took the port after our check): never talk to it.
            raise ProcessError(f"{host}:{port} is held by {_describe(holders[0]) if holders else 'another process'}, "
                               f"not by {child.name}: stop that process or pick another port with --port "
                               "(federation.port)")
        time.sleep(0.2)
    raise ProcessError(f"{child.name} did not listen on {host}:{port} within {timeout:.0f}s: see {child.log_path}")


def interrupt_on_termination() -> dict[int, object]:
    """Ctrl-C, SIGTERM and SIGHUP all raise KeyboardInterrupt, so `finally` blocks stop children.

    SIGINT is reset too: a shell starting us in the background without job control ignores it.
    Returns the previous handlers (pass to ``restore_handlers``)."""

    def _raise(signum, frame):
        raise KeyboardInterrupt

    return {s: signal.signal(s, _raise) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}


def restore_handlers(old: dict[int, object]) -> None:
    for s, h in old.items():
        signal.signal(s, h)  # type: ignore[arg-type]


def exit_with_parent(poll_s: float = 0.5) -> None:
    """Exit this process at once when its parent goes away.

    Flower's own parent monitor sends SIGINT, whose handler then retries talking to the dead SuperLink
    for a long time; a process holding a run directory must not linger like that (writes there are
    atomic, so a hard exit loses nothing that was committed)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(70)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()

