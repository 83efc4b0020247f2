"""Credentials of a federation: the TLS certificates of its SuperLink and its nodes' keys.

- ``write_tls``: a certificate authority (kept, to re-issue) and a SuperLink certificate signed
  by it, valid for the hosts the nodes dial (``127.0.0.1`` and ``localhost`` for a loopback
  run) and for a year by default. The nodes trust the CA certificate (``ca.crt``); the keys never
  leave the SuperLink's machine.
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

from shared.federation.signing import pkcs8_pem, write_private
from shared.runs.durable import private_dir

VALID_DAYS = 365  # default validity of a server certificate; the CA's is ten times that


@dataclass(frozen=True)
class TlsFiles:
    """Where the SuperLink's TLS material is: the CA certificate, its certificate and key."""

    ca: Path
    certificate: Path
    key: Path


def _certificate(
    subject: str,
    public_key: ec.EllipticCurvePublicKey,
    signer: ec.EllipticCurvePrivateKey,
    days: int,
    issuer: x509.Certificate | None = None,
    hosts: tuple[str, ...] = (),
) -> x509.Certificate:
    """A CA certificate (``issuer`` None: self-signed) or a TLS server certificate for
    ``hosts`` issued by ``issuer``, with the extensions strict TLS clients require (RFC 5280:
    key usage, subject and authority key identifiers, extended key usage for servers)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    is_ca = issuer is None
    authority = signer.public_key() if is_ca else issuer.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name if is_ca else issuer.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None), True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not is_ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=is_ca,
                crl_sign=is_ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(authority), critical=False
        )
    )
    if not is_ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
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


def write_tls(
    directory: Path,
    hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
    days: int = VALID_DAYS,
) -> TlsFiles:
    """A SuperLink certificate for ``hosts``, valid ``days``, under ``directory``; issued by the
    CA kept there (``ca.crt``, its key ``ca.key`` readable by its owner only), which is created
    the first time. Called again, it re-issues the server certificate with the same CA, so
    nodes keep trusting the ``ca.crt`` they have (rotation: docs/deployment.md)."""
    if days < 1:
        raise ValueError(f"certificate validity must be at least 1 day, got {days}")
    private_dir(directory)
    ca_file, ca_key_file = directory / "ca.crt", directory / "ca.key"
    if ca_file.exists() and ca_key_file.exists():
        ca = x509.load_pem_x509_certificate(ca_file.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_file.read_bytes(), password=None)
    else:
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca = _certificate("fedrec federation CA", ca_key.public_key(), ca_key, 10 * days)
        write_private(ca_key_file, pkcs8_pem(ca_key))
        ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = _certificate(
        "fedrec superlink", server_key.public_key(), ca_key, days, issuer=ca, hosts=hosts
    )
    files = TlsFiles(ca_file, directory / "server.pem", directory / "server.key")
    write_private(files.key, pkcs8_pem(server_key))
    files.certificate.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    return files


def write_node_key(directory: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's key pair ``directory/name`` (private) and ``name.pub``; returns both."""
    private_dir(directory)
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
