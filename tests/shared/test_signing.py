"""Node signatures over privacy receipts and the update digest (shared/federation/signing.py)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from shared.federation.signing import (
    SIGNED_FIELDS,
    NodeKey,
    append_receipt,
    canonical_json,
    digest_arrays,
    public_key_id,
    signed_payload,
    verify,
)

PAYLOAD = {
    "run_id": "ab" * 32,
    "round": 2,
    "node": "7",
    "purpose": "training",
    "contribution_index": 3,
    "mechanism": "poisson_subsampled_gaussian",
    "noise_multiplier": 1.1,
    "sample_rate": 0.02,
    "steps": 50,
    "max_grad_norm": 1.0,
    "delta": 2e-5,
    "epsilon": 2.87,
    "accountant": "prv",
    "unit": "one customer's data at one node",
    "target_epsilon": 8.0,
    "num_customers": 5000,
    "update_digest": "cd" * 32,
}


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> NodeKey:
    return NodeKey.load_or_create(tmp_path_factory.mktemp("key") / "node" / "signing.pem")


def test_key_file_is_private_pkcs8_and_reloads(tmp_path: Path) -> None:
    path = tmp_path / "signing.pem"
    made = NodeKey.load_or_create(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert path.read_text().startswith("-----BEGIN PRIVATE KEY-----")  # PKCS8
    again = NodeKey.load_or_create(path)
    assert again.key_id == made.key_id == NodeKey.load(path).key_id
    assert again.public_pem == made.public_pem and len(made.key_id) == 16
    assert made.key_id == public_key_id(made.public_pem)


def test_key_id_is_sha256_of_the_der_public_key(key: NodeKey) -> None:
    body = "".join(key.public_pem.strip().splitlines()[1:-1])
    assert key.key_id == hashlib.sha256(base64.b64decode(body)).hexdigest()[:16]


def test_sign_verify_round_trip(key: NodeKey, tmp_path: Path) -> None:
    payload = signed_payload({**PAYLOAD, "hash": "x", "seq": 4})
    assert tuple(payload) == SIGNED_FIELDS
    signature = key.sign(payload)
    assert verify(key.public_pem, payload, signature)
    assert verify(key.public_pem.encode(), dict(reversed(payload.items())), signature)
    assert not verify(key.public_pem, {**payload, "epsilon": 2.86}, signature)
    other = NodeKey.load_or_create(tmp_path / "other.pem")
    assert not verify(other.public_pem, payload, signature)


@pytest.mark.parametrize(
    "public_pem, payload, signature",
    [
        (None, PAYLOAD, "AAAA"),
        ("not a key", PAYLOAD, "AAAA"),
        ("", PAYLOAD, ""),
        ("KEY", PAYLOAD, "%%% not base64 %%%"),
        ("KEY", PAYLOAD, base64.b64encode(b"\x30\x02\x01").decode()),
        ("KEY", PAYLOAD, None),
        ("KEY", PAYLOAD, 12),
        ("KEY", {**PAYLOAD, "epsilon": float("nan")}, "AAAA"),
        ("KEY", None, "AAAA"),
        ("KEY", {"x": object()}, "AAAA"),
    ],
)
def test_garbage_never_verifies_and_never_raises(key, public_pem, payload, signature) -> None:
    public_pem = key.public_pem if public_pem == "KEY" else public_pem
    assert verify(public_pem, payload, signature) is False


def test_a_p384_key_is_not_a_node_key(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    from shared.federation.signing import pkcs8_pem

    (tmp_path / "p384.pem").write_bytes(pkcs8_pem(ec.generate_private_key(ec.SECP384R1())))
    with pytest.raises(ValueError, match="P-256"):
        NodeKey.load(tmp_path / "p384.pem")


def test_signed_payload_names_missing_fields() -> None:
    with pytest.raises(KeyError, match="update_digest"):
        signed_payload({k: v for k, v in PAYLOAD.items() if k != "update_digest"})


def test_receipt_is_appended_as_one_signed_line(tmp_path: Path, key: NodeKey) -> None:
    path = tmp_path / "privacy" / "receipts.jsonl"
    first = append_receipt(path, {**PAYLOAD, "loss": 1.5}, key)
    append_receipt(path, {**PAYLOAD, "contribution_index": 4}, key)
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0]) == first
    assert set(first) == {*SIGNED_FIELDS, "signature", "key_id"} and first["key_id"] == key.key_id
    assert verify(key.public_pem, signed_payload(first), first["signature"])
    assert lines[0] == canonical_json(first)


def test_digest_is_reproducible_and_documented() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([1, -2], dtype=np.int64)
    digest = digest_arrays({"w": a, "b": b})
    assert digest == digest_arrays({"b": b.copy(), "w": np.asfortranarray(a)})  # order, layout
    assert digest == digest_arrays({"w": a.T.copy().T, "b": b})
    # the documented byte layout, by hand
    by_hand = hashlib.sha256()
    for name, array in (("b", b), ("w", a)):
        header = {"dtype": array.dtype.str, "name": name, "shape": list(array.shape)}
        by_hand.update(json.dumps(header, sort_keys=True, separators=(",", ":")).encode() + b"\n")
        by_hand.update(array.tobytes(order="C"))
    assert digest == by_hand.hexdigest()
    changed = a.copy()
    changed[1, 2] += 1e-6
    assert digest_arrays({"w": changed, "b": b}) != digest
    assert digest_arrays({"w": a.reshape(3, 2), "b": b}) != digest  # the shape counts
    assert digest_arrays({"w": a.astype(np.float64), "b": b}) != digest  # so does the dtype
    assert digest_arrays({"v": a, "b": b}) != digest  # and the names
    with pytest.raises(ValueError, match="object"):
        digest_arrays({"x": np.array([{}], dtype=object)})
