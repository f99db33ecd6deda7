"""Real Apache Cassandra 5.0.x and etcd on loopback, with no hand steps.

Used by ``make services`` (``python -m ledger.localcluster start|stop|status|env``) and by
pytest session fixtures (``LocalCluster(...).start()``). Standard library only: readiness is
checked with a tiny CQL v4 client (STARTUP + QUERY) over a plain socket, etcd with ``/health``.

Where things come from (cached in ``${LEDGER_CACHE_DIR:-~/.cache/redledger}``, never the repo):
  * Cassandra: Maven Central does NOT publish a 5.0.x distribution tarball
    (``org.apache.cassandra:apache-cassandra`` stops at 4.0-alpha2), and Apache's download
    mirrors are unreachable here. We still try the tarball first (cheap), then fall back to
    ``org.apache.cassandra:cassandra-all:<newest 5.0.x>`` + ``mvn dependency:copy-dependencies``
    into ``<cache>/cassandra-all-<ver>/lib`` (~100 jars, 67 MB, ~25 s once). The JDK 17 flags
    of the tarball's conf/jvm17-server.options are built in (used when no tarball).
  * etcd: Debian ``etcd-server``/``etcd-client`` (3.4.23), apt-installed when missing.
  * JDK 17 (``openjdk-17-jre-headless``) and ``maven`` are apt-installed when missing.

Layout: region i (0-based) -> Cassandra node on 127.0.0.(i+1), datacenter == region name
(GossipingPropertyFileSnitch), seed 127.0.0.1, the same ports on every address. etcd on
127.0.0.1. JMX is off unless ``jmx_base_port`` is given (node i then uses jmx_base_port + i).

Measured on this machine (2 vCPU, 24 GB, Debian 12, OpenJDK 17.0.15, Cassandra 5.0.9 from the
Maven fallback, etcd 3.4.23), downloads cached, heap_mb=512, fresh run dir. Other engineers'
clusters shared the 2 cores during the runs, hence the ranges:
  python -m ledger.localcluster start                     # etcd + 1 node ready: 10-16 s
  python -m ledger.localcluster start --regions r1,r2,r3  # etcd + 3 nodes ready: 36-64 s
  python -m ledger.localcluster status                    # RSS ~940-950 MB per node, etcd ~24 MB
  python -m ledger.localcluster stop                      # 3 nodes + etcd: ~12 s (SIGTERM drain)
  etcd healthy 0.2-1.9 s after launch (restart with data ~1.5 s); kill_region + start_region
  of one node: ~10-13 s. `start` when all runs: 0.5 s. First run adds the Maven fetch
  (~25 s with an empty ~/.m2) and `apt-get install etcd-server etcd-client` (~20 s).
  pytest tests/integration/test_localcluster.py -m real   # 5 tests, 25-55 s

Durability caveats seen on 5.0.9: with commitlog_sync=periodic (10 s) a SIGKILL loses that
node's acknowledged writes newer than the last sync (commitlog_sync="batch" keeps them). The
default here is Cassandra's own (periodic, 10 s): the ledger's durability comes from
replication across regions (a journal append is acknowledged by a serial quorum of
datacenters, so losing one region loses nothing). Measured: one journal append (Paxos v2 LWT)
p50 ~3-4 ms with periodic, 23 ms with batch and 76 ms with group (15 ms window) on this
machine, because every Paxos step then waits for an fsync; -Dcassandra.unsafesystem=true is NOT used because after a SIGKILL it loses tables created
before the kill.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable, Sequence

MAVEN_CENTRAL = "https://repo1.maven.org/maven2"
# Used only when maven-metadata.xml cannot be read; newest first.
FALLBACK_VERSIONS = ("5.0.9", "5.0.8", "5.0.7", "5.0.6", "5.0.5", "5.0.4")

# The JPMS part of Cassandra 5.0's conf/jvm17-server.options: Cassandra reaches into JDK
# internals (jamm, chronicle, netty, JMX); without these it fails at startup on JDK 17.
JDK17_MODULE_FLAGS = [
    "--add-exports", "java.base/jdk.internal.misc=ALL-UNNAMED",
    "--add-exports", "java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED",
    "--add-exports", "java.rmi/sun.rmi.registry=ALL-UNNAMED",
    "--add-exports", "java.rmi/sun.rmi.server=ALL-UNNAMED",
    "--add-exports", "java.sql/java.sql=ALL-UNNAMED",
    "--add-exports", "java.base/java.lang.ref=ALL-UNNAMED",
    "--add-exports", "jdk.unsupported/sun.misc=ALL-UNNAMED",
    "--add-exports", "jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED",
    "--add-exports", "jdk.attach/sun.tools.attach=ALL-UNNAMED",
    "--add-opens", "java.base/java.lang.module=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.loader=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.ref=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.reflect=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.math=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.module=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.util.jar=ALL-UNNAMED",
    "--add-opens", "jdk.management/com.sun.management.internal=ALL-UNNAMED",
    "--add-opens", "java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-opens", "java.base/java.io=ALL-UNNAMED",
    "--add-opens", "java.base/java.nio=ALL-UNNAMED",
    "--add-opens", "java.base/java.lang.reflect=ALL-UNNAMED",
    "--add-opens", "jdk.compiler/com.sun.tools.javac=ALL-UNNAMED",
    "--add-opens", "java.base/java.lang=ALL-UNNAMED",
    "--add-opens", "java.base/java.util=ALL-UNNAMED",
]

STATE_FILE = "cluster.json"


class LocalClusterError(RuntimeError):
    """Raised when something cannot be installed, started or stopped; carries log tails."""


# --------------------------------------------------------------------------------------
# Paths and small helpers
# --------------------------------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("LEDGER_CACHE_DIR") or Path.home() / ".cache" / "redledger").expanduser()


def default_run_dir() -> Path:
    return Path(os.environ.get("LEDGER_RUN_DIR") or cache_dir() / "run").expanduser()


def _log(msg: str) -> None:
    # stderr, so `env` output on stdout stays eval-able.
    print(f"[localcluster] {msg}", file=sys.stderr, flush=True)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return f"(no {path})"
    return f"--- tail of {path} ---\n" + "\n".join(data.splitlines()[-lines:])


_apt_updated = False


def _apt_install(*packages: str) -> None:
    """Install Debian packages (we run as root; the lead's machines are fresh Debian)."""
    global _apt_updated
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if os.geteuid() != 0:
        raise LocalClusterError(f"need root to apt-get install {' '.join(packages)}")
    if not _apt_updated:
        _log("apt-get update")
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True, stdout=subprocess.DEVNULL)
        _apt_updated = True
    _log(f"apt-get install -y {' '.join(packages)}")
    subprocess.run(["apt-get", "install", "-y", "-q", *packages], env=env, check=True,
                   stdout=subprocess.DEVNULL)


