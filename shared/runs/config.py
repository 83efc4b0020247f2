"""All run settings in one place.

:class:`RunConfig` is flat so that it maps one-to-one onto Flower's run config
(``[tool.flwr.app.config]`` in pyproject.toml, keys in kebab-case) and onto the CLI options;
a test checks that pyproject.toml carries exactly these defaults.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from shared.recommender.model import FUSIONS, VARIANTS, ModelConfig, architecture_problem
from shared.recommender.training import DP_TRAINABLE

# the largest budget a run may ask per customer (and per node under node-level DP): far above
# any guarantee worth the name; at 1,000 the PRV accountant's calibration ran for over 15
# minutes at every node without finishing (2026-12-05)
MAX_TARGET_EPSILON = 100.0
# the noise multipliers a node's release may have, checked by the node before it charges a
# release (client/policy.py), by the server on a run's settings and on every release
# (server/federation/release_bounds.py), and by the audit (server/privacy/accounting.py): where
# the accountants' arithmetic holds (at 1e-160 the RDP bound underflowed to a spend of 0, at
# 1e-200 it divided by zero, at 1e155 it overflowed). Below the lower end one release spends
# over 5 x 10^5 by RDP at any sample rate from 1e-8 (delta 1e-10), far beyond any budget
MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER = 1e-3, 1e6
# the largest Dirichlet concentration a skewed partition takes: already at 1e6 every node's
# share is equal to about 1e-3 (as good as no skew), and near 1e308 numpy's Dirichlet overflows
# to shares of 0 and its sampling fails
MAX_DIRICHLET_ALPHA = 1e6
DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")  # the devices a run may name
WIRE_DTYPES = ("float32", "float16")  # what the nodes' weights may travel as
# the names a setting may take, checked wherever a run's settings are read, a node reading the
# server's request included (a fusion it had no layers for failed the node deep in its round,
# a wire-dtype of int8 rounded its reply to whole numbers); strategy, partition and attack,
# which only the server and the simulations read, where they are read
CHOICES: dict[str, tuple[str, ...]] = {
    "reverse_histories": ("auto", "on", "off"),
    "fusion": FUSIONS,
    "variant": VARIANTS,
    "dp_train": tuple(DP_TRAINABLE),
    "dp_denoise": ("auto", "on", "off"),
    "regions": ("auto", "off"),
    "wire_dtype": WIRE_DTYPES,
}
# numpy's generators take no negative seed (one crashed the partition), and Flower's messages
# carry whole numbers as 64-bit signed integers
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Range:
    """The numbers a setting may take: ``low`` to ``high``, each end included unless
    ``open_low``/``open_high``, or exactly ``off`` (the value that turns it off); ``note``
    says what a value means or why the range is what it is."""

    low: float
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False
    off: float | None = None
    note: str = ""

    def holds(self, value: float) -> bool:
        """Whether ``value`` is in the range (NaN never is)."""
        if value == self.off:
            return True
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.high == math.inf:
            text = f"above {low}" if self.open_low else f"at least {low}"
        else:
            left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
            text = f"in {left}{low}, {high}{right}"
        return text if self.off is None else f"{_number(self.off)} (off) or {text}"


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


_FRACTION = Range(0.0, 1.0, open_high=True)
_COUNT = Range(1)  # a whole number of things: at least one
_POSITIVE = Range(0.0, open_low=True)
_EPSILON = Range(
    0.0,
    MAX_TARGET_EPSILON,
    open_low=True,
    note=f"beyond {MAX_TARGET_EPSILON:g} a guarantee means nothing and the accountant's "
    "calibration stops converging; for a run without DP, leave --dp out",
)
# every number setting's allowed values, checked by RunConfig wherever a run's settings are read
# (a command line, Flower's run config, a node reading the server's request); dim, max-len,
# layers and heads by ``architecture_problem``; the noise of private answers and node-level
# DP's settings where they are used (server/federation/settings.py, shared/federation/node_dp.py)
RANGES: dict[str, Range] = {
    "text_finetune_layers": Range(0, note="0: the encoder stays frozen"),
    "text_finetune_steps": _COUNT,
    "text_finetune_rounds": _COUNT,
    "dp_encoder_batch": _COUNT,
    "cold_items": _FRACTION,
    "fragment_nodes": Range(0, note="0: off"),
    "dropout": _FRACTION,  # at 1 every activation is dropped, above it torch fails
    "recency": Range(0.0, 1.0, note="the history weights are (1 - recency)^age"),
    "logit_scale": _POSITIVE,  # at 0 or below the text score says nothing, or the reverse
    "catalog_epochs": Range(1, off=0),
    "epochs": _COUNT,
    "epoch_steps": Range(0, note="0: one pass an epoch"),
    "batch_size": _COUNT,
    "lr": _POSITIVE,
    "weight_decay": Range(0.0),
    "patience": Range(0),
    "epoch_tolerance": Range(0.0, note="0: the best epoch on validation, however slight its lead"),
    "seed": Range(0, MAX_SEED),
    "target_epsilon": _EPSILON,
    "delta": Range(0.0, 1.0, open_high=True, note="0: each node's own"),
    "max_grad_norm": _POSITIVE,
    "dp_batch_size": _COUNT,
    "dp_lr": _POSITIVE,
    "dp_local_epochs": _COUNT,
    "dp_epochs": _COUNT,
    "dp_id_scale": _POSITIVE,
    "node_target_epsilon": _EPSILON,
    "clients": _COUNT,
    "rounds": _COUNT,
    "round_patience": Range(0),
    "valid_customers": Range(0, note="0: the rounds are fixed"),
    "dp_rounds": _COUNT,
    "local_epochs": _COUNT,
    "local_steps": Range(0),
    "max_local_epochs": _COUNT,
    "local_batch_size": _COUNT,
    "dirichlet_alpha": Range(
        0.0,
        MAX_DIRICHLET_ALPHA,
        open_low=True,
        off=0.0,
        note="at 1e6 every share is already equal; near 1e308 numpy's Dirichlet fails",
    ),
    "server_lr": _POSITIVE,  # at 0 the model never moves, below it moves away from the nodes
    "proximal_mu": Range(0.0),  # below 0 it pushes each node away from the global model
    # at 0.5 or more the trimmed mean keeps no node: every aggregate would be zero
    "trim_fraction": Range(0.0, 0.5, open_high=True),
    # a multiple of the round's median movement: below 1 the median node itself is cut
    "row_clip": Range(1.0, off=0.0),
    "shift_clip": Range(1.0, off=0.0),  # likewise a multiple of the round's median node
    # above 1 (or min-nodes above clients) Flower waits forever for nodes that do not exist
    "fraction_train": Range(0.0, 1.0, open_low=True),
    "min_nodes": _COUNT,
    "canaries": Range(0),
    "round_timeout": Range(0.0, note="0: no limit"),
}


def positive(kind: type) -> Callable[[str], int | float]:
    """An argparse type: ``kind`` of the text, refused unless a finite number above 0 (NaN
    passed a ``<= 0`` test)."""

    def parse(text: str) -> int | float:
        value = kind(text)
        if not 0 < value < math.inf:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


@dataclass
class RunConfig:
    """Model, training, privacy and federation settings of one run."""

    # where: the dataset ("" = the embedded synthetic marketplace) and the run's outputs
    data: str = ""
    catalog: str = ""  # a deployment's server: the public catalog only (the nodes hold the data)
    registry: str = ""  # a deployment's node registry: Flower node id -> name, catalog, customers
    out: str = "runs/flwr-default"
    # model (see shared.recommender.model.ModelConfig)
    text_model: str = "minilm"
    text_finetune_layers: int = 0  # >0: first fine-tune the encoder's top N layers
    text_finetune_steps: int = 2000  # in a federation: over all rounds and nodes together
    text_finetune_rounds: int = 3  # a federation's encoder rounds, before the model's
    dp_encoder_batch: int = 256  # under DP: expected customers a private encoder step
    cold_items: float = 0.0  # a fraction of products held out of all training (new products)
    fragment_nodes: int = 0  # >0 (train only): histories cut as N merchant nodes hold them
    reverse_histories: str = "auto"  # also learn histories backwards: auto (short ones), on, off
    dim: int = ModelConfig.dim
    max_len: int = ModelConfig.max_len
    layers: int = ModelConfig.layers
    heads: int = ModelConfig.heads
    dropout: float = ModelConfig.dropout
    fusion: str = ModelConfig.fusion
    variant: str = ModelConfig.variant
    recency: float = ModelConfig.recency
    logit_scale: float = ModelConfig.logit_scale
    new_item_boost: float = ModelConfig.new_item_boost
    catalog_epochs: int = 3  # the public start's passes over same-brand product pairs (0: off)
    # training
    epochs: int = 10
    epoch_steps: int = 50  # an epoch: as many passes as reach these steps (0: one pass)
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.0
    patience: int = 2
    # the earliest epoch within this many standard errors of the best one on validation is
    # kept (a tie on validation goes to the less-fitted model; docs/evaluation.md)
    epoch_tolerance: float = 1.0
    refit: bool = True  # the final model also trains on the validation targets (see docs)
    # without DP: validation may add w x log(1 + training count) to the item scores
    popularity_prior: bool = True
    seed: int = 0
    device: str = "auto"
    # differential privacy (one sample = one customer's history at a node)
    dp: bool = False
    target_epsilon: float = 8.0
    delta: float = 0.0  # 0 = each node's own: 1 / (10 * its declared customers)
    max_grad_norm: float = 1.0
    dp_batch_size: int = 512  # expected Poisson batch (customers per step)
    dp_lr: float = 2.0  # plain SGD on the mean clipped gradient
    dp_train: str = "text"  # what learns under DP: text (projection + biases), bias, id, all
    dp_local_epochs: int = 3  # epochs a node trains per round under DP (local-epochs: without)
    dp_epochs: int = 3  # `fedrec train --dp`: exactly these passes over all customers
    dp_max_len: int = 20
    dp_dim: int = 384  # under DP the text projection keeps every pretrained dimension
    dp_id_scale: float = 10.0  # under DP, the item biases' scale: how far a private step moves them
    dp_denoise: str = "auto"  # the server denoises private rounds: auto (small budgets), on, off
    eval_noise_multiplier: float = 10.0  # a node's private evaluation: noise std per customer
    dp_guard: bool = True  # after the private rounds the nodes privately compare the model with
    # its public start, and the start is shipped where it ranks better (server/federation/guard.py)
    # the comparison's noise std on a node's sum (sensitivity 1), per sqrt(declared customers)
    dp_guard_noise_scale: float = 0.4
    # node-level DP (one sample = one node's whole update) and secure aggregation, docs/privacy.md
    node_dp: bool = False
    node_clip_norm: float = 1.0  # L2 bound on each node's update (delta from the global model)
    node_target_epsilon: float = 8.0  # node-level budget; the noise is calibrated for dp-rounds
    node_delta: float = 1e-5
    secagg: bool = False  # Flower SecAgg+: the server sees only the sum (needs node_dp)
    # federation
    clients: int = 5
    rounds: int = 10  # at most; without DP the run stops once validation stops improving
    round_patience: int = 2  # rounds without a better validation NDCG@10 before it stops
    valid_customers: int = 2000  # whose validation event chooses the rounds (all when fewer)
    dp_rounds: int = 6  # under DP exactly these (the noise is calibrated for them)
    local_epochs: int = 1
    local_steps: int = 20  # at least; a small node trains more epochs a round to reach them
    max_local_epochs: int = 3  # ... but at most this many (local-epochs, if larger, rules)
    local_batch_size: int = 32  # smaller steps at the nodes: more progress per round
    partition: str = "regional"
    dirichlet_alpha: float = 0.0  # 0: by region (regions), else IID; >0: skewed by category
    regions: str = "auto"  # regional: auto = by the data's region column when it has one; off
    strategy: str = "fedavg"
    server_lr: float = 1.0
    proximal_mu: float = 0.0
    trim_fraction: float = 0.2
    row_clip: float = 1.5  # no node moves an item row or a weight, or weighs, > this x the median
    shift_clip: float = 0.0  # opt-in: no node shifts its item rows together > this x the median
    fraction_train: float = 1.0
    min_nodes: int = 1
    wire_dtype: str = "float32"  # float16 halves what travels
    canaries: int = 0  # empirical privacy audit: random canary customers (simulation only)
    federated_eval: bool = False  # the nodes evaluate each round (private under DP); deploy: on
    round_timeout: float = 0.0  # seconds a round waits for replies; 0 = until each arrives or
    # Flower reports its node unavailable (about a minute after the node stops responding)
    # robustness measurement (simulation only): these nodes' replies are replaced by attacks
    malicious_nodes: int = 0
    attack: str = "none"  # none, scale, sign-flip or random (simulations/attacks.py)
    attack_scale: float = 10.0  # the attack's factor on the node's own update

    def __post_init__(self) -> None:
        if problem := self.value_problem():
            raise ValueError(problem)
        if self.min_nodes > self.clients:
            raise ValueError(
                f"min-nodes must be at most clients ({self.clients}), got {self.min_nodes}: a "
                "round waits until that many nodes are connected"
            )
        for prefix, dim, max_len in (
            ("", self.dim, self.max_len),
            ("dp-", self.dp_dim, self.dp_max_len),
        ):
            if problem := architecture_problem(dim, self.layers, self.heads, max_len, prefix):
                raise ValueError(problem)
        if not DEVICE.fullmatch(self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.reverse_histories == "on" and (self.dp or self.node_dp):
            raise ValueError(
                "reverse-histories=on makes each customer two training sequences, which DP "
                "accounts as one sample (one customer): set it to auto (off under DP) or off"
            )

    def value_problem(self) -> str | None:
        """Why a setting's value, on its own, is not one it may take (NaN or an infinity,
        outside its :data:`RANGES`, not among its :data:`CHOICES`), naming the setting, the
        value and what it may be; None when every value is."""
        for setting in fields(self):  # no setting means anything at NaN or infinity
            value = getattr(self, setting.name)
            if isinstance(value, float) and not math.isfinite(value):
                return f"{kebab(setting.name)} must be a finite number, got {value:g}"
        for name, allowed in RANGES.items():
            if not allowed.holds(value := getattr(self, name)):
                note = f" ({allowed.note})" if allowed.note else ""
                shown = f"{value:g}" if isinstance(value, float) else repr(value)
                return f"{kebab(name)} must be {allowed}{note}, got {shown}"
        for name, names in CHOICES.items():
            if (value := getattr(self, name)) not in names:
                allowed = " or ".join([", ".join(names[:-1]), names[-1]])
                return f"{kebab(name)} must be {allowed}, got {value!r}"
        return None

    def model_config(self, num_items: int, text_dim: int) -> ModelConfig:
        """The architecture of this run's model: under ``dp`` its width, history length and
        ID scale are ``dp-dim``, ``dp-max-len`` and ``dp-id-scale``."""
        names = {f.name for f in fields(ModelConfig)}
        values = {k: v for k, v in asdict(self).items() if k in names}
        if self.dp:
            values["max_len"], values["dim"] = self.dp_max_len, self.dp_dim
            values["id_scale"] = self.dp_id_scale
        return ModelConfig(num_items=num_items, text_dim=text_dim, **values)

    @property
    def private(self) -> bool:
        """Whether the run is differentially private (record-level or node-level DP)."""
        return self.dp or self.node_dp

    @property
    def guards_start(self) -> bool:
        """Whether the nodes compare the private rounds' model with its public start
        (``dp-guard``: customer-level DP only; node-level DP accounts nodes, not customers)."""
        return self.dp and self.dp_guard and not self.node_dp

    def guard_noise(self, customers: float) -> float:
        """The start guard's noise std on the summed answer of a node of ``customers``
        declared customers: ``dp-guard-noise-scale`` x sqrt(customers), so that the
        federation's summed answer has a std of the scale x sqrt(all customers) however they
        are split among nodes, and resolves a mean change of NDCG@10 of scale / sqrt(all)."""
        return self.dp_guard_noise_scale * math.sqrt(max(customers, 1))

    def gaussian_releases(self, customers: int) -> tuple[tuple[float, int], ...]:
        """The Gaussian releases of sensitivity 1 the private plan of a node of ``customers``
        declared customers holds besides its DP-SGD steps, as (noise multiplier, count): one
        evaluation a round when the nodes evaluate (``federated-eval``), and the start
        guard's one comparison (``dp-guard``, :meth:`guard_noise`)."""
        releases = []
        if self.federated_eval:
            releases.append((self.eval_noise_multiplier, self.dp_rounds))
        if self.guards_start:
            releases.append((self.guard_noise(customers), 1))
        return tuple(releases)

    def customer_delta(self, customers: int) -> float:
        """A node's delta for ``customers`` declared customers, unless its own policy asks a
        smaller one (client/policy.py): ``1 / (10 x customers)``, or ``delta`` if smaller."""
        return min([1.0 / (10 * max(customers, 1))] + ([self.delta] if self.delta else []))

    @property
    def max_rounds(self) -> int:
        """The rounds a federation runs: exactly ``dp-rounds`` under DP, at most ``rounds``
        otherwise (validation may stop it earlier)."""
        return self.dp_rounds if self.private else self.rounds

    @property
    def selects_rounds(self) -> bool:
        """Whether validation chooses the rounds (never under DP: choosing on private data
        would spend budget nobody accounted)."""
        return not self.private and self.valid_customers > 0

    @property
    def counts_popularity(self) -> bool:
        """Whether a federation's nodes send the item counts of their training histories and
        its server adds the popularity prior they give (``popularity-prior``): never under DP
        (the counts would be private and unaccounted), and only where the server validates the
        rounds (a simulation; a deployment's validation is the nodes')."""
        return self.popularity_prior and self.selects_rounds and not self.catalog

    def with_rounds(self, rounds: int | None) -> RunConfig:
        """The command lines' ``--rounds``: ``dp-rounds`` of a private run, else ``rounds``
        (None: unchanged)."""
        if rounds is None:
            return self
        return replace(self, **{"dp_rounds" if self.private else "rounds": rounds})

    def with_epochs(self, epochs: int | None) -> RunConfig:
        """``fedrec train --epochs``: ``dp-epochs`` of a private run, else ``epochs`` (None:
        unchanged)."""
        if epochs is None:
            return self
        return replace(self, **{"dp_epochs" if self.dp else "epochs": epochs})

    def valid_fraction(self, customers: int) -> float:
        """The share of ``customers`` whose validation event stays out of training to choose
        the rounds: all without ``refit`` (none trains on it anyway), else enough for
        ``valid-customers``; 0 when the rounds are fixed."""
        if not self.selects_rounds:
            return 0.0
        if not self.refit:
            return 1.0
        return min(1.0, self.valid_customers / max(customers, 1))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> RunConfig:
        """Build from kebab- or snake-case keys (Flower run config, JSON); unknown keys fail."""
        known = {f.name: f for f in fields(cls)}
        kwargs = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ValueError(f"unknown setting {key!r}; known: {sorted(known)}")
            kwargs[name] = _coerce(value, type(getattr(cls, name)), key)
        return cls(**kwargs)


