"""Canary customers for the one-run empirical privacy audit (Steinke, Nasr, Jagielski, NeurIPS
2023, "Privacy Auditing with One (1) Training Run"); the bound itself is
:mod:`server.privacy.canary_audit`.

Design: a canary is a synthetic customer who bought ``length`` products drawn uniformly at
random, without replacement, from the catalog of a node chosen at random (the whole catalog for
regional partitions, the node's own products for merchant ones). Each canary is inserted into
its node's data or not by an independent fair coin; the node, and so the catalog, is drawn for
every canary before and independently of its coin, so included and excluded canaries are
identically distributed and only training can tell them apart.

Consequences: random sequences are far from anything real customers do, so a model that
memorises one assigns it a likelihood it could not get from the population, and the score needs
no shadow models. This makes the auditor's job easier than it would be for a natural customer
(who resembles many others): the bound measures what the training leaks about the
easiest-to-detect kind of customer this attack can build, and it is still only a lower bound on
epsilon, never an estimate of it. A canary goes through the node's pipeline like anyone else:
its last event is a local holdout (and the second-to-last too unless the run refits), so those
positions carry little membership signal.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from server.privacy.canary_audit import epsilon_lower_bound, write_canaries
from shared.recommender.model import FusionRecommender
from shared.recommender.training import training_tensors, trim

PREFIX = "canary-"
DEFINITIONS = "canaries.json"  # in the partitions directory: the auditor's secret
START = 1_672_531_200  # 2023-01-01T00:00:00Z; a canary buys one product a day from then on
SCORE = (
    "log-likelihood of the canary's sequence under the final global model (sum over its "
    "positions of log-softmax of the next item over the full catalog)"
)
SCORE_REFERENCE = SCORE + ", minus the same under the untrained model (the text-only baseline)"


@dataclass
class Canaries:
    """M canary customers: their histories (item indices), coins and nodes."""

    histories: list[np.ndarray]
    included: np.ndarray  # 1 = inserted into training (fair coin), 0 = held out
    node: np.ndarray  # the node each canary is (or, held out, would have been) inserted into
    user_ids: list[str]

    def save(self, path: Path) -> None:
        """Write the definitions as JSON (atomically)."""
        data = {
            "note": "the auditor's secret: the canaries and their coins; it must not reach the "
            "nodes or the server before training ends",
            "user_ids": self.user_ids,
            "included": [int(i) for i in self.included],
            "node": [int(n) for n in self.node],
            "histories": [[int(i) for i in h] for h in self.histories],
        }
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(data) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Canaries:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(
            [np.asarray(h, dtype=np.int64) for h in data["histories"]],
            np.asarray(data["included"], dtype=np.int64),
            np.asarray(data["node"], dtype=np.int64),
            list(data["user_ids"]),
        )


def make_canaries(
    items: pd.DataFrame,
    num_canaries: int,
    length: int = 12,
    seed: int = 0,
    catalogs: list[np.ndarray | None] | None = None,
) -> Canaries:
    """``num_canaries`` random customers of ``length`` products each, over the nodes whose
    catalogs (item indices; None = every item) are given (default: one node, every item)."""
    if num_canaries < 1 or length < 2:
        raise ValueError(
            f"need at least 1 canary of 2 or more events, got {num_canaries} of {length}"
        )
    catalogs = catalogs if catalogs is not None else [None]
    pools = [
        np.arange(len(items)) if c is None else np.asarray(c, dtype=np.int64) for c in catalogs
    ]
    usable = np.flatnonzero([len(p) > 0 for p in pools])  # a merchant may sell nothing
    if not len(usable):
        raise ValueError("no node has products to build canaries from")
    rng = np.random.default_rng([seed, 0xCA7A])  # a stream of its own, apart from the partition
    included = rng.integers(0, 2, num_canaries)
    node = rng.choice(usable, num_canaries)
    histories = [rng.choice(pools[n], length, replace=len(pools[n]) < length) for n in node]
    width = len(str(num_canaries - 1))
    return Canaries(
        histories, included, node, [f"{PREFIX}{i:0{width}d}" for i in range(num_canaries)]
    )


def insert_canaries(partitions_dir: Path, canaries: Canaries, items: pd.DataFrame) -> None:
    """Append the included canaries' purchases to their nodes' ``interactions.csv.gz`` and save
    the definitions to ``partitions_dir/canaries.json`` (the auditor's secret)."""
    item_ids = items["item_id"].astype(str).to_numpy()
    chosen = np.flatnonzero(canaries.included == 1)
    for node in np.unique(canaries.node[chosen]):
        path = Path(partitions_dir) / f"node-{node}" / "interactions.csv.gz"
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        mine = [c for c in chosen if canaries.node[c] == node]
        clash = set(frame["user_id"]) & {canaries.user_ids[c] for c in mine}
        if clash:
            raise ValueError(
                f"{path}: already has customer(s) {sorted(clash)[:3]}: canaries "
                "inserted twice, or real ids that collide with theirs"
            )
        events = pd.DataFrame(
            {
                "user_id": np.repeat(
                    [canaries.user_ids[c] for c in mine], [len(canaries.histories[c]) for c in mine]
                ),
                "item_id": item_ids[np.concatenate([canaries.histories[c] for c in mine])],
                "timestamp": np.concatenate(
                    [START + 86_400 * np.arange(len(canaries.histories[c])) for c in mine]
                ).astype(str),
            }
        )
        events = events.reindex(columns=frame.columns, fill_value="")
        if "event" in events:
            events["event"] = "purchase"
        tmp = path.with_name(path.name + ".tmp")
        pd.concat([frame, events], ignore_index=True).to_csv(tmp, index=False, compression="gzip")
        os.replace(tmp, path)
    canaries.save(Path(partitions_dir) / DEFINITIONS)


def load_canaries(partitions_dir: Path) -> Canaries:
    """The canaries :func:`insert_canaries` put into ``partitions_dir`` (to resume a run)."""
    path = Path(partitions_dir) / DEFINITIONS
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: these partitions hold no canaries (written by a run "
            "without them?); use another output directory"
        )
    return Canaries.load(path)


@torch.no_grad()
def log_likelihoods(
    model: FusionRecommender, histories: list[np.ndarray], batch_size: int = 256
) -> np.ndarray:
    """Each history's log-likelihood: sum over positions of log p(next item | prefix), full
    catalog softmax, in eval mode (the last ``model.config.max_len`` positions, as in training)."""
    training = model.training
    model.eval()
    inputs, targets = training_tensors(histories, model.config.max_len)
    if len(inputs) != len(histories):
        raise ValueError("every history needs at least 2 items")
    device = model.text.device
    out = []
    for start in range(0, len(inputs), batch_size):
        x, y = trim(inputs[start : start + batch_size], targets[start : start + batch_size])
        x, y = x.to(device), y.to(device)
        logp = torch.log_softmax(model.scores(model.encode(x)), dim=-1)
        picked = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out.append((picked * (y >= 0)).sum(1).double().cpu())
    model.train(training)
    return torch.cat(out).numpy()


def canary_scores(
    model: FusionRecommender, canaries: Canaries, reference: FusionRecommender | None = None
) -> np.ndarray:
    """Membership scores, higher = more likely trained on: the log-likelihood of each canary
    under ``model``, minus that under ``reference`` (e.g. the untrained model) if given."""
    scores = log_likelihoods(model, canaries.histories)
    if reference is not None:
        scores = scores - log_likelihoods(reference, canaries.histories)
    return scores


def audit_canaries(
    model: FusionRecommender,
    canaries: Canaries,
    out: Path,
    reference: FusionRecommender | None = None,
    delta: float = 0.0,
) -> dict:
    """Score the canaries, write ``out/canaries.json`` for ``fedrec audit`` and return the
    95%-confidence epsilon lower bound at ``delta`` (use the run's delta)."""
    scores = canary_scores(model, canaries, reference)
    Path(out).mkdir(parents=True, exist_ok=True)
    write_canaries(
        Path(out) / "canaries.json",
        scores.tolist(),
        canaries.included.tolist(),
        SCORE if reference is None else SCORE_REFERENCE,
    )
    return epsilon_lower_bound(scores, canaries.included, delta=delta)