def ensure_java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if not java:
        _apt_install("openjdk-17-jre-headless")
        java = shutil.which("java")
    if not java:
        raise LocalClusterError("java not found after installing openjdk-17-jre-headless")
    return java


def ensure_etcd() -> tuple[str, str]:
    """Return paths of (etcd, etcdctl), installing Debian's packages if needed."""
    if not (shutil.which("etcd") and shutil.which("etcdctl")):
        _apt_install("etcd-server", "etcd-client")
    etcd, etcdctl = shutil.which("etcd"), shutil.which("etcdctl")
    if not etcd or not etcdctl:
        raise LocalClusterError("etcd/etcdctl not on PATH after apt-get install etcd-server etcd-client")
    return etcd, etcdctl


# --------------------------------------------------------------------------------------
# Cassandra distribution (download once, atomically, into the cache)
# --------------------------------------------------------------------------------------

class CassandraDist:
    """A usable Cassandra: a ``lib/`` with all jars, and optionally the tarball's ``conf/``."""

    def __init__(self, version: str, home: Path, source: str):
        self.version = version
        self.home = home
        self.source = source  # "tarball" or "maven"

    @property
    def lib(self) -> Path:
        return self.home / "lib"

    def jamm_jar(self) -> Path:
        jars = sorted(self.lib.glob("jamm-*.jar"))
        if not jars:
            raise LocalClusterError(f"no jamm jar in {self.lib}")
        return jars[-1]

    def module_flags(self) -> list[str]:
        # Prefer the distribution's own list (exact for that version) when we have conf/.
        opts = self.home / "conf" / "jvm17-server.options"
        if opts.exists():
            flags: list[str] = []
            for line in opts.read_text().splitlines():
                line = line.strip()
                if line.startswith("--add-"):
                    flags.extend(line.split(None, 1))
            if flags:
                return flags
        return list(JDK17_MODULE_FLAGS)

    def __repr__(self) -> str:
        return f"CassandraDist({self.version!r}, {str(self.home)!r}, {self.source!r})"


def _http_get(url: str, timeout: float = 30) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def _maven_versions(artifact: str) -> list[str]:
    """5.0.x versions of org.apache.cassandra:<artifact> on Maven Central, newest first."""
    try:
        xml = _http_get(f"{MAVEN_CENTRAL}/org/apache/cassandra/{artifact}/maven-metadata.xml").decode()
    except (urllib.error.URLError, OSError):
        return []
    vers = re.findall(r"<version>(5\.0\.\d+)</version>", xml)
    return sorted(set(vers), key=lambda v: tuple(int(x) for x in v.split(".")), reverse=True)


