"""Optional fine-tuning of the text tower's top encoder layers on the training histories.

The frozen encoder already gives a strong start (the model is initialised as the text-only
baseline). Fine-tuning adapts its top ``text_finetune_layers`` transformer layers to the
catalog with a contrastive next-product objective: for consecutive products (a, b) in a
customer's training history, a's embedding should be closer to b's than to the other products
of the batch (in-batch negatives, symmetric InfoNCE). The tuned encoder then re-encodes the
whole catalog once, and the fusion model trains on those embeddings as usual.

The frozen lower layers compute the same thing at every step, so they run once: the batches
are drawn up front, the lower layers encode each product that occurs in them (a bounded set:
at most ``steps x 64`` products, however large the catalog), and every step runs only the top
layers on those stored token states (:class:`FrozenPrefix`).

``fedrec train`` tunes on the pooled histories (:func:`finetune_encoder`); a federation tunes
at the nodes, each on its own histories, and averages the top layers' weights
(client/encoder.py, server/federation/encoder_rounds.py), and every party then builds the same
checkpoint from the averaged weights (:func:`tuned_checkpoint`). Under DP a federation's nodes
tune with :mod:`shared.recommender.private_finetune` instead; ``fedrec train --dp`` does not. A
tuned checkpoint is cached under the fedrec cache directory, so a second run reuses it; its
catalog embeddings go through the shared embedding cache like any other checkpoint's. A
federation's checkpoints are kept for the :data:`FEDERATED_ENCODERS_KEPT` last used, so that an
operator running round after round cannot fill a node's disk (:func:`prune_federated_encoders`).
Costs: see docs/evaluation.md.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from shared.recommender.text import (
    EmbeddingCache,
    TextEncoder,
    cache_dir,
    item_texts,
    mean_pool,
    model_fingerprint,
    resolve_model_path,
    tokenize,
)
from shared.runs.progress import progress_bar

BATCH_PAIRS = 32  # consecutive-product pairs per step (64 texts through the encoder)
LEARNING_RATE = 2e-5
TEMPERATURE = 0.05
PACKABLE = ("bert", "roberta")  # encoders whose layers see no positions: texts can share a row
FEDERATED_ENCODERS_KEPT = 4  # a run builds one; the last four runs' are kept
# a checkpoint is read within seconds of being asked for (its embeddings, then its weights):
# one unused this long is no other process's any more, and may go
FEDERATED_ENCODER_IDLE_S = 600
# the most checkpoints kept at once, however recently used (about 90 MB each for MiniLM, plus
# their catalog embeddings): a server sending new layers in every message must not fill a
# node's disk within the idle time; beyond it a new one is refused until older ones fall idle
FEDERATED_ENCODERS_MAX = 16


def consecutive_pairs(histories: list[np.ndarray]) -> np.ndarray:
    """(n, 2) item indices of every consecutive pair of distinct products in the histories."""
    pairs = [np.stack([h[:-1], h[1:]], axis=1) for h in histories if len(h) > 1]
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.concatenate(pairs).astype(np.int64)
    return pairs[pairs[:, 0] != pairs[:, 1]]


def contrastive_loss(
    anchors: torch.Tensor, positives: torch.Tensor, pairs: np.ndarray
) -> torch.Tensor:
    """Symmetric InfoNCE with in-batch negatives; a product repeated in the batch is not used
    as a negative for itself."""
    logits = anchors @ positives.T / TEMPERATURE
    ids = torch.as_tensor(pairs, device=logits.device)
    same = (ids[:, 1][None, :] == ids[:, 1][:, None]) | (ids[:, 0][None, :] == ids[:, 0][:, None])
    same.fill_diagonal_(False)
    logits = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(len(pairs), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class _StoredStates(torch.nn.Module):
    """Stands in for the embedding layer: its input already is the frozen layers' output."""

    def forward(self, inputs_embeds: torch.Tensor, **_) -> torch.Tensor:
        return inputs_embeds


@contextmanager
def _running_only(model: torch.nn.Module, layers: torch.nn.ModuleList, stored: bool) -> Iterator:
    """Run ``model`` through ``layers`` only (and, if ``stored``, from given token states
    instead of its embedding layer); the model is whole again afterwards."""
    whole, embeddings = model.encoder.layer, model.embeddings
    model.encoder.layer = layers
    if stored:
        model.embeddings = _StoredStates()
    try:
        yield
    finally:
        model.encoder.layer, model.embeddings = whole, embeddings


