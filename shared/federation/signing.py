"""Signed privacy receipts: a node signs what it spent, the audit verifies it
(docs/privacy-audit.md).

A node signs the ledger fields of each contribution (:data:`SIGNED_FIELDS`) with its own ECDSA
P-256 key before its reply leaves, keeps a receipt of it, and sends the signature with the
reply; the server copies it into the ledger. Whoever holds the node's public key can then tell
an entry the node wrote from one altered or made up later, with or without the hash chain.

- The signature is base64 of the DER ECDSA-SHA256 signature over the UTF-8 bytes of
  :func:`canonical_json` of :func:`signed_payload`.
- ``key_id`` is the first 16 hex digits of the sha256 of the public key's DER
  SubjectPublicKeyInfo.
- :func:`digest_arrays` fingerprints the update a node sent (``update_digest``).
- :data:`OPTIONAL_FIELDS` (:data:`VOUCHED_FIELDS`, and ``server_start``) are signed too
  where the entry carries them (a node of before 2026-12-07 sends none): a server that adds
  one to an entry, or strips one, breaks its signature.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

SIGNED_FIELDS: tuple[str, ...] = (
    "run_id",
    "round",
    "node",
    "purpose",
    "contribution_index",
    "mechanism",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "max_grad_norm",
    "delta",
    "epsilon",
    "accountant",
    "unit",
    "target_epsilon",
    "num_customers",
    "update_digest",
)
# what a node states about its own customers, signed with its release where it states it:
# ``exclusive_customers``, whether they are customers of this node alone (client/policy.py)
VOUCHED_FIELDS: tuple[str, ...] = ("exclusive_customers",)
# the server start that asked for the release (1 at the run's first, one more at each resume),
# signed where the server numbered it: the node charges a run's requests in the order (start,
# phase, round), so the ledger can tell a release after a restart from one before it
SERVER_START = "server_start"
OPTIONAL_FIELDS: tuple[str, ...] = (*VOUCHED_FIELDS, SERVER_START)


def canonical_json(obj: Any) -> str:
    """The one serialisation hashes and signatures are computed over: sorted keys, no spaces,
    ASCII only (non-finite numbers are refused)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def signed_payload(entry: Mapping[str, Any]) -> dict:
    """The fields of ``entry`` a node signs: every one of :data:`SIGNED_FIELDS` (KeyError names
    any it lacks) and those of :data:`OPTIONAL_FIELDS` it carries."""
    lacking = [f for f in SIGNED_FIELDS if f not in entry]
    if lacking:
        raise KeyError(f"not signable: lacks {', '.join(lacking)}")
    return {f: entry[f] for f in SIGNED_FIELDS + OPTIONAL_FIELDS if f in entry}


def write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only: created so, and an existing file's looser
    permissions are narrowed before the secret is written into it."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def pkcs8_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A private key as unencrypted PKCS8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _public_key(public_pem: str | bytes) -> ec.EllipticCurvePublicKey:
    """A P-256 public key from PEM; ValueError for anything else."""
    data = public_pem.encode("ascii") if isinstance(public_pem, str) else public_pem
    try:
        key = serialization.load_pem_public_key(data)
    except (TypeError, UnsupportedAlgorithm) as error:
        raise ValueError(f"not a PEM public key ({error})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("not an ECDSA P-256 public key")
    return key


def public_key_id(public_pem: str | bytes) -> str:
    """First 16 hex digits of sha256 of the key's DER SubjectPublicKeyInfo; ValueError when
    ``public_pem`` is not an ECDSA P-256 public key."""
    der = _public_key(public_pem).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:16]


class NodeKey:
    """A node's signing key: ECDSA P-256, stored as unencrypted PKCS8 PEM, mode 0600."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey):
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise ValueError(f"a node key is ECDSA P-256, got {private_key.curve.name}")
        self._key = private_key
        public = private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public_pem = public.decode("ascii")
        self.key_id = public_key_id(self.public_pem)

    @classmethod
    def load(cls, path: str | Path) -> NodeKey:
        """The key in ``path``; ValueError when it is not an ECDSA P-256 PKCS8 PEM key."""
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path}: not an ECDSA private key")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: str | Path) -> NodeKey:
        """The key in ``path``, made there first (mode 0600) when the file does not exist."""
        path = Path(path)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_private(path, pkcs8_pem(ec.generate_private_key(ec.SECP256R1())))
        return cls.load(path)

    def sign(self, payload: Mapping[str, Any]) -> str:
        """Base64 DER ECDSA-SHA256 signature over ``canonical_json(payload)`` (UTF-8)."""
        data = canonical_json(dict(payload)).encode("utf-8")
        return base64.b64encode(self._key.sign(data, ec.ECDSA(hashes.SHA256()))).decode("ascii")


def verify(public_pem: str | bytes, payload: Mapping[str, Any], signature: str) -> bool:
    """Whether ``signature`` is the holder of ``public_pem``'s over ``payload``; False for any
    malformed key, payload or signature, never an exception."""
    try:
        key = _public_key(public_pem)
        raw = base64.b64decode(signature, validate=True)
        key.verify(raw, canonical_json(dict(payload)).encode("utf-8"), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def append_receipt(path: str | Path, payload: Mapping[str, Any], key: NodeKey) -> dict:
    """Sign ``payload`` and append it as a receipt (payload, ``signature``, ``key_id``) to the
    JSON-lines file ``path``, flushed and fsynced; returns the receipt."""
    signed = signed_payload(payload)
    receipt = {**signed, "signature": key.sign(signed), "key_id": key.key_id}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(canonical_json(receipt) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return receipt


def digest_arrays(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 hex of named arrays, reproducible from their values alone.

    Byte layout, for each name in ascending order of Python string comparison (code points):
    the ASCII text ``canonical_json({"dtype": a.dtype.str, "name": name, "shape":
    list(a.shape)})``, the byte ``b"\\n"``, then the array's bytes in C order
    (``np.ascontiguousarray(a).tobytes()``; ``dtype.str`` carries the byte order, e.g.
    ``"<f4"``). Arrays of Python objects are refused.
    """
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.asarray(arrays[name])
        if array.dtype.hasobject:
            raise ValueError(f"{name}: an object array has no stable bytes")
        header = {"dtype": array.dtype.str, "name": name, "shape": list(array.shape)}
        digest.update(canonical_json(header).encode("ascii") + b"\n")
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()