def _download_atomic(url: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as r:
            shutil.copyfileobj(r, out, 1 << 20)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _try_tarball(version: str, cache: Path) -> CassandraDist | None:
    import tarfile

    home = cache / f"apache-cassandra-{version}"
    if (home / "lib").is_dir():
        return CassandraDist(version, home, "tarball")
    url = (f"{MAVEN_CENTRAL}/org/apache/cassandra/apache-cassandra/{version}/"
           f"apache-cassandra-{version}-bin.tar.gz")
    tgz = cache / f"apache-cassandra-{version}-bin.tar.gz"
    if not tgz.exists():
        try:
            _download_atomic(url, tgz)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise
        except (urllib.error.URLError, OSError):
            return None
    # Extract next to the final place, then rename: a half-extracted tree is never "cached".
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".extract-{version}-"))
    try:
        with tarfile.open(tgz) as tf:
            tf.extractall(tmp, filter="data")
        roots = [p for p in tmp.iterdir() if p.is_dir()]
        if len(roots) != 1 or not (roots[0] / "lib").is_dir():
            raise LocalClusterError(f"unexpected layout in {tgz}")
        os.replace(roots[0], home)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return CassandraDist(version, home, "tarball")


_FETCH_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.redledger</groupId>
  <artifactId>cassandra-fetch</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.cassandra</groupId>
      <artifactId>cassandra-all</artifactId>
      <version>{version}</version>
    </dependency>
  </dependencies>
</project>
"""


def _try_maven(version: str, cache: Path) -> CassandraDist | None:
    home = cache / f"cassandra-all-{version}"
    if (home / "lib").is_dir():
        return CassandraDist(version, home, "maven")
    mvn = shutil.which("mvn")
    if not mvn:
        _apt_install("maven")
        mvn = shutil.which("mvn")
    if not mvn:
        raise LocalClusterError("mvn not found after apt-get install maven")
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".mvn-{version}-"))
    try:
        (tmp / "pom.xml").write_text(_FETCH_POM.format(version=version))
        _log(f"fetching cassandra-all {version} and its runtime dependencies with Maven")
        r = subprocess.run(
            [mvn, "-B", "-q", "-f", str(tmp / "pom.xml"), "dependency:copy-dependencies",
             "-DincludeScope=runtime", f"-DoutputDirectory={tmp / 'dist' / 'lib'}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            _log(f"maven could not resolve cassandra-all {version}:\n{r.stdout[-2000:]}")
            return None
        if not list((tmp / "dist" / "lib").glob(f"cassandra-all-{version}.jar")):
            return None
        os.replace(tmp / "dist", home)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return CassandraDist(version, home, "maven")


def ensure_cassandra(cache: Path | None = None, version: str | None = None) -> CassandraDist:
    """Newest cached-or-resolvable Cassandra 5.0.x; pin with ``version`` or LEDGER_CASSANDRA_VERSION."""
    cache = Path(cache or cache_dir())
    cache.mkdir(parents=True, exist_ok=True)
    version = version or os.environ.get("LEDGER_CASSANDRA_VERSION") or None

    def cached(v: str) -> CassandraDist | None:
        for name, src in ((f"apache-cassandra-{v}", "tarball"), (f"cassandra-all-{v}", "maven")):
            if (cache / name / "lib").is_dir():
                return CassandraDist(v, cache / name, src)
        return None

    if version:
        candidates = [version]
    else:
        # Offline-friendly: anything already cached wins without touching the network.
        local = sorted({m.group(1) for p in cache.iterdir()
                        if (m := re.fullmatch(r"(?:apache-cassandra|cassandra-all)-(5\.0\.\d+)", p.name))},
                       key=lambda v: tuple(map(int, v.split("."))), reverse=True)
        for v in local:
            if (d := cached(v)):
                return d
        candidates = _maven_versions("cassandra-all") or list(FALLBACK_VERSIONS)
    if (d := next(filter(None, map(cached, candidates)), None)):
        return d

    tar_versions = set(_maven_versions("apache-cassandra")) if not version else {version}
    for v in candidates:
        if v in tar_versions and (d := _try_tarball(v, cache)):
            return d
    for v in candidates:
        if (d := _try_maven(v, cache)):
            return d
    raise LocalClusterError(f"could not obtain Cassandra (tried {candidates}) from Maven Central")


# --------------------------------------------------------------------------------------
# A minimal CQL native-protocol v4 client: enough for readiness checks without a driver.
# --------------------------------------------------------------------------------------

class CqlError(Exception):
    pass


def _cql_frame(stream: int, opcode: int, body: bytes) -> bytes:
    return struct.pack(">BBhBi", 0x04, 0, stream, opcode, len(body)) + body


def _cql_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise CqlError("connection closed")
        buf += chunk
    return bytes(buf)


def _read_frame(sock: socket.socket) -> tuple[int, bytes]:
    _ver, _flags, _stream, opcode, length = struct.unpack(">BBhBi", _recv_exact(sock, 9))
    return opcode, _recv_exact(sock, length)


def _decode_value(type_id: int, raw: bytes | None):
    if raw is None:
        return None
    if type_id in (0x0001, 0x000A, 0x000D):  # ascii, text, varchar
        return raw.decode()
    if type_id == 0x0010:  # inet
        return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
    if type_id in (0x0002, 0x0009):  # bigint, int
        return int.from_bytes(raw, "big", signed=True)
    if type_id == 0x0004:  # boolean
        return raw != b"\x00"
    return raw


def cql_query(host: str, port: int, query: str, timeout: float = 5.0) -> list[tuple]:
    """Run one query at consistency ONE over protocol v4; return rows (text/inet/int decoded)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(_cql_frame(0, 0x01, struct.pack(">H", 1) + _cql_string("CQL_VERSION")
                                + _cql_string("3.0.0")))
        opcode, body = _read_frame(sock)
        if opcode != 0x02:  # READY
            raise CqlError(f"STARTUP answered with opcode {opcode}: {body[6:].decode('utf-8', 'replace')}")
        q = query.encode()
        sock.sendall(_cql_frame(1, 0x07, struct.pack(">i", len(q)) + q + struct.pack(">HB", 0x0001, 0)))
        opcode, body = _read_frame(sock)
    if opcode == 0x00:
        code = struct.unpack(">i", body[:4])[0]
        (n,) = struct.unpack(">H", body[4:6])
        raise CqlError(f"error 0x{code:04x}: {body[6:6 + n].decode('utf-8', 'replace')}")
    if opcode != 0x08:
        raise CqlError(f"unexpected opcode {opcode}")
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        pos += n
        return body[pos - n:pos]

    def take_string() -> str:
        return take(struct.unpack(">H", take(2))[0]).decode()

    def take_option() -> int:
        # Only simple column types occur in the system tables we read; skip nested ones' params.
        (tid,) = struct.unpack(">H", take(2))
        if tid == 0x0000:
            take_string()
        elif tid in (0x0020, 0x0022):
            take_option()
        elif tid == 0x0021:
            take_option()
            take_option()
        elif tid in (0x0030, 0x0031):
            raise CqlError("UDT/tuple columns not supported by the readiness client")
        return tid

    (kind,) = struct.unpack(">i", take(4))
    if kind != 0x0002:  # not Rows (Void, SetKeyspace, SchemaChange)
        return []
    flags, ncols = struct.unpack(">ii", take(8))
    if flags & 0x0002:  # has_more_pages
        take(struct.unpack(">i", take(4))[0])
    if flags & 0x0004:  # no_metadata
        raise CqlError("no metadata in result")
    global_spec = flags & 0x0001
    if global_spec:
        take_string()
        take_string()
    types = []
    for _ in range(ncols):
        if not global_spec:
            take_string()
            take_string()
        take_string()
        types.append(take_option())
    (nrows,) = struct.unpack(">i", take(4))
    rows = []
    for _ in range(nrows):
        row = []
        for tid in types:
            (n,) = struct.unpack(">i", take(4))
            row.append(_decode_value(tid, take(n) if n >= 0 else None))
        rows.append(tuple(row))
    return rows


