"""Credentials of a federation: the TLS certificates of its SuperLink and its nodes' keys.

- ``write_tls``: a certificate authority and a SuperLink certificate signed by it, valid for the
  hosts the nodes dial (``127.0.0.1`` and ``localhost`` for a loopback run). The nodes trust
  the CA certificate (``ca.crt``); the keys never leave the SuperLink's machine.
- ``write_node_key``: a SuperNode's authentication key pair (ECDSA on NIST P-384, OpenSSH
  format, as ``flwr supernode register`` and ``flower-supernode
  --auth-supernode-private-key`` expect). The merchant keeps the private key; only the public
  key goes to the federation operator, who registers it.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shared.signing import pkcs8_pem, write_private

VALID_DAYS = 30


@dataclass(frozen=True)
class TlsFiles:
    """Where the SuperLink's TLS material is: the CA certificate, its certificate and key."""

    ca: Path
    certificate: Path
    key: Path


def _certificate(
    subject: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Name | None,
    signer: ec.EllipticCurvePrivateKey,
    hosts: tuple[str, ...] = (),
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if hosts:
        names = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signer, hashes.SHA256())


def write_tls(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> TlsFiles:
    """A fresh CA and a SuperLink certificate for ``hosts``, written under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = _certificate("fedrec federation CA", ca_key.public_key(), None, ca_key)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = _certificate(
        "fedrec superlink", server_key.public_key(), ca.subject, ca_key, hosts=hosts
    )
    files = TlsFiles(directory / "ca.crt", directory / "server.pem", directory / "server.key")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.certificate.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    write_private(files.key, pkcs8_pem(server_key))
    return files


def write_node_key(directory: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's key pair ``directory/name`` (private) and ``name.pub``; returns both."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / name, directory / f"{name}.pub"
    write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )
    return private, public
