"""Detached server processes with a PID file and a log file, found again by later processes.

A service started by ``python -m clients.localcluster start`` outlives that command; ``stop``
and ``status`` in another process find it through its PID file and check, through /proc, that
the PID still belongs to it (the command line names the service's directory), because PIDs
are reused.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from clients.localcluster.constants import (LOG_TAIL_BYTES, LOG_TAIL_LINES, PORT_PROBE_TIMEOUT_S,
                                            PROCESS_POLL_S, SERVICE_STOP_TIMEOUT_S,
                                            SIGKILL_WAIT_S)


class LocalClusterError(RuntimeError):
    """Raised when something cannot be installed, started or stopped; carries log tails."""


def log(msg: str) -> None:
    """Progress for the person waiting on a start.

    Written to stderr so that the ``env`` command's output on stdout stays eval-able.
    """
    print(f"[localcluster] {msg}", file=sys.stderr, flush=True)


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file, labelled, for an error message."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - LOG_TAIL_BYTES))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return f"(no {path})"
    return f"--- tail of {path} ---\n" + "\n".join(data.splitlines()[-lines:])


def proc_alive(pid: int, marker: str | None = None) -> bool:
    """Whether ``pid`` runs, is not a zombie and its command line contains ``marker``.

    A container's PID 1 may never reap orphans, so a zombie counts as gone; the marker
    guards against a reused PID.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
        return False
    if marker:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                "utf-8", "replace")
        except OSError:
            return False
        return marker in cmd
    return True


def rss_mb(pid: int) -> float | None:
    """Resident memory of ``pid`` in MB, or None if it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def port_open(host: str, port: int, timeout_s: float = PORT_PROBE_TIMEOUT_S) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


class Service:
    """One detached process with a PID file and a log file under its own directory.

    The layout (``<dir>/<name>.pid``, ``<dir>/logs/stdout.log``) is what earlier versions of
    this tooling wrote too, so clusters they started are still found and stopped.
    """

    def __init__(self, name: str, directory: Path, address: str):
        self.name = name
        self.dir = directory
        self.address = address
        self.pid_file = directory / f"{name}.pid"
        self.log_file = directory / "logs" / "stdout.log"
        self._popen: subprocess.Popen | None = None

    @property
    def marker(self) -> str:
        """What the command line of this service's process contains: its directory."""
        return str(self.dir)

    def pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def running(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        if self._popen is not None and self._popen.pid == pid:
            # Our own child: ask the kernel through waitpid, which also reaps it once it exits.
            return self._popen.poll() is None
        return proc_alive(pid, self.marker)

    def launch(self, cmd: list[str], env: dict | None = None) -> None:
        """Start ``cmd`` detached, appending its output to the log, and record its PID."""
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as out:
            out.write(f"\n=== {time.strftime('%F %T')} starting: {' '.join(cmd)}\n".encode())
            out.flush()
            # A new session: the service survives the CLI exiting and is not hit by the
            # terminal's Ctrl-C.
            self._popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                           stderr=subprocess.STDOUT, cwd=self.dir,
                                           env=env, start_new_session=True, close_fds=True)
        tmp = self.pid_file.with_suffix(".pid.tmp")
        tmp.write_text(f"{self._popen.pid}\n")
        os.replace(tmp, self.pid_file)

    def signal_and_wait(self, sig: int, timeout_s: float) -> bool:
        """Send ``sig`` and wait up to ``timeout_s`` for the process to exit.

        Returns:
            True if the process is gone (its PID file is then removed), False if it still runs.
        """
        pid = self.pid()
        if pid is None or not self.running():
            self.pid_file.unlink(missing_ok=True)
            return True
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._popen is not None:
                try:
                    self._popen.wait(timeout=PROCESS_POLL_S)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(PROCESS_POLL_S)
            if not self.running():
                self.pid_file.unlink(missing_ok=True)
                return True
        return False

    def stop(self, timeout_s: float = SERVICE_STOP_TIMEOUT_S) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``.

        Raises:
            LocalClusterError: the process survived SIGKILL.
        """
        if self.signal_and_wait(signal.SIGTERM, timeout_s):
            return
        log(f"{self.name} did not exit within {timeout_s:.0f}s of SIGTERM; sending SIGKILL")
        self.kill()

    def kill(self) -> None:
        """SIGKILL, like a crashed machine.

        Raises:
            LocalClusterError: the process survived SIGKILL.
        """
        if not self.signal_and_wait(signal.SIGKILL, SIGKILL_WAIT_S):
            raise LocalClusterError(f"{self.name} (pid {self.pid()}) survived SIGKILL")

    def status(self) -> dict:
        """``{"running", "pid", "address", "rss_mb"}`` of this service."""
        up = self.running()
        pid = self.pid() if up else None
        return {"running": up, "pid": pid, "address": self.address,
                "rss_mb": rss_mb(pid) if pid else None}