# --------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------

def _proc_alive(pid: int, marker: str | None = None) -> bool:
    """True if pid runs and is not a zombie (containers' PID 1 may never reap orphans), and
    its command line contains ``marker`` (guards against PID reuse)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
        return False
    if marker:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            return False
        return marker in cmd
    return True


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class _Service:
    """One detached process with a PID file and a log file under its own directory."""

    def __init__(self, name: str, directory: Path, address: str):
        self.name = name
        self.dir = directory
        self.address = address
        self.pid_file = directory / f"{name}.pid"
        self.log_file = directory / "logs" / "stdout.log"
        self._popen: subprocess.Popen | None = None

    @property
    def marker(self) -> str:
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
            # Our own child: ask the kernel via waitpid (also reaps it once it exits).
            return self._popen.poll() is None
        return _proc_alive(pid, self.marker)

    def launch(self, cmd: list[str], env: dict | None = None) -> None:
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            log.write(f"\n=== {time.strftime('%F %T')} starting: {' '.join(cmd)}\n".encode())
            log.flush()
            # New session: survives the CLI exiting and is not hit by the terminal's Ctrl-C.
            self._popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=subprocess.STDOUT, cwd=self.dir,
                                           env=env, start_new_session=True, close_fds=True)
        tmp = self.pid_file.with_suffix(".pid.tmp")
        tmp.write_text(f"{self._popen.pid}\n")
        os.replace(tmp, self.pid_file)

    def signal_and_wait(self, sig: int, timeout: float) -> bool:
        pid = self.pid()
        if pid is None or not self.running():
            self.pid_file.unlink(missing_ok=True)
            return True
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._popen is not None:
                try:
                    self._popen.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(0.2)
            if not self.running():
                self.pid_file.unlink(missing_ok=True)
                return True
        return False

    def stop(self, timeout: float = 30.0) -> None:
        if self.signal_and_wait(signal.SIGTERM, timeout):
            return
        _log(f"{self.name} did not exit within {timeout:.0f}s of SIGTERM; sending SIGKILL")
        if not self.signal_and_wait(signal.SIGKILL, 15):
            raise LocalClusterError(f"{self.name} (pid {self.pid()}) survived SIGKILL")

    def kill(self) -> None:
        if not self.signal_and_wait(signal.SIGKILL, 15):
            raise LocalClusterError(f"{self.name} (pid {self.pid()}) survived SIGKILL")

    def status(self) -> dict:
        up = self.running()
        pid = self.pid() if up else None
        return {"running": up, "pid": pid, "address": self.address,
                "rss_mb": _rss_mb(pid) if pid else None}


# --------------------------------------------------------------------------------------
# The cluster
# --------------------------------------------------------------------------------------

_LOGBACK = """<configuration scan="false">
  <!-- INFO to a rolling-free file: the packaged default is DEBUG to the console (slow). -->
  <appender name="FILE" class="ch.qos.logback.core.FileAppender">
    <file>{log}</file>
    <encoder><pattern>%-5level [%thread] %date{{ISO8601}} %F:%L - %msg%n</pattern></encoder>
  </appender>
  <logger name="org.apache.cassandra" level="INFO"/>
  <logger name="com.thinkaurelius.thrift" level="ERROR"/>
  <root level="WARN"><appender-ref ref="FILE"/></root>
