"""Start a throwaway PostgreSQL for tests and benchmarks (plain functions, no pytest needed).

``initdb`` + ``pg_ctl`` into a temporary directory, trust auth, listening only on 127.0.0.1 at
a free port with its socket directory inside the temporary directory. PostgreSQL refuses to run
as root, so when we are root the server runs as ``nobody`` (via ``setpriv``/``runuser``) in
directories chowned to it. :meth:`PgServer.stop` always uses ``-m immediate`` so a test can
also simulate a crash; :meth:`PgServer.restart` brings it back on the same port and data.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PgServer", "PgUnavailable", "find_pg_bin", "start_pg"]


class PgUnavailable(RuntimeError):
    """The PostgreSQL binaries are not installed here."""


def find_pg_bin() -> Path:
    """The directory holding initdb and pg_ctl: PATH first, then /usr/lib/postgresql/*/bin."""
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(os.path.realpath(initdb)).parent
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(candidate, "initdb")):
            return Path(candidate)
    raise PgUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in "
        "/usr/lib/postgresql/*/bin: install postgresql or set STAGING_CLI_TEST_DSN"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_user_prefix(user: str) -> list[str]:
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv"):
        pw = pwd.getpwnam(user)
        return [
            "setpriv",
            f"--reuid={pw.pw_uid}",
            f"--regid={pw.pw_gid}",
            "--clear-groups",
        ]
    return ["runuser", "-u", user, "--"]


@dataclass
class PgServer:
    bindir: Path
    root: Path
    port: int
    user: str = "nobody"
    running: bool = field(default=False)

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def sockdir(self) -> Path:
        return self.root / "sock"

    @property
    def logfile(self) -> Path:
        return self.root / "server.log"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [*_as_user_prefix(self.user), *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return subprocess.run(
            cmd,
            check=check,
            capture_output=True,
            text=True,
            env=env,
            cwd=str(self.root),
            timeout=120,
        )

    def initdb(self) -> None:
        self.sockdir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            pw = pwd.getpwnam(self.user)
            for path in (self.root, self.sockdir):
                os.chown(path, pw.pw_uid, pw.pw_gid)
        proc = self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.datadir),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{proc.stdout}\n{proc.stderr}")

    def start(self) -> None:
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sockdir} "
            "-c fsync=off -c full_page_writes=off -c max_connections=200"
        )
        proc = self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.datadir),
            "-l",
            str(self.logfile),
            "-o",
            opts,
            "-w",
            "-t",
            "60",
            "start",
            check=False,
        )
        if proc.returncode != 0:
            log = self.logfile.read_text(errors="replace") if self.logfile.exists() else ""
            raise RuntimeError(f"pg_ctl start failed:\n{proc.stdout}\n{proc.stderr}\n{log}")
        self.running = True

    def stop(self) -> None:
        """Stop at once (``-m immediate``: like a crash, clients see their sessions die)."""
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.datadir),
            "-m",
            "immediate",
            "-w",
            "stop",
            check=False,
        )
        self.running = False

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        try:
            if self.running or (self.datadir / "postmaster.pid").exists():
                self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def start_pg(base: str | os.PathLike[str] | None = None) -> PgServer:
    """initdb + start a server on a free loopback port; call ``destroy()`` when done."""
    bindir = find_pg_bin()
    root = Path(tempfile.mkdtemp(prefix="staging-cli-pg-", dir=base))
    os.chmod(root, 0o755)
    server = PgServer(bindir=bindir, root=root, port=free_port())
    try:
        server.initdb()
        for _ in range(3):
            try:
                server.start()
                break
            except RuntimeError:
                server.port = free_port()  # lost the race for the port: try another
        else:
            raise RuntimeError(f"could not start PostgreSQL, see {server.logfile}")
        _wait_ready(server.port)
    except BaseException:
        server.destroy()
        raise
    return server


def _wait_ready(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"PostgreSQL did not accept connections on port {port}")
