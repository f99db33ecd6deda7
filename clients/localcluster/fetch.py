"""Binaries the local cluster runs, fetched once into a cache outside the repository.

Where things come from (cached in ``${LEDGER_CACHE_DIR:-~/.cache/redledger}``):
  * Cassandra: Maven Central does NOT publish a 5.0.x distribution tarball
    (``org.apache.cassandra:apache-cassandra`` stops at 4.0-alpha2), and Apache's download
    mirrors may be unreachable. The tarball is still tried first (cheap), then
    ``org.apache.cassandra:cassandra-all:<newest 5.0.x>`` + ``mvn dependency:copy-dependencies``
    into ``<cache>/cassandra-all-<ver>/lib`` (~100 jars, 67 MB, ~25 s once). The JDK 17 flags
    of the tarball's conf/jvm17-server.options are built in (used when there is no tarball).
  * etcd: Debian ``etcd-server``/``etcd-client`` (3.4.23), apt-installed when missing.
  * JDK 17 (``openjdk-17-jre-headless``) and ``maven`` are apt-installed when missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from clients.localcluster.constants import DOWNLOAD_TIMEOUT_S, HTTP_TIMEOUT_S
from clients.localcluster.process import LocalClusterError, log

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


def cache_dir() -> Path:
    """Where downloads are kept: ``$LEDGER_CACHE_DIR`` or ``~/.cache/redledger``."""
    return Path(os.environ.get("LEDGER_CACHE_DIR") or Path.home() / ".cache" / "redledger").expanduser()


# apt-get update runs once per process, before the first install.
_apt_updated = False


def _apt_install(*packages: str) -> None:
    """Install Debian packages (we run as root; the lead's machines are fresh Debian)."""
    global _apt_updated
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if os.geteuid() != 0:
        raise LocalClusterError(f"need root to apt-get install {' '.join(packages)}")
    if not _apt_updated:
        log("apt-get update")
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True, stdout=subprocess.DEVNULL)
        _apt_updated = True
    log(f"apt-get install -y {' '.join(packages)}")
    subprocess.run(["apt-get", "install", "-y", "-q", *packages], env=env, check=True,
                   stdout=subprocess.DEVNULL)


def ensure_java() -> str:
    """Path of a ``java`` (``$JAVA_HOME`` first), installing JDK 17 if there is none."""
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


def http_get(url: str, timeout_s: float = HTTP_TIMEOUT_S) -> bytes:
    """The body of a GET of ``url``."""
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return r.read()


def http_post(url: str, body: bytes, timeout_s: float = HTTP_TIMEOUT_S) -> bytes:
    """The body of the answer to a POST of ``body`` (JSON) to ``url``."""
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as r:
        return r.read()


def _maven_versions(artifact: str) -> list[str]:
    """5.0.x versions of org.apache.cassandra:<artifact> on Maven Central, newest first."""
    try:
        xml = http_get(f"{MAVEN_CENTRAL}/org/apache/cassandra/{artifact}/maven-metadata.xml").decode()
    except (urllib.error.URLError, OSError):
        return []
    vers = re.findall(r"<version>(5\.0\.\d+)</version>", xml)
    return sorted(set(vers), key=lambda v: tuple(int(x) for x in v.split(".")), reverse=True)


def _download_atomic(url: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as r:
            shutil.copyfileobj(r, out, 1 << 20)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _try_tarball(version: str, cache: Path) -> CassandraDist | None:
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
        log(f"fetching cassandra-all {version} and its runtime dependencies with Maven")
        r = subprocess.run(
            [mvn, "-B", "-q", "-f", str(tmp / "pom.xml"), "dependency:copy-dependencies",
             "-DincludeScope=runtime", f"-DoutputDirectory={tmp / 'dist' / 'lib'}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            log(f"maven could not resolve cassandra-all {version}:\n{r.stdout[-2000:]}")
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
