"""The two servers of the server profile, started on 127.0.0.1 for tests and for users.

* an S3-API server: moto's standalone server (what the package registry offers here). The
  project itself speaks only the S3 API (``pyarrow.fs.S3FileSystem``), so MinIO, Ceph or AWS
  take its place unchanged (docs/operations.md).
* PostgreSQL from Debian's ``postgresql`` package: ``initdb`` into a fresh directory, a free
  port, ``pg_ctl start``; run as the ``postgres`` user when we are root (PostgreSQL refuses
  to run as root).

``python -m cluster.services s3|postgres [--port N] [--dir D]`` runs one in the foreground
(the ``make s3`` / ``make postgres`` targets), printing the environment a client needs.
The test suite uses the context managers (``tests/conftest.py``: ``s3_server``, ``pg_server``).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

__all__ = ["S3Server", "PostgresServer", "start_s3", "start_postgres", "s3_server", "postgres_server",
           "postgres_bin_dir", "ServiceError"]

# Test credentials for the local S3 server (moto accepts any); real stores read the usual
# AWS variables, never these.
LOCAL_ACCESS_KEY = "visionfleet-local"
LOCAL_SECRET_KEY = "visionfleet-local-secret"
LOCAL_REGION = "us-east-1"


class ServiceError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    """A running S3-API server on 127.0.0.1."""

    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What a client needs: the usual AWS variables plus the endpoint."""
        return {
            "AWS_ACCESS_KEY_ID": LOCAL_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": LOCAL_SECRET_KEY,
            "AWS_DEFAULT_REGION": LOCAL_REGION,
            "AWS_REGION": LOCAL_REGION,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
        }

    def create_bucket(self, name: str) -> str:
        """Create a bucket (S3 API ``PUT /<bucket>``); returns ``s3://<name>``."""
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(access_key=LOCAL_ACCESS_KEY, secret_key=LOCAL_SECRET_KEY, region=LOCAL_REGION,
                               endpoint_override=self.endpoint, allow_bucket_creation=True)
        fs.create_dir(name)
        return f"s3://{name}"

    def stop(self) -> None:
        _stop(self.proc)

    def restart(self) -> None:
        """Start again on the same port (moto keeps no data across a restart: tests of an
        outage use :meth:`pause` / :meth:`resume`, which keep the data)."""
        self.stop()
        self.proc = _spawn_moto(self.port, self.log)
        _wait_http(self.endpoint, self.proc, self.log)

    def pause(self) -> None:
        """The store disappears (SIGSTOP: connections hang, then time out) but keeps its data."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)


def _moto_bin() -> str:
    here = Path(sys.executable).parent / "moto_server"
    if here.exists():
        return str(here)
    found = shutil.which("moto_server")
    if not found:
        raise ServiceError("moto_server not found: install the dev extra (pip install -e '.[dev]')")
    return found


def _spawn_moto(port: int, log: Path) -> subprocess.Popen:
    fh = open(log, "ab")
    return subprocess.Popen([_moto_bin(), "-H", "127.0.0.1", "-p", str(port)], stdout=fh, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(f"the server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            time.sleep(0.1)
    raise ServiceError(f"no answer from {url} after {timeout:.0f}s: {log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGCONT)
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)


def start_s3(port: int | None = None, log_dir: str | os.PathLike[str] | None = None) -> S3Server:
    port = port or _free_port()
    log = Path(log_dir or tempfile.mkdtemp(prefix="vf-s3-")) / "moto.log"
    proc = _spawn_moto(port, log)
    _wait_http(f"http://127.0.0.1:{port}", proc, log)
    return S3Server(port=port, proc=proc, log=log)


@contextlib.contextmanager
def s3_server(port: int | None = None) -> Iterator[S3Server]:
    srv = start_s3(port)
    try:
        yield srv
    finally:
        srv.stop()


# ---------------------------------------------------------------------------- PostgreSQL
def postgres_bin_dir() -> Path:
    """Debian's ``/usr/lib/postgresql/<major>/bin`` (the newest), or where ``pg_ctl`` is on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        return Path(pg_ctl).resolve().parent
    raise ServiceError("PostgreSQL not found: `make postgres-deps` installs Debian's postgresql package "
                       "(apt-get install -y postgresql)")


@dataclass
class PostgresServer:
    port: int
    data_dir: Path
    user: str = "visionfleet"
    database: str = "visionfleet"
    _as_postgres: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        """SQLAlchemy URL (psycopg 3 driver); trust auth on 127.0.0.1 only."""
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _pg_run(list(args), self._as_postgres, check=check)

    def stop(self) -> None:
        self._run(str(postgres_bin_dir() / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop",
                  check=False)

    def start(self) -> None:
        log = self.data_dir.parent / "postgres.log"
        self._run(str(postgres_bin_dir() / "pg_ctl"), "-D", str(self.data_dir), "-l", str(log), "-w", "-t", "60",
                  "-o", f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.data_dir.parent}", "start")


def _pg_run(cmd: list[str], as_postgres: bool, check: bool = True) -> subprocess.CompletedProcess:
    if as_postgres:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise ServiceError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr[-2000:] or r.stdout[-2000:]}")
    return r


def start_postgres(port: int | None = None, base_dir: str | os.PathLike[str] | None = None) -> PostgresServer:
    """initdb into ``base_dir/data`` (a fresh temp dir by default), start on 127.0.0.1:port."""
    bin_dir = postgres_bin_dir()
    as_postgres = os.geteuid() == 0
    base = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="vf-pg-"))
    base.mkdir(parents=True, exist_ok=True)
    data = base / "data"
    if as_postgres:
        shutil.chown(base, "postgres", "postgres")
    srv = PostgresServer(port=port or _free_port(), data_dir=data, _as_postgres=as_postgres)
    if not (data / "PG_VERSION").exists():
        _pg_run([str(bin_dir / "initdb"), "-D", str(data), "-U", srv.user, "--auth=trust", "-E", "UTF8",
                 "--no-sync"], as_postgres)
    srv.start()
    r = _pg_run([str(bin_dir / "psql"), "-h", "127.0.0.1", "-p", str(srv.port), "-U", srv.user, "-d", "postgres",
                 "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{srv.database}'"], as_postgres)
    if r.stdout.strip() != "1":
        _pg_run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(srv.port), "-U", srv.user, srv.database],
                as_postgres)
    return srv


@contextlib.contextmanager
def postgres_server(port: int | None = None) -> Iterator[PostgresServer]:
    srv = start_postgres(port)
    try:
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(srv.data_dir.parent, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster.services", description=__doc__.split("\n\n")[0])
    ap.add_argument("service", choices=["s3", "postgres"])
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--dir", default=None, help="postgres: where the data directory lives (kept across runs)")
    ap.add_argument("--bucket", default="visionfleet", help="s3: a bucket to create")
    args = ap.parse_args(argv)
    try:
        if args.service == "s3":
            srv = start_s3(args.port, args.dir)
            srv.create_bucket(args.bucket)
            print(f"S3-API server on {srv.endpoint} (moto; data lives in memory until it stops). Use:")
            for k, v in srv.env().items():
                print(f"  export {k}={v}")
            print(f"  export VISIONFLEET_STORE=s3://{args.bucket}/state")
            stop = srv.stop
        else:
            pg = start_postgres(args.port, args.dir)
            print(f"PostgreSQL on 127.0.0.1:{pg.port}, data in {pg.data_dir}. Use:")
            print(f"  export VISIONFLEET_DB={pg.url}")
            stop = pg.stop
    except ServiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("Ctrl-C stops it.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
