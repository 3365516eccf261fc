"""The Aim UI and the remote tracking server: ``aim up`` / ``aim server`` processes on loopback.

What this module owns (the tracker that writes runs is :mod:`flowpin.tracking.aim`; this module only
serves a repository that tracker wrote, or receives runs from trackers pointed at ``aim://HOST:PORT``):

* :func:`start_ui` / :func:`start_server` -- ``aim up`` / ``aim server`` for ``<root>/.aim`` on loopback
  only, each in a new session (``setsid``) so it is stopped as a whole process group (``aim up`` forks a
  uvicorn child); both return an :class:`AimProcess` once the server answers.
* :func:`serve_ui` -- the body of ``flowpin ui``: the UI until Ctrl-C or SIGTERM, then its group stopped.
* :func:`reindex` -- ``aim storage reindex``: Aim's queries see runs only after it.
* :func:`aim_command`, :func:`free_port`, :func:`group_members` -- the ``aim`` CLI of this environment, a
  free loopback port, the live members of a process group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

from flowpin.errors import TrackingError
from flowpin.tracking.aim import AIM_DIR, ensure_repo

LOOPBACK = "127.0.0.1"
DEFAULT_UI_PORT = 43800
"""``flowpin ui``'s port unless ``--port`` names another."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def aim_command() -> list[str]:
    """How to run the ``aim`` CLI of this Python environment."""
    beside = Path(sys.executable).parent / "aim"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("aim")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from aim.cli.cli import cli_entry_point; sys.exit(cli_entry_point())"]