class FrozenPrefix:
    """The token states after the encoder's frozen lower layers, computed once per product;
    :meth:`embed` runs the trainable top ``layers`` on them."""

    def __init__(
        self,
        encoder: TextEncoder,
        texts: list[str],
        items: np.ndarray,
        layers: int,
        show_progress: bool = False,
    ):
        self.encoder, self.texts = encoder, texts
        blocks = encoder.model.encoder.layer
        self.lower, self.top = blocks[: len(blocks) - layers], blocks[len(blocks) - layers :]
        self.states: dict[int, torch.Tensor] = {}
        self.add(items, show_progress)

    def add(self, items: np.ndarray, show_progress: bool = False) -> None:
        """Run the frozen layers on the ``items`` not stored yet."""
        items = np.array([i for i in np.unique(items) if int(i) not in self.states], dtype=int)
        order = items[np.argsort([len(self.texts[i]) for i in items], kind="stable")]
        chunks = range(0, len(order), 64)
        encoder = self.encoder
        was_training = encoder.model.training
        encoder.model.eval()
        with torch.no_grad(), _running_only(encoder.model, self.lower, stored=False):
            for start in progress_bar(chunks, "frozen encoder layers", disable=not show_progress):
                chunk = order[start : start + 64]
                batch = tokenize(
                    encoder.tokenizer, [self.texts[i] for i in chunk], encoder.max_length, "pt"
                ).to(encoder.device)
                hidden = encoder.model(**batch).last_hidden_state.cpu()
                for row, length in enumerate(batch["attention_mask"].sum(1).tolist()):
                    self.states[int(chunk[row])] = hidden[row, :length].clone()
        encoder.model.train(was_training)

    def trainable_top(self) -> list[torch.nn.Parameter]:
        """Freeze the whole encoder but the top layers; returns the top layers' parameters."""
        self.encoder.model.requires_grad_(False)
        parameters = list(self.top.parameters())
        for parameter in parameters:
            parameter.requires_grad_(True)
        return parameters

    def embed(self, items: np.ndarray) -> torch.Tensor:
        """Embeddings of ``items`` (each stored) through the top layers, as ``TextEncoder.embed``
        computes them from the text."""
        states = [self.states[int(i)] for i in items]
        hidden = pad_sequence(states, batch_first=True).to(self.encoder.device)
        lengths = torch.tensor([len(state) for state in states], device=self.encoder.device)
        mask = (torch.arange(hidden.shape[1], device=hidden.device) < lengths[:, None]).long()
        with _running_only(self.encoder.model, self.top, stored=True):
            out = self.encoder.model(inputs_embeds=hidden, attention_mask=mask).last_hidden_state
        return mean_pool(out, mask)

    def packing_refusal(self) -> str | None:
        """Why :meth:`embed_packed` cannot embed with this encoder (None: it can)."""
        kind = self.encoder.model.config.model_type
        if kind in PACKABLE:
            return None
        return (
            f"private encoder tuning packs each customer's texts into one sequence, which is "
            f"exact only for {', '.join(PACKABLE)} encoders; this one is {kind!r}"
        )

    def embed_packed(self, rows: np.ndarray) -> torch.Tensor:
        """Embeddings ``[rows, items, dim]`` of a 2-D array of (stored) items, equal to
        :meth:`embed`'s, with each row's items packed into one sequence: a token attends only
        to its own item's tokens, and the row is the batch dimension, so per-sample gradients
        of the top layers are per row (per customer, in private training) without a gradient
        per item; a row pads to its items' total length, not to the longest item times their
        number. Exact where positions enter below the layers (BERT's and RoBERTa's absolute
        position embeddings); other encoders are refused rather than embedded wrongly."""
        if reason := self.packing_refusal():
            raise ValueError(reason)
        width = rows.shape[1]
        sequences, segments = [], []
        for row in rows:
            states = [self.states[int(i)] for i in row]
            sequences.append(torch.cat(states))
            segments.append(torch.cat([torch.full((len(s),), k) for k, s in enumerate(states)]))
        device = self.encoder.device
        hidden = pad_sequence(sequences, batch_first=True).to(device)
        segment = pad_sequence(segments, batch_first=True, padding_value=-1).to(device)
        allowed = segment[:, :, None] == segment[:, None, :]
        allowed |= torch.eye(segment.shape[1], dtype=torch.bool, device=device)  # padding: itself
        blocked = torch.finfo(hidden.dtype).min
        mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=device)
        mask = mask.masked_fill(~allowed, blocked)[:, None]  # additive, as every attention takes
        for layer in self.top:
            hidden = layer(hidden, attention_mask=mask)
        member = (segment[:, :, None] == torch.arange(width, device=device)).to(hidden.dtype)
        pooled = torch.einsum("bld,blk->bkd", hidden, member) / member.sum(1)[..., None]
        return F.normalize(pooled, dim=-1)  # mean_pool's normalisation, per item


