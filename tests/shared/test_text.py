"""The ONNX Runtime query encoder gives the text tower's own vectors, for any BERT by path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared.recommender.text import OnnxTextEncoder, TextEncoder, export_onnx

TEXTS = ["red lipstick", "a", "argan oil shampoo for dry hair, sulfate free " * 4, "gift set"]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path))
    return tmp_path


def test_onnx_vectors_equal_the_torch_encoders(tiny_bert_dir: Path, cache: Path) -> None:
    reference = TextEncoder(str(tiny_bert_dir)).encode(TEXTS, show_progress=False)
    fast = OnnxTextEncoder(str(tiny_bert_dir))
    np.testing.assert_allclose(fast.encode(TEXTS), reference, atol=1e-5)  # padded batch
    for text, expected in zip(TEXTS, reference, strict=True):  # one query at a time
        np.testing.assert_allclose(fast.encode([text])[0], expected, atol=1e-5)
    assert np.allclose(np.linalg.norm(fast.encode(TEXTS), axis=1), 1.0)


def test_the_export_is_cached_per_checkpoint(tiny_bert_dir: Path, cache: Path) -> None:
    first = export_onnx(str(tiny_bert_dir))
    assert first.parent == cache / "onnx" and first.exists()
    stamp = first.stat().st_mtime_ns
    assert export_onnx(str(tiny_bert_dir)) == first and first.stat().st_mtime_ns == stamp
    assert not list(first.parent.glob("*.tmp"))  # no half-written file left behind
