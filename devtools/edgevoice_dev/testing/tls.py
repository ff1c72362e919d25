"""A throwaway certificate authority and server certificate for local TLS tests.

The AWS SDK's CRT transport only speaks HTTP/2 over TLS, so a fake Bedrock on
127.0.0.1 needs a certificate the client trusts. :func:`make_test_ca` writes a fresh
CA and a ``localhost`` / ``127.0.0.1`` server certificate signed by it; clients
trust the CA through ``SSL_CERT_FILE``. Nothing here is fit for production use:
the keys are written unencrypted to the directory you give.
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TestCertificates:
    """Paths of the PEM files :func:`make_test_ca` wrote."""

    __test__ = False  # not a pytest test class, despite the name

    ca_file: Path
    cert_file: Path
    key_file: Path


def make_test_ca(directory: Path | str, *, days: int = 2) -> TestCertificates:
    """Write ``ca.pem``, ``server.pem`` and ``server.key`` into ``directory``.

    Reuses the files when all three already exist, so several processes started
    with the same ``--ca-dir`` agree on one CA.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = TestCertificates(out / "ca.pem", out / "server.pem", out / "server.key")
    # Several processes may share the directory: one generates, the others reuse.
    with open(out / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (paths.ca_file.exists() and paths.cert_file.exists() and paths.key_file.exists()):
            _generate(paths, days)
    return paths


def _generate(paths: TestCertificates, days: int) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    not_before = now - datetime.timedelta(minutes=5)
    not_after = now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgevoice test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    key_pem = server_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Written whole and renamed, so a reader never sees half a file.
    _write_atomically(paths.key_file, key_pem, mode=0o600)
    _write_atomically(paths.cert_file, server_cert.public_bytes(serialization.Encoding.PEM))
    _write_atomically(paths.ca_file, ca_cert.public_bytes(serialization.Encoding.PEM))


def _write_atomically(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    os.replace(tmp, path)
