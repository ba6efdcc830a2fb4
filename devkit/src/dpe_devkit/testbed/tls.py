"""A throw-away certificate authority for the secured test servers (``openssl`` from the machine).

``TestCA(workdir).issue("kafka", server=True)`` writes ``kafka.key`` (PKCS#8 PEM, unencrypted, as
Kafka's PEM key stores and libpq read it), ``kafka.crt`` signed by the CA, and their concatenation
``kafka.pem``; the CA's own ``ca.crt`` is what clients trust.  Server certificates name ``localhost``
and ``127.0.0.1`` (what the test clients connect to, so hostname verification stays on).  Two CAs
made by two ``TestCA`` objects never trust each other: the "unknown CA" cases of the tests.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from ._proc import LaunchError


@dataclass(frozen=True)
class Issued:
    key: Path
    cert: Path
    pem: Path  # key then certificate, one file


class TestCA:
    __test__ = False  # not a pytest class

    def __init__(self, workdir: Path | str, name: str = "dpe-ingest test CA", days: int = 3) -> None:
        self.dir = Path(workdir).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name, self.days = name, days
        self.cert = self.dir / "ca.crt"
        self.key = self.dir / "ca.key"
        if not self.cert.is_file():
            self._openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", self.key, "-out", self.cert,
                          "-days", str(days), "-subj", f"/CN={name}",
                          "-addext", "basicConstraints=critical,CA:TRUE",
                          "-addext", "keyUsage=critical,keyCertSign,cRLSign")

    def _openssl(self, *args) -> None:
        cp = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True)
        if cp.returncode != 0:
            raise LaunchError(f"openssl {args[0]} failed: {cp.stderr.strip()[-2000:]}")

    def issue(self, name: str, server: bool = True, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> Issued:
        """A key and a certificate with CN=name (and, for a server, the hosts as subject alternative names)."""
        key, csr, cert, pem = (self.dir / f"{name}.{ext}" for ext in ("key", "csr", "crt", "pem"))
        ext = self.dir / f"{name}.ext"
        lines = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment",
                 f"extendedKeyUsage={'serverAuth,clientAuth' if server else 'clientAuth'}"]
        if server:
            alt = ",".join(f"IP:{h}" if h.replace(".", "").isdigit() else f"DNS:{h}" for h in hosts)
            lines.append(f"subjectAltName={alt}")
        ext.write_text("\n".join(lines) + "\n")
        self._openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
        self._openssl("x509", "-req", "-in", csr, "-CA", self.cert, "-CAkey", self.key, "-CAcreateserial",
                      "-out", cert, "-days", str(self.days), "-extfile", ext)
        pem.write_text(key.read_text() + cert.read_text())
        key.chmod(0o600)
        pem.chmod(0o600)
        return Issued(key=key, cert=cert, pem=pem)