</configuration>
"""


class LocalCluster:
    """etcd + one Cassandra node per region, all on loopback, all under ``run_dir``."""

    def __init__(self, run_dir: str | Path | None = None, regions: Sequence[str] = ("r1",),
                 etcd_client_port: int = 2379, etcd_peer_port: int = 2380,
                 cql_port: int = 9042, storage_port: int = 7000, heap_mb: int = 512,
                 jmx_base_port: int | None = None, cluster_name: str = "redledger",
                 start_timeout: float = 240.0, cassandra_version: str | None = None,
                 commitlog_sync: str = "periodic", commitlog_sync_period_ms: int = 10000):
        self.run_dir = Path(run_dir or default_run_dir()).expanduser().resolve()
        self.regions = list(regions)
        if not self.regions or len(set(self.regions)) != len(self.regions):
            raise ValueError(f"regions must be non-empty and unique: {self.regions}")
        if len(self.regions) > 250:
            raise ValueError("at most 250 regions (127.0.0.1 .. 127.0.0.250)")
        for r in self.regions:
            if not re.fullmatch(r"[A-Za-z0-9_-]+", r):
                raise ValueError(f"region name must be a plain identifier (it is the dc name): {r!r}")
        self.etcd_client_port = etcd_client_port
        self.etcd_peer_port = etcd_peer_port
        self.cql_port = cql_port
        self.storage_port = storage_port
        self.heap_mb = heap_mb
        self.jmx_base_port = jmx_base_port
        self.cluster_name = cluster_name
        self.start_timeout = start_timeout
        self.cassandra_version = cassandra_version
        if commitlog_sync not in ("periodic", "batch", "group"):
            raise ValueError(f"commitlog_sync must be periodic, batch or group: {commitlog_sync!r}")
        self.commitlog_sync = commitlog_sync
        self.commitlog_sync_period_ms = commitlog_sync_period_ms
        self.contact_points: dict[str, str] = {r: f"127.0.0.{i + 1}" for i, r in enumerate(self.regions)}
        self.etcd_endpoint = f"127.0.0.1:{etcd_client_port}"
        self._etcd = _Service("etcd", self.run_dir / "etcd", self.etcd_endpoint)
        self._nodes = {r: _Service(f"cassandra-{r}", self.run_dir / f"cassandra-{r}",
                                   f"{self.contact_points[r]}:{cql_port}") for r in self.regions}
        self._dist: CassandraDist | None = None

    # ---- state file: lets `stop`/`status` in another process find what `start` launched ----

    def _state(self) -> dict:
        return {"regions": self.regions, "etcd_client_port": self.etcd_client_port,
                "etcd_peer_port": self.etcd_peer_port, "cql_port": self.cql_port,
                "storage_port": self.storage_port, "heap_mb": self.heap_mb,
                "jmx_base_port": self.jmx_base_port, "cluster_name": self.cluster_name,
                "commitlog_sync": self.commitlog_sync,
                "commitlog_sync_period_ms": self.commitlog_sync_period_ms}

    def _save_state(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(self._state(), indent=2) + "\n")
        os.replace(tmp, self.run_dir / STATE_FILE)

    @classmethod
    def from_run_dir(cls, run_dir: str | Path | None = None, **overrides) -> "LocalCluster":
        """The cluster recorded in ``run_dir/cluster.json`` (defaults if there is none)."""
        rd = Path(run_dir or default_run_dir()).expanduser()
        kwargs: dict = {}
        try:
            kwargs = json.loads((rd / STATE_FILE).read_text())
        except (OSError, ValueError):
            pass
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        # Ignore keys a newer/older version of this module may have written.
        import inspect
        known = set(inspect.signature(cls).parameters) - {"run_dir"}
        return cls(rd, **{k: v for k, v in kwargs.items() if k in known})

    # ---- etcd ----

    def _etcd_healthy(self) -> bool:
        try:
            body = _http_get(f"http://{self.etcd_endpoint}/health", timeout=1)
            return json.loads(body).get("health") in (True, "true")
        except (OSError, ValueError):
            return False

    def start_etcd(self, timeout: float = 30.0) -> None:
        svc = self._etcd
        if not svc.running():
            etcd, _ = ensure_etcd()
            for port in (self.etcd_client_port, self.etcd_peer_port):
                if _port_open("127.0.0.1", port):
                    raise LocalClusterError(f"127.0.0.1:{port} is already in use by another process")
            data = svc.dir / "data"
            data.mkdir(parents=True, exist_ok=True)
            data.chmod(0o700)  # etcd warns (and newer versions refuse) otherwise
            peer = f"http://127.0.0.1:{self.etcd_peer_port}"
            client = f"http://{self.etcd_endpoint}"
            # --initial-cluster/--initial-advertise-peer-urls: the defaults name localhost:2380,
            # which does not match a non-default peer port and etcd then refuses to start.
            svc.launch([etcd, "--name", "ledger", "--data-dir", str(data),
                        "--listen-client-urls", client, "--advertise-client-urls", client,
                        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                        "--initial-cluster", f"ledger={peer}", "--initial-cluster-state", "new",
                        "--logger", "zap", "--log-outputs", "stderr"])
        deadline = time.monotonic() + timeout
        while not self._etcd_healthy():
            if not svc.running():
                raise LocalClusterError(f"etcd exited during startup\n{_tail(svc.log_file)}")
            if time.monotonic() > deadline:
                raise LocalClusterError(f"etcd not healthy after {timeout:.0f}s\n{_tail(svc.log_file)}")
            time.sleep(0.1)

    def stop_etcd(self, timeout: float = 15.0) -> None:
        self._etcd.stop(timeout)

    # ---- Cassandra ----

    def _dist_or_fetch(self) -> CassandraDist:
        if self._dist is None:
            self._dist = ensure_cassandra(version=self.cassandra_version)
        return self._dist

    def _write_node_config(self, region: str) -> Path:
        svc = self._nodes[region]
        addr = self.contact_points[region]
        d = svc.dir
        for sub in ("data", "commitlog", "hints", "saved_caches", "cdc_raw", "logs", "conf"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        # JSON is valid YAML: no quoting pitfalls, and 5.0 rejects unknown keys, so keep it lean.
        yaml = {
            "cluster_name": self.cluster_name,
            "partitioner": "org.apache.cassandra.dht.Murmur3Partitioner",
            "num_tokens": 16,
            "endpoint_snitch": "GossipingPropertyFileSnitch",
            "listen_address": addr,
            "rpc_address": addr,
            "storage_port": self.storage_port,
            "native_transport_port": self.cql_port,
            "start_native_transport": True,
            "seed_provider": [{"class_name": "org.apache.cassandra.locator.SimpleSeedProvider",
                               "parameters": [{"seeds": f"127.0.0.1:{self.storage_port}"}]}],
            "data_file_directories": [str(d / "data")],
            "commitlog_directory": str(d / "commitlog"),
            "hints_directory": str(d / "hints"),
            "saved_caches_directory": str(d / "saved_caches"),
            "cdc_raw_directory": str(d / "cdc_raw"),
            "commitlog_sync": self.commitlog_sync,
            "auto_bootstrap": False,      # fresh nodes with no data: nothing to stream
            "auto_snapshot": False,       # truncate/drop in tests would otherwise snapshot
            "concurrent_compactors": 1,
            "storage_compatibility_mode": "NONE",  # fresh cluster: 5.0 formats, no 4.x peers
            "paxos_variant": "v2",        # cheaper LWTs (fewer round trips) than 5.0's default v1
            "authenticator": "AllowAllAuthenticator",
            "authorizer": "AllowAllAuthorizer",
            "dynamic_snitch": True,
        }
        # periodic: a SIGKILL (kill_region) loses acknowledged writes newer than the last sync
        # (replay stops at the last sync marker; seen on 5.0.9), as in a real crash.
        # batch/group: a write is acknowledged only after its commit log fsync.
        if self.commitlog_sync == "periodic":
            yaml["commitlog_sync_period"] = f"{self.commitlog_sync_period_ms}ms"
        elif self.commitlog_sync == "group":
            yaml["commitlog_sync_group_window"] = f"{self.commitlog_sync_period_ms}ms"
        conf = d / "conf"
        (conf / "cassandra.yaml").write_text(json.dumps(yaml, indent=1) + "\n")
        (conf / "cassandra-rackdc.properties").write_text(f"dc={region}\nrack=rack1\n")
        (conf / "logback.xml").write_text(_LOGBACK.format(log=d / "logs" / "system.log"))
        return conf

    def _node_cmd(self, region: str) -> list[str]:
        dist = self._dist_or_fetch()
        java = ensure_java()
        i = self.regions.index(region)
        d = self._nodes[region].dir
        conf = d / "conf"
        cmd = [
            java,
            f"-Xms{self.heap_mb}m", f"-Xmx{self.heap_mb}m",
            "-XX:+UseG1GC", "-XX:+ParallelRefProcEnabled", "-XX:MaxGCPauseMillis=300",
            "-XX:+CrashOnOutOfMemoryError", "-XX:+PerfDisableSharedMem",
            f"-javaagent:{dist.jamm_jar()}",
            "-Djdk.attach.allowAttachSelf=true",
            "-Djava.net.preferIPv4Stack=true",
            "-Dio.netty.tryReflectionSetAccessible=true",
            "-Dio.netty.allocator.useCacheForAllThreads=true",
            "-Dio.netty.allocator.maxOrder=11",
            *dist.module_flags(),
            "-Dcassandra-foreground=yes",
            f"-Dcassandra.config=file://{conf / 'cassandra.yaml'}",
            f"-Dcassandra-rackdc.properties=file://{conf / 'cassandra-rackdc.properties'}",
            f"-Dlogback.configurationFile=file://{conf / 'logback.xml'}",
            f"-Dcassandra.logdir={d / 'logs'}",
            f"-Dcassandra.storagedir={d}",
            # Fast start: do not wait for gossip to settle / ring delay; create roles at once.
            "-Dcassandra.skip_wait_for_gossip_to_settle=0",
            "-Dcassandra.ring_delay_ms=1000",
            "-Dcassandra.superuser_setup_delay_ms=0",
            # NOT -Dcassandra.unsafesystem=true: it skips the flush of system_schema on schema
            # changes, and after a SIGKILL (kill_region) the replayed schema is not loaded:
            # tables created before the kill are "unconfigured" after restart (seen on 5.0.9).
        ]
        if self.jmx_base_port is not None:
            cmd.append(f"-Dcassandra.jmx.local.port={self.jmx_base_port + i}")
        cmd += ["-cp", f"{conf}:{dist.lib}/*", "org.apache.cassandra.service.CassandraDaemon"]
        return cmd

    def _node_failure(self, region: str, why: str) -> LocalClusterError:
        d = self._nodes[region].dir / "logs"
        return LocalClusterError(f"cassandra {region}: {why}\n{_tail(d / 'system.log')}\n"
                                 f"{_tail(d / 'stdout.log', 20)}")

    def _cql_ok(self, region: str) -> bool:
        try:
            cql_query(self.contact_points[region], self.cql_port, "SELECT release_version FROM system.local")
            return True
        except (OSError, CqlError, struct.error):
            return False

    def visible_dcs(self, region: str) -> set[str]:
        """Datacenters the node of ``region`` knows (its own + system.peers)."""
        host = self.contact_points[region]
        local = cql_query(host, self.cql_port, "SELECT data_center FROM system.local")
        peers = cql_query(host, self.cql_port, "SELECT data_center FROM system.peers")
        return {r[0] for r in local + peers if r[0]}

    def _launch_node(self, region: str) -> None:
        svc = self._nodes[region]
        if svc.running():
            return
        addr = self.contact_points[region]
        for port in (self.cql_port, self.storage_port):
            if _port_open(addr, port):
                raise LocalClusterError(f"{addr}:{port} is already in use by another process "
                                        f"(another cluster running? try `python -m ledger.localcluster status`)")
        self._write_node_config(region)
        cmd = self._node_cmd(region)
        _log(f"starting cassandra {region} on {addr}:{self.cql_port}")
        svc.launch(cmd)

    def _wait_cql(self, region: str, deadline: float) -> None:
        svc = self._nodes[region]
        while not self._cql_ok(region):
            if not svc.running():
                raise self._node_failure(region, "process exited during startup")
            if time.monotonic() > deadline:
                raise self._node_failure(region, "CQL port not answering in time")
            time.sleep(0.5)

    def _wait_dcs(self, regions: Iterable[str], deadline: float) -> None:
        want = set(self.regions)
        for region in regions:
            while True:
                try:
                    seen = self.visible_dcs(region)
                except (OSError, CqlError, struct.error):
                    seen = set()
                if want <= seen:
                    break
                if not self._nodes[region].running():
                    raise self._node_failure(region, "process exited while waiting for gossip")
                if time.monotonic() > deadline:
                    raise self._node_failure(region, f"sees datacenters {sorted(seen)}, want {sorted(want)}")
                time.sleep(0.5)

    def start_region(self, region: str) -> None:
        """(Re)start the node of ``region`` on its existing data dir; wait until it serves CQL
        and knows every datacenter."""
        deadline = time.monotonic() + self.start_timeout
        self._launch_node(region)
        self._wait_cql(region, deadline)
        self._wait_dcs([region], deadline)

    def kill_region(self, region: str) -> None:
        """SIGKILL the node of ``region`` (a crash, not a clean shutdown); data stays."""
        self._nodes[region].kill()

    def stop_region(self, region: str, timeout: float = 60.0) -> None:
        self._nodes[region].stop(timeout)

    # ---- whole cluster ----

    def start(self) -> None:
        """Start whatever is not running (etcd first, then nodes one at a time) and wait
        until all is ready. Idempotent."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._save_state()
        t0 = time.monotonic()
        self.start_etcd()
        _log(f"etcd healthy at {self.etcd_endpoint} ({time.monotonic() - t0:.1f}s)")
        deadline = time.monotonic() + self.start_timeout * len(self.regions)
        # One at a time: simultaneous joins race for tokens/schema, and 2 cores are the limit.
        for region in self.regions:
            t1 = time.monotonic()
            self._launch_node(region)
            self._wait_cql(region, deadline)
            _log(f"cassandra {region} serves CQL at {self._nodes[region].address} "
                 f"({time.monotonic() - t1:.1f}s)")
        self._wait_dcs(self.regions, deadline)
        _log(f"cluster ready: regions {self.regions}, {time.monotonic() - t0:.1f}s")

    def stop(self, timeout: float = 60.0) -> None:
        """Stop all nodes and etcd: SIGTERM, then SIGKILL after ``timeout``; waits for exit."""
        errors = []
        # SIGTERM every node first: each drains for several seconds, in parallel is faster.
        for svc in self._nodes.values():
            pid = svc.pid()
            if pid is not None and svc.running():
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for region in reversed(self.regions):
            try:
                self._nodes[region].stop(timeout)
            except LocalClusterError as e:
                errors.append(str(e))
        try:
            self._etcd.stop(15)
        except LocalClusterError as e:
            errors.append(str(e))
        if errors:
            raise LocalClusterError("; ".join(errors))

    def status(self) -> dict[str, dict]:
        """{"etcd": {...}, "cassandra-r1": {...}, ...}; each running/pid/address/rss_mb."""
        out = {"etcd": self._etcd.status()}
        for region in self.regions:
            out[self._nodes[region].name] = self._nodes[region].status()
        return out

    def env(self) -> dict[str, str]:
        return {
            "LEDGER_REGIONS": ",".join(self.regions),
            "LEDGER_CASSANDRA_CONTACT_POINTS": ",".join(f"{r}={h}" for r, h in self.contact_points.items()),
            "LEDGER_CASSANDRA_PORT": str(self.cql_port),
            "LEDGER_ETCD_ENDPOINT": self.etcd_endpoint,
        }

    def __enter__(self) -> "LocalCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------