def kebab(name: str) -> str:
    """A setting's name as the command line and Flower's run config spell it."""
    return name.replace("_", "-")


def _coerce(value: Any, kind: type, key: str) -> Any:
    """``value`` as the setting ``key``'s ``kind``: text as the command line and TOML give it,
    or a value of that kind (a whole number for an ``int``, any number for a ``float``, a
    boolean or 0/1 for a ``bool``); anything else (a list, a fraction for a whole number, a
    number for a name) is refused with the setting's name, never silently converted."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower() if isinstance(value, str) or value in (0, 1) else None
        if text not in ("true", "false", "1", "0"):
            raise ValueError(f"setting {key!r} expects true/false, got {value!r}")
        return text in ("true", "1")
    try:
        if kind is str:
            if not isinstance(value, str):
                raise TypeError
            return value
        if not (number or isinstance(value, str)):
            raise TypeError
        if kind is int:
            if isinstance(value, str):
                return int(value)
            if value != int(value):  # a fraction is not a whole number (16.9 is not 16)
                raise ValueError
            return int(value)
        return float(value)
    except (TypeError, ValueError, OverflowError):  # int(inf) overflows
        raise ValueError(f"setting {key!r} expects {kind.__name__}, got {value!r}") from None


def resolve_device(device: str) -> str:
    """``auto`` means CUDA when present, else CPU; a CUDA device this machine does not have is
    refused (ValueError) before anything runs on it."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        index, count = int(device.partition(":")[2] or 0), torch.cuda.device_count()
        if index >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s)")
    return device
