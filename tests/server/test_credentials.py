"""The federation's TLS certificates (server/federation/credentials.py): strict clients accept
them, they last a year by default, and the kept CA re-issues the server certificate (rotation)."""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from server.federation.credentials import write_tls


def test_a_strict_rfc5280_verifier_accepts_the_server_certificate(tmp_path: Path) -> None:
    files = write_tls(tmp_path)
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    server = x509.load_pem_x509_certificate(files.certificate.read_bytes())
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName("localhost"))
    chain = verifier.verify(server, [])
    assert chain[-1] == ca
    lifetime = server.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert lifetime > datetime.timedelta(days=364)
    assert (tmp_path / "ca.key").stat().st_mode & 0o777 == 0o600


def test_python_strict_tls_completes_a_handshake(tmp_path: Path) -> None:
    files = write_tls(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(files.certificate, files.key)
    client_context = ssl.create_default_context(cafile=str(files.ca))
    client_context.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13's default
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            connection, _ = listener.accept()
            with server_context.wrap_socket(connection, server_side=True) as tls:
                tls.recv(1)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            tls.sendall(b"x")
        thread.join(timeout=10)


def test_the_kept_ca_reissues_the_server_certificate(tmp_path: Path) -> None:
    first = write_tls(tmp_path, days=30)
    ca_before, cert_before = first.ca.read_bytes(), first.certificate.read_bytes()
    second = write_tls(tmp_path, days=400)
    assert second.ca.read_bytes() == ca_before  # nodes keep trusting the ca.crt they have
    assert second.certificate.read_bytes() != cert_before
    ca = x509.load_pem_x509_certificate(ca_before)
    server = x509.load_pem_x509_certificate(second.certificate.read_bytes())
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName("localhost"))
    verifier.verify(server, [])
    with pytest.raises(ValueError, match="at least 1 day"):
        write_tls(tmp_path / "other", days=0)
