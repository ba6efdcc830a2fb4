"""A secured Kafka broker, the way production clusters (Strimzi, MSK, Confluent) expose one.

Same KRaft node as ``KafkaBroker`` (same jars, same storage template), with four listeners:

- ``INTERNAL`` PLAINTEXT on ``port`` (``bootstrap``): the inter-broker listener and the harness's own
  door, whose anonymous principal is the super user that creates users and ACLs;
- ``SASL_SSL`` (SCRAM-SHA-512 and -256) on ``sasl_ssl_port``: TLS with a certificate from the test CA
  naming ``localhost`` and ``127.0.0.1``, users authenticated by password;
- ``SSL`` on ``ssl_port`` with client certificates required (mTLS): the user is the certificate's CN,
  as Strimzi's ``tls`` users are;
- ``SASL_PLAINTEXT`` on ``sasl_plaintext_port`` (SCRAM without TLS).

An authorizer (``StandardAuthorizer``) is on and nothing is allowed without an ACL: ``add_user`` and
``allow`` give a user exactly what a test grants, through kafka-python's admin API.
"""

from __future__ import annotations

from pathlib import Path

from ._proc import free_port
from .kafka import KafkaBroker
from .tls import TestCA

SCRAM_MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256")
_SCRAM_MODULE = "org.apache.kafka.common.security.scram.ScramLoginModule required;"


class SecureKafkaBroker(KafkaBroker):
    def __init__(self, workdir: Path | str, ca: TestCA | None = None, heap: str = "512m") -> None:
        super().__init__(workdir, heap=heap)
        taken = {self.port, self.controller_port}
        self.sasl_ssl_port, self.ssl_port, self.sasl_plaintext_port = (self._new_port(taken) for _ in range(3))
        self.ca = ca or TestCA(self.workdir / "ca")
        self.server_cert = self.ca.issue("kafka-broker", server=True)

    @staticmethod
    def _new_port(taken: set[int]) -> int:
        while True:
            port = free_port()
            if port not in taken:
                taken.add(port)
                return port

    @property
    def sasl_ssl_bootstrap(self) -> str:
        return f"localhost:{self.sasl_ssl_port}"

    @property
    def ssl_bootstrap(self) -> str:
        return f"localhost:{self.ssl_port}"

    @property
    def sasl_plaintext_bootstrap(self) -> str:
        return f"127.0.0.1:{self.sasl_plaintext_port}"

    def _properties(self) -> str:
        base = super()._properties()
        plain = f"PLAINTEXT://127.0.0.1:{self.port}"
        listeners = (f"INTERNAL://127.0.0.1:{self.port},SASL_SSL://127.0.0.1:{self.sasl_ssl_port},"
                     f"SSL://127.0.0.1:{self.ssl_port},SASL_PLAINTEXT://127.0.0.1:{self.sasl_plaintext_port}")
        advertised = (f"INTERNAL://127.0.0.1:{self.port},SASL_SSL://localhost:{self.sasl_ssl_port},"
                      f"SSL://localhost:{self.ssl_port},SASL_PLAINTEXT://127.0.0.1:{self.sasl_plaintext_port}")
        out = []
        for line in base.splitlines():
            if line.startswith("listeners="):
                line = line.replace(plain, listeners)
            elif line.startswith("advertised.listeners="):
                line = f"advertised.listeners={advertised}"
            elif line.startswith("inter.broker.listener.name="):
                line = "inter.broker.listener.name=INTERNAL"
            elif line.startswith("listener.security.protocol.map="):
                line = ("listener.security.protocol.map=CONTROLLER:PLAINTEXT,INTERNAL:PLAINTEXT,SASL_SSL:SASL_SSL,"
                        "SSL:SSL,SASL_PLAINTEXT:SASL_PLAINTEXT")
            out.append(line)
        out += [
            "# secured listeners (dpe_devkit.testbed.secure_kafka)",
            f"sasl.enabled.mechanisms={','.join(SCRAM_MECHANISMS)}",
            *(f"listener.name.{lst}.{m.lower()}.sasl.jaas.config={_SCRAM_MODULE}"
              for lst in ("sasl_ssl", "sasl_plaintext") for m in SCRAM_MECHANISMS),
            "ssl.keystore.type=PEM",
            f"ssl.keystore.location={self.server_cert.pem}",
            "ssl.truststore.type=PEM",
            f"ssl.truststore.location={self.ca.cert}",
            "listener.name.ssl.ssl.client.auth=required",
            "ssl.principal.mapping.rules=RULE:^CN=([^,]*).*$/$1/,DEFAULT",
            "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users=User:ANONYMOUS",
            "allow.everyone.if.no.acl.found=false",
        ]
        return "\n".join(out) + "\n"

    # -- users and ACLs, through the INTERNAL listener --------------------------------------------
    def _admin(self):
        from kafka import KafkaAdminClient

        return KafkaAdminClient(bootstrap_servers=self.bootstrap, client_id="dpe-testbed-security",
                                request_timeout_ms=10000)

    def add_user(self, name: str, password: str) -> None:
        """A SCRAM user (both mechanisms) with this password."""
        from kafka.admin import ScramMechanism, UserScramCredentialUpsertion

        admin = self._admin()
        try:
            for m in SCRAM_MECHANISMS:  # one request each: the broker refuses a user twice in one request
                errors = admin.alter_user_scram_credentials([
                    UserScramCredentialUpsertion(name, getattr(ScramMechanism, m.replace("-", "_")), password)])
                if any(errors.values()):
                    raise RuntimeError(f"SCRAM credential of {name} ({m}) refused: {errors}")
        finally:
            admin.close()

    def allow(self, user: str, grants: list[tuple[str, str, str, str]]) -> None:
        """ACLs for ``User:user``: (operation, resource type, name, pattern), e.g.
        ("WRITE", "TOPIC", "dpe-lines", "LITERAL"), ("READ", "GROUP", "dpe-", "PREFIXED")."""
        from kafka.admin import (ACL, ACLOperation, ACLPermissionType, ACLResourcePatternType, ResourcePattern,
                                 ResourceType)

        acls = [ACL(principal=f"User:{user}", host="*", operation=ACLOperation[op],
                    permission_type=ACLPermissionType.ALLOW,
                    resource_pattern=ResourcePattern(ResourceType[rtype], name, ACLResourcePatternType[pattern]))
                for op, rtype, name, pattern in grants]
        admin = self._admin()
        try:
            result = admin.create_acls(acls)
        finally:
            admin.close()
        failed = result.get("failed") if isinstance(result, dict) else None
        if failed:
            raise RuntimeError(f"create_acls failed: {failed}")