def train_top_layers(
    prefix: FrozenPrefix, batches: list[np.ndarray], show_progress: bool = False
) -> list[float]:
    """AdamW steps on the top layers, one per batch of (anchor, next product) pairs whose
    products ``prefix`` stores; returns the losses. The rest of the encoder stays frozen."""
    model = prefix.encoder.model
    optimizer = torch.optim.AdamW(prefix.trainable_top(), lr=LEARNING_RATE)
    model.train()
    losses = []
    for batch in progress_bar(batches, "fine-tuning the text encoder", disable=not show_progress):
        loss = contrastive_loss(prefix.embed(batch[:, 0]), prefix.embed(batch[:, 1]), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    model.requires_grad_(False)
    return losses


def top_layer_names(encoder: TextEncoder, layers: int) -> list[str]:
    """The state-dict names of the encoder's top ``layers`` transformer layers."""
    blocks = len(encoder.model.encoder.layer)
    if not 1 <= layers <= blocks:
        raise ValueError(f"text-finetune-layers must be between 1 and {blocks}, got {layers}")
    prefixes = tuple(f"encoder.layer.{i}." for i in range(blocks - layers, blocks))
    return [name for name in encoder.model.state_dict() if name.startswith(prefixes)]


def top_layers(encoder: TextEncoder, layers: int) -> dict[str, torch.Tensor]:
    """A copy of the top ``layers`` layers' weights (float32, on the CPU)."""
    state = encoder.model.state_dict()
    return {
        name: state[name].detach().float().cpu().clone()
        for name in top_layer_names(encoder, layers)
    }


def load_top_layers(encoder: TextEncoder, weights: dict[str, torch.Tensor], layers: int) -> None:
    """Put ``weights`` into the encoder's top ``layers`` layers; refuses (ValueError) weights
    that are not exactly those layers' names and shapes, or are not finite."""
    state = encoder.model.state_dict()
    expected = top_layer_names(encoder, layers)
    if sorted(weights) != sorted(expected):
        raise ValueError(
            f"encoder weights: expected the top {layers} layers' {len(expected)} tensors, "
            f"got {len(weights)} ({sorted(set(weights) ^ set(expected))[:3]} differ)"
        )
    for name, value in weights.items():
        if tuple(value.shape) != tuple(state[name].shape):
            raise ValueError(f"encoder weights: {name} has shape {tuple(value.shape)}")
        if not torch.isfinite(value).all():
            raise ValueError(f"encoder weights: {name} is not finite")
    with torch.no_grad():
        for name, value in weights.items():
            state[name].copy_(value)


def tuned_checkpoint(base_model: str, weights: dict[str, torch.Tensor], layers: int) -> Path:
    """The checkpoint ``base_model`` with its top layers replaced by ``weights`` (a
    federation's aggregate), written once under the cache, keyed by the base and the weights:
    the server and every node build the same one from the same weights. Asking for it marks
    it used (its mtime); the least recently used beyond :data:`FEDERATED_ENCODERS_KEPT` go,
    and a new one beyond :data:`FEDERATED_ENCODERS_MAX` recently used is refused (ValueError)."""
    base = resolve_model_path(base_model)
    key = hashlib.sha256(model_fingerprint(base).encode())
    for name in sorted(weights):
        key.update(name.encode())
        key.update(weights[name].float().contiguous().numpy().tobytes())
    target = federated_encoders_dir() / key.hexdigest()[:16]
    with _federated_encoders_lock():  # never between a pruning's choice and its removal
        if (target / "config.json").exists():
            os.utime(target)
            return target
    prune_federated_encoders()
    held = sum("." not in p.name for p in federated_encoders_dir().iterdir())
    if held >= FEDERATED_ENCODERS_MAX:
        raise ValueError(
            f"{held} federated encoders were used here in the last "
            f"{FEDERATED_ENCODER_IDLE_S // 60} minutes (at most {FEDERATED_ENCODERS_MAX}): "
            "another is refused until older ones fall idle"
        )
    encoder = TextEncoder(str(base))
    load_top_layers(encoder, weights, layers)
    _save_checkpoint(
        encoder, target, {"base_model": base_model, "layers": layers, "federated": True}
    )
    with _federated_encoders_lock():
        os.utime(target)  # this process's, or another's that finished first
    prune_federated_encoders()
    return target


def federated_encoders_dir() -> Path:
    """Where the checkpoints a federation's tuned layers make are cached."""
    return cache_dir() / "federated-encoders"


@contextmanager
def _federated_encoders_lock() -> Iterator[None]:
    """An exclusive ``flock`` shared by every process using the cache: a checkpoint is marked
    used, or chosen and moved aside for removal, by one process at a time."""
    directory = federated_encoders_dir()
    directory.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


def prune_federated_encoders(
    keep: int = FEDERATED_ENCODERS_KEPT, idle_s: float = FEDERATED_ENCODER_IDLE_S
) -> list[str]:
    """Remove the federated-encoder checkpoints beyond the ``keep`` most recently used that
    no process used for ``idle_s`` seconds, with their catalog embeddings, and what a killed
    process left half written as long ago; returns the names removed. A checkpoint in use is
    never removed: it was asked for (marked used) moments ago."""
    directory = federated_encoders_dir()
    now = time.time()
    removed = []
    with _federated_encoders_lock():
        last_used = {}
        for path in directory.iterdir():
            with suppress(FileNotFoundError):  # a staging dir another process just moved
                if path.is_dir():
                    last_used[path] = path.stat().st_mtime
        entries = sorted(last_used, key=last_used.__getitem__, reverse=True)
        complete = [p for p in entries if "." not in p.name]  # staging dirs have a suffix
        surplus = complete[keep:] + [p for p in entries if "." in p.name]
        for path in surplus:
            if now - last_used[path] > idle_s:
                aside = path.with_name(f"{path.name}.{os.getpid()}.removing")
                # another process's aside, which it removes outside the lock, may be gone
                with suppress(FileNotFoundError):
                    path.rename(aside)  # gone for everyone at once: rebuilt if asked for again
                    removed.append(aside)
    for aside in removed:
        if (aside / "config.json").exists():
            EmbeddingCache().forget(model_fingerprint(aside))
        shutil.rmtree(aside, ignore_errors=True)
    return [aside.name.split(".")[0] for aside in removed]


def _save_checkpoint(encoder: TextEncoder, target: Path, report: dict) -> None:
    """Write the encoder and ``report`` (finetune.json) to ``target``, complete or not at all."""
    staging = target.with_name(f"{target.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    encoder.model.save_pretrained(staging)
    encoder.tokenizer.save_pretrained(staging)
    (staging / "finetune.json").write_text(json.dumps(report, indent=2) + "\n")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(staging, target)  # complete or absent: a killed run leaves only a .partial
    except OSError:  # another process finished the same checkpoint first: keep theirs
        shutil.rmtree(staging, ignore_errors=True)


def finetune_encoder(
    items: pd.DataFrame,
    histories: list[np.ndarray],
    base_model: str,
    layers: int,
    steps: int,
    seed: int = 0,
    device: str = "cpu",
    show_progress: bool = True,
) -> Path:
    """Fine-tune the top ``layers`` layers of ``base_model`` and return the tuned checkpoint's
    directory (reused from the cache when the same run was done before)."""
    base = resolve_model_path(base_model)
    pairs = consecutive_pairs(histories)
    if not len(pairs):
        raise ValueError("text fine-tuning needs customers with at least two distinct products")
    texts = item_texts(items)
    key = hashlib.sha256()
    for part in (
        model_fingerprint(base),
        layers,
        steps,
        seed,
        BATCH_PAIRS,
        LEARNING_RATE,
        TEMPERATURE,
        "frozen-prefix",  # lower layers without dropout (FrozenPrefix)
    ):
        key.update(str(part).encode())
    key.update(pairs.tobytes())
    key.update("\n".join(texts).encode())
    target = cache_dir() / "finetuned" / key.hexdigest()[:16]
    if (target / "config.json").exists():
        return target

    encoder = TextEncoder(str(base), device=device)
    blocks = encoder.model.encoder.layer
    if not 1 <= layers <= len(blocks):
        raise ValueError(
            f"text_finetune_layers must be between 1 and {len(blocks)} for {base}, got {layers}"
        )
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    started = time.time()
    batches = [pairs[rng.integers(0, len(pairs), BATCH_PAIRS)] for _ in range(steps)]
    prefix = FrozenPrefix(encoder, texts, np.concatenate(batches).ravel(), layers, show_progress)
    prefix_s = time.time() - started
    losses = train_top_layers(prefix, batches, show_progress)

    report = {
        "base_model": str(base),
        "layers": layers,
        "steps": steps,
        "pairs": len(pairs),
        "seconds": round(time.time() - started, 1),
        "frozen_layers_seconds": round(prefix_s, 1),
        "stored_products": len(prefix.states),
        "seconds_per_step": round((time.time() - started - prefix_s) / max(steps, 1), 3),
        "loss_first_50": float(np.mean(losses[:50])),
        "loss_last_50": float(np.mean(losses[-50:])),
    }
    _save_checkpoint(encoder, target, report)
    return target