def _print_status(st: dict[str, dict]) -> None:
    rows = [("PROCESS", "ADDRESS", "PID", "RUNNING", "RSS MB")]
    for name, s in st.items():
        rows.append((name, s["address"], str(s["pid"] or "-"), "yes" if s["running"] else "no",
                     f"{s['rss_mb']:.0f}" if s["rss_mb"] else "-"))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ledger.localcluster",
                                description="Real Cassandra 5.0 + etcd on loopback for redledger.")
    p.add_argument("command", choices=["start", "stop", "status", "env", "fetch"])
    p.add_argument("--run-dir", default=None, help="default ${LEDGER_RUN_DIR:-~/.cache/redledger/run}")
    p.add_argument("--regions", default=None, help="comma-separated, e.g. r1,r2,r3 (start only)")
    p.add_argument("--heap-mb", type=int, default=None)
    a = p.parse_args(argv)
    if a.command == "fetch":
        ensure_etcd()
        print(ensure_cassandra())
        return 0
    regions = [r.strip() for r in a.regions.split(",") if r.strip()] if a.regions else None
    if a.command == "start":
        cl = LocalCluster.from_run_dir(a.run_dir, heap_mb=a.heap_mb)
        if regions and regions != cl.regions:
            running = [n for n, s in cl.status().items() if s["running"] and n != "etcd"]
            if running:
                print(f"error: {running} already run with regions {cl.regions}; stop first", file=sys.stderr)
                return 2
            cl = LocalCluster.from_run_dir(a.run_dir, regions=regions, heap_mb=a.heap_mb)
        try:
            cl.start()
        except LocalClusterError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        _print_status(cl.status())
        return 0
    cl = LocalCluster.from_run_dir(a.run_dir)
    if a.command == "stop":
        cl.stop()
        _print_status(cl.status())
    elif a.command == "status":
        st = cl.status()
        _print_status(st)
        return 0 if all(s["running"] for s in st.values()) else 3
    elif a.command == "env":
        for k, v in cl.env().items():
            print(f"export {k}={v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