@dataclasses.dataclass
class AimProcess:
    """A running ``aim up`` or ``aim server``: the leader of its own process group (session)."""

    process: subprocess.Popen[bytes]
    url: str
    """``http://HOST:PORT`` for the UI, ``aim://HOST:PORT`` for the tracking server."""
    log: Path | None = None
    """Where its output goes (``None``: inherited)."""

    @property
    def pgid(self) -> int:
        return self.process.pid  # started with setsid: the leader's pid is the group id

    def wait(self) -> int:
        """Block until the server exits; its exit status."""
        return self.process.wait()

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the whole process group, then SIGKILL what is left after ``timeout`` seconds."""
        _signal_group(self.pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=0.1)
            if not group_members(self.pgid):
                break
        else:
            _signal_group(self.pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=5)
        if self.process.poll() is None:  # never leave a zombie of our own
            self.process.wait()

    def __enter__(self) -> AimProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid`` (Linux ``/proc``; else a signal-0 probe)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp ...
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def _spawn(args: list[str], log: Path | None) -> subprocess.Popen[bytes]:
    out = open(log, "ab") if log is not None else None  # noqa: SIM115 -- the child holds it; closed below
    try:
        return subprocess.Popen(  # new session (setsid): the whole group is stopped together
            [*aim_command(), *args],
            stdin=subprocess.DEVNULL,
            stdout=out if out is not None else 2,  # aim's chatter on stderr: stdout is the caller's
            stderr=subprocess.STDOUT if out is not None else None,
            start_new_session=True,
        )
    except OSError as exc:
        raise TrackingError(f"cannot start `aim {args[0]}`: {exc}; is aim installed in this environment?") from exc
    finally:
        if out is not None:
            out.close()


def _wait_ready(server: AimProcess, probe: str, timeout: float) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            server.stop()
            tail = server.log.read_text("utf-8", "replace")[-2000:] if server.log is not None else ""
            raise TrackingError(
                f"`aim` exited with status {server.process.returncode} before serving {server.url}; is the port "
                f"taken? {tail}"
            )
        try:
            with urllib.request.urlopen(probe, timeout=2) as resp:  # noqa: S310 -- http on loopback
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.25)
    server.stop()
    raise TrackingError(f"`aim` did not answer on {probe} within {timeout:.0f} s; see {server.log or 'its output'}")


def _check_host(host: str) -> None:
    if host not in (LOOPBACK, "localhost", "::1"):
        raise TrackingError(f"host {host!r}: flowpin serves Aim on loopback only; tunnel it (ssh -L) to share it")


def start_ui(
    repo_root: Path,
    *,
    host: str = LOOPBACK,
    port: int = 0,
    workers: int = 1,
    log: Path | None = None,
    timeout: float = 120.0,
) -> AimProcess:
    """``aim up`` for ``repo_root/.aim`` (created if missing) on loopback; returns once the UI answers.

    ``port`` 0 picks a free one. The server runs in a new session: stop it with :meth:`AimProcess.stop`
    (or use it as a context manager) -- that ends its uvicorn child too.
    """
    _check_host(host)
    ensure_repo(repo_root)
    port = port or free_port(host)
    server = AimProcess(
        process=_spawn(
            ["up", "--repo", str(repo_root), "--host", host, "--port", str(port), "--workers", str(workers)], log
        ),
        url=f"http://{host}:{port}",
        log=log,
    )
    _ready(server, f"{server.url}/api/projects/", timeout)
    return server


def start_server(
    repo_root: Path, *, host: str = LOOPBACK, port: int = 0, log: Path | None = None, timeout: float = 120.0
) -> AimProcess:
    """``aim server`` (remote tracking) for ``repo_root/.aim`` on loopback; ``url`` is ``aim://HOST:PORT``.

    Point stage runs at it with ``FLOWPIN_AIM_REPO=aim://HOST:PORT``.
    """
    _check_host(host)
    ensure_repo(repo_root)
    port = port or free_port(host)
    server = AimProcess(
        process=_spawn(["server", "--repo", str(repo_root), "--host", host, "--port", str(port)], log),
        url=f"aim://{host}:{port}",
        log=log,
    )
    _ready(server, f"http://{host}:{port}/status/", timeout)
    return server


def serve_ui(
    repo_root: Path,
    *,
    port: int = DEFAULT_UI_PORT,
    host: str = LOOPBACK,
    on_ready: Callable[[AimProcess], None] | None = None,
) -> int:
    """``flowpin ui``: the Aim UI of ``repo_root/.aim`` until Ctrl-C or SIGTERM, then its whole group stopped.

    ``on_ready`` hears the server once it answers (default: :func:`announce_ui`, one line on stdout); the exit
    status is 0 after Ctrl-C, SIGTERM or a clean exit of ``aim up``, else 1.
    """
    # Both handled explicitly: a SIGINT ignored by whatever started us (a background job, a test runner)
    # is inherited as ignored, and Ctrl-C would then never stop the server.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    server: AimProcess | None = None
    try:
        server = start_ui(repo_root, host=host, port=port)
        (on_ready or partial(announce_ui, repo_root))(server)
        return 0 if server.wait() == 0 else 1
    except KeyboardInterrupt:
        return 0
    finally:
        if server is not None:
            server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def announce_ui(repo_root: Path, server: AimProcess) -> None:
    """``flowpin ui``'s line once the UI answers: the repository and the runs page's URL."""
    print(f"Aim UI of {repo_root / AIM_DIR}: {server.url}/runs  (Ctrl-C stops it)", flush=True)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _ready(server: AimProcess, probe: str, timeout: float) -> None:
    """Wait for ``server`` to answer; on any failure or interruption, stop its group first."""
    try:
        _wait_ready(server, probe, timeout)
    except BaseException:
        server.stop()
        raise


def reindex(repo_root: Path) -> None:
    """Rebuild the repository's run index (``aim storage reindex``): queries see runs only after it.

    Not while ``aim up`` serves the repository.
    """
    proc = subprocess.run(
        [*aim_command(), "storage", "--repo", str(repo_root), "reindex", "--yes"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise TrackingError(f"aim storage reindex of {repo_root / AIM_DIR} failed: {proc.stdout}{proc.stderr}")


__all__ = [
    "DEFAULT_UI_PORT",
    "LOOPBACK",
    "AimProcess",
    "aim_command",
    "announce_ui",
    "free_port",
    "group_members",
    "reindex",
    "serve_ui",
    "start_server",
    "start_ui",
]
