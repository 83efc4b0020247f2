"""Optional fine-tuning of the text tower's top encoder layers on the training histories.

The frozen encoder already gives a strong start (the model is initialised as the text-only
baseline). Fine-tuning adapts its top ``text_finetune_layers`` transformer layers to the
catalog with a contrastive next-product objective: for consecutive products (a, b) in a
customer's training history, a's embedding should be closer to b's than to the other products
of the batch (in-batch negatives, symmetric InfoNCE). The tuned encoder then re-encodes the
whole catalog once, and the fusion model trains on those embeddings as usual.

Centralized runs only (``fedrec train``): in a federation the encoder would have to be trained
at the nodes and travel, and it is not trained under DP. The tuned checkpoint is cached under
the fedrec cache directory, keyed by the base model, the training pairs and the settings, so a
second run reuses it; its catalog embeddings go through the shared embedding cache like any
other checkpoint's. Costs: see docs/evaluation.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from shared.progress import progress_bar
from shared.text import TextEncoder, cache_dir, item_texts, model_fingerprint, resolve_model_path

BATCH_PAIRS = 32  # consecutive-product pairs per step (64 texts through the encoder)
LEARNING_RATE = 2e-5
TEMPERATURE = 0.05


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
    encoder.model.requires_grad_(False)
    trainable = [p for block in blocks[-layers:] for p in block.parameters()]
    for parameter in trainable:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    encoder.model.train()
    losses, started = [], time.time()
    for _ in progress_bar(range(steps), "fine-tuning the text encoder", disable=not show_progress):
        batch = pairs[rng.integers(0, len(pairs), BATCH_PAIRS)]
        anchors = encoder.embed([texts[i] for i in batch[:, 0]])
        positives = encoder.embed([texts[i] for i in batch[:, 1]])
        loss = contrastive_loss(anchors, positives, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    encoder.model.eval()

    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    encoder.model.save_pretrained(staging)
    encoder.tokenizer.save_pretrained(staging)
    report = {
        "base_model": str(base),
        "layers": layers,
        "steps": steps,
        "pairs": len(pairs),
        "seconds": round(time.time() - started, 1),
        "seconds_per_step": round((time.time() - started) / max(steps, 1), 3),
        "loss_first_50": float(np.mean(losses[:50])),
        "loss_last_50": float(np.mean(losses[-50:])),
    }
    (staging / "finetune.json").write_text(json.dumps(report, indent=2) + "\n")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(staging, target)  # complete or absent: a killed run leaves only a .partial
    except OSError:  # another process finished the same fine-tuning first: keep theirs
        shutil.rmtree(staging, ignore_errors=True)
    return target
