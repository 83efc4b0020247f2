"""Encoder rounds: the nodes tune the text encoder's top layers before the model's rounds.

With ``text-finetune-layers`` N > 0 a federation first runs ``text-finetune-rounds`` rounds in
which every sampled node trains the top N layers of the text encoder on its own histories
(client/encoder.py) and the server averages them, weighted by the customers each node trained
on, each node's change first bounded by ``row-clip`` like any update (what one node can move,
server/federation/aggregation.py). The server and every node then build the same checkpoint
from the averaged layers (shared/recommender/finetune.py:tuned_checkpoint) and embed the catalog
with it; the model's rounds carry the layers, so a node sampled in none of these rounds builds
it too. The layers are written to ``OUT/text-encoder.safetensors`` after every encoder round,
marked complete after the last: a run resumed after the last does not tune again, and one
resumed after round r goes on from round r + 1 with round r's layers (asking round 1 again
would ask the nodes for a round they already charged, which they refuse: client/accountant.py).
The file pins the ledger's last entry like the checkpoint: a run is not resumed from it when
the ledger no longer holds that entry (server/federation/resume.py:require_ledger).
Under ``dp`` each node's layers are already private (DP-SGD with a per-customer objective,
client/encoder.py) and recorded in the ledger as it replies, like its training releases;
averaging them is post-processing. Not under node-level DP (``check_settings`` refuses the
combination).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from server.federation.aggregation import aggregate, clip_updates
from server.privacy.ledger import ledger_head
from shared.recommender.finetune import top_layers
from shared.recommender.text import TextEncoder, resolve_model_path
from shared.runs.durable import atomic_write

if TYPE_CHECKING:
    from server.federation.exchange import Federation

log = logging.getLogger("fedrec.server")
ENCODER_ROUND = "train.encoder"  # the nodes' handler: client/client_app.py
ENCODER_FILE = "text-encoder.safetensors"


def tune_encoder(
    federation: Federation, out: Path, show_progress: bool = True
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Run (or read back, or resume) the encoder rounds; returns the averaged top layers and
    the rounds' history (nodes, loss, time, bytes). A round no node tuned in ends them (the
    nodes may all refuse: a policy that requires DP refuses a request without it)."""
    path = Path(out) / ENCODER_FILE
    config = federation.config
    history: list[dict] = []
    if path.exists():
        metadata, history = _read(path)
        weights = load_file(str(path))
        if metadata.get("complete", "true") == "true":
            return weights, history
    else:
        encoder = TextEncoder(str(resolve_model_path(config.text_model)))
        weights = top_layers(encoder, config.text_finetune_layers)
        del encoder
    for encoder_round in range(len(history) + 1, config.text_finetune_rounds + 1):
        started = time.time()
        result = federation.train(encoder_round, weights, message_type=ENCODER_ROUND)
        if not result.updates:  # the encoder stays as the rounds before left it
            why = "; ".join(result.rejected) or "refused, declined or lost"
            log.warning("encoder round %d: no node tuned the encoder (%s)", encoder_round, why)
            history.append({"round": encoder_round, "nodes": 0, "rejected": result.rejected})
            break
        clipped = clip_updates(weights, result.updates, config.row_clip)
        delta = aggregate(weights, result.updates, federation.strategy.method, config.trim_fraction)
        if all(torch.isfinite(value).all() for value in delta.values()):
            weights = {name: value + delta[name] for name, value in weights.items()}
        else:  # never applied, never saved: the encoder stays as the rounds before left it
            log.error("encoder round %d: the aggregate is not finite; not applied", encoder_round)
            result.rejected.append("aggregate: not finite, the round was not applied")
        history.append(
            {
                "round": encoder_round,
                "nodes": result.contributed,
                "rejected": result.rejected,
                "clipped": clipped,
                "loss": result.mean_metric("loss"),
                "round_s": round(time.time() - started, 1),
                "bytes_down_per_node": sum(4 * v.numel() for v in weights.values()),
                "bytes_up_per_node": result.mean_metric("bytes-up"),
            }
        )
        loss = history[-1]["loss"]  # None when no reply said (what a reply carries is its own)
        said = (
            "private: no loss leaves a node"
            if config.dp
            else f"contrastive loss {'?' if loss is None else f'{loss:.3f}'}"
        )
        line = (
            f"encoder round {encoder_round}/{config.text_finetune_rounds}: "
            f"{result.contributed} nodes, {said}, {history[-1]['round_s']:.1f} s"
        )
        if show_progress:  # on the terminal, or in the log when the terminal is quiet
            print(line, flush=True)
        else:
            log.info(line)
        _save(path, weights, history, ledger_head(federation.ledger.entries), complete=False)
    _save(path, weights, history, ledger_head(federation.ledger.entries), complete=True)
    return weights, history


def encoder_pin(out: Path) -> tuple[str, object] | None:
    """Which encoder rounds ``OUT/text-encoder.safetensors`` holds, said, and the ledger entry it
    pinned (:func:`~server.privacy.ledger.ledger_head`; what is not JSON as its text); None
    when there is no such file. ValueError, naming the file and what is wrong, when it is not
    the rounds' file (not safetensors, cut short, no rounds) or pins no ledger entry: every
    file the rounds write pins one, and without it the rounds' spending could be gone from
    the ledger unseen."""
    path = Path(out) / ENCODER_FILE
    if not path.exists():
        return None
    metadata, history = _read(path)
    pin: object = metadata.get("ledger")
    if isinstance(pin, str):
        with contextlib.suppress(ValueError):
            pin = json.loads(pin)
    if pin is None:
        raise ValueError(f"{path} pins no ledger entry (every encoder rounds' file does)")
    return f"{ENCODER_FILE} after encoder round {len(history)}", pin


def _read(path: Path) -> tuple[dict[str, str], list]:
    """The saved file's metadata (its rounds, whether complete, the ledger pin) and its rounds'
    history; ValueError naming the file when it is no encoder rounds' file."""
    try:
        with safe_open(str(path), framework="pt") as saved:
            metadata = saved.metadata() or {}
        history = json.loads(metadata["history"])
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not an encoder rounds' file: {error}") from None
    except KeyError:
        raise ValueError(f"{path} is not an encoder rounds' file: it holds no rounds") from None
    if not isinstance(history, list):
        raise ValueError(f"{path} is not an encoder rounds' file: its rounds are not a list")
    return metadata, history


def _save(
    path: Path,
    weights: dict[str, torch.Tensor],
    history: list[dict],
    ledger: dict,
    complete: bool,
) -> None:
    """Write the layers, the rounds so far and the ledger's last entry (``ledger``, written
    before them), atomically and durably (the old file or the new, also after a power cut: a
    resumed run reads it back)."""
    metadata = {
        "history": json.dumps(history),
        "complete": "true" if complete else "false",
        "ledger": json.dumps(ledger),
    }
    atomic_write(path, save(weights, metadata=metadata))
