"""A test CA with a server certificate for 127.0.0.1/localhost and a client certificate, made
with `cryptography` (what a team's own PKI or cert-manager would hand sdserve)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import NamedTuple


class Certs(NamedTuple):
    """PEM files: the CA, the server's pair, a client's pair (signed by the CA), and a client
    pair signed by another CA (refused under mutual TLS)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key, issuer: str, issuer_key, *, ca: bool, server: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, name: str, cert, key) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization

    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def write_certs(folder: Path) -> Certs:
    """Writes the CA, server and client files into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, other_ca_key = _key(), _key()
    ca = _certificate("sdserve test CA", ca_key, "sdserve test CA", ca_key, ca=True)
    ca_path, _ = _write(folder, "ca", ca, ca_key)
    server_key, client_key, stranger_key = _key(), _key(), _key()
    server = _certificate("localhost", server_key, "sdserve test CA", ca_key, ca=False, server=True)
    client = _certificate("test client", client_key, "sdserve test CA", ca_key, ca=False)
    stranger = _certificate("stranger", stranger_key, "another CA", other_ca_key, ca=False)
    return Certs(
        ca_path,
        *_write(folder, "server", server, server_key),
        *_write(folder, "client", client, client_key),
        *_write(folder, "stranger", stranger, stranger_key),
    )
