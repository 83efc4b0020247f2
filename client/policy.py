"""A node's own privacy policy: set by the node's operator when its SuperNode starts, never by
the server.

Read from Flower's node config (``flower-supernode --node-config "require-dp=true
max-epsilon=4"``; in ``fedrec simulate`` and ``fedrec deploy local`` from ``--node-config``):

- ``require-dp`` (true/false): train only under customer-level DP-SGD. Default true for a
  deployed node (one started with a ``data-dir``), false in a simulation.
- ``max-epsilon``: the most this node's customers may ever be charged, over every federation on
  its data (its accountant persists). Default 8 for a deployed node, no cap in a simulation.
- ``max-delta``: the largest delta the node accepts. The node picks its own delta in any case:
  ``1 / (10 x declared customers)`` or smaller (see :meth:`NodePolicy.delta`).
- ``declared-customers``: the node's customer figure made public in place of its exact count
  (it sets the DP sample rate and delta and is sent as the node's weight), a whole number
  >= 1. Default: ``customers`` in the node's ``node.json``, else the exact count rounded down
  to two significant figures.
- ``min-exact-customers``: the fewest customers an exact (non-DP) evaluation figure may
  describe; a test or validation figure over fewer is left out of the node's answer, so that
  an operator cannot read one customer's hit by shrinking ``valid-fraction``. Default 50 for a
  deployed node, 0 in a simulation. A cheap guard, not a guarantee: shares that differ by one
  customer still give away that customer's hit by difference; only DP (``require-dp``) protects
  an evaluation.
- ``max-epochs``: the most passes over its data the node makes for one training request
  (``dp-local-epochs`` under DP, else the larger of ``local-epochs`` and ``max-local-epochs``,
  twice that unless ``reverse-histories`` is off: each history is then learnt both ways),
  so that no operator can make it compute without end. Default 10 for a deployed node, no cap
  in a simulation. (A private encoder round makes one expected pass: client/encoder.py.)
- ``max-rounds``: the most private rounds one request may plan at the node (``dp-rounds``,
  plus ``text-finetune-rounds`` when it tunes the encoder). The node calibrates its noise for
  the whole plan at once, and Opacus's PRV accountant needs memory that grows with the
  planned steps (10,000 rounds of Amazon Beauty's plan asked for a 54 GB array): without a
  bound an operator could crash a node with one setting. Default 20 for a deployed node, no
  cap in a simulation.
- ``max-steps``: the most DP-SGD steps one request may plan at the node, its whole plan
  (:func:`planned_steps`): a tiny ``dp-batch-size`` multiplies them within few rounds (a batch
  of 1 at a node of 2,236 customers plans 40,000 steps in Beauty's 6 rounds, and calibrating
  for 40,000 steps took 67 s and 4.3 GB). Default 10,000 for a deployed node (22 s, 1.4 GB), no
  cap in a simulation. It bounds a plain encoder round's steps too (client/encoder.py).
- ``max-model-weights``: the most weights the model a request asks for may hold
  (``ModelConfig.weight_count``: its dim, layers and the catalog's size), so that no setting
  can exhaust the node's memory. Default 500,000,000 (2 GB in float32; training holds about
  six times the weights: the server's, the model's, its gradient and its optimiser's) for a
  deployed node, no cap in a simulation.
- ``text-models``: the text models the node agrees to load, comma-separated, each exactly as a
  run's ``text-model`` names it (``minilm``, the packaged all-MiniLM-L6-v2, or a local checkpoint
  directory), so that no operator can make the node read a directory of its choosing or probe
  its filesystem: a request naming another is refused before anything is read from disk, with
  a reason that says nothing about the node's files. A tuned encoder the server sends layers
  for is built from the run's ``text-model``, which must be listed; the tuned checkpoint is the
  node's own. Default ``minilm`` only for a deployed node, any in a simulation.
- ``max-step-activations``: the most values the largest activations of one step may hold
  (:func:`step_activations`: the scores of the customers one step computes over every
  position and product, plus their attention), what sets a step's memory beside the weights
  (about 12 to 18 bytes a value, measured); the batch sizes, ``max-len`` and ``heads`` of a
  request set it, with the catalog's size and the node's public customer figure (an
  evaluation, which takes no training step, by the customers it ranks at once alone). Default
  500,000,000 (about 10 GB) for a deployed node, no cap in a simulation.
- ``max-answer-share``: the most of ``max-epsilon`` the node's private answers (evaluations
  and the start guard's comparisons, Gaussian releases composed exactly:
  :func:`releases_exceed`) may spend together over its lifetime (its accountant keeps them),
  in (0, 1): each is charged to the lifetime budget, so an operator who kept asking for
  evaluations could otherwise drain it until the node could no longer train. An answer past
  it, or a request whose planned answers alone pass it, is refused, nothing charged. Default
  0.25 for a deployed node (a default plan's six evaluations and one comparison spend about 1
  of the default 8), no cap in a simulation or without ``max-epsilon``.
- ``exclusive-customers`` (true/false): whether this node's customers are its own alone (a
  region: no customer of it has data at another node of any federation it joins) rather than
  customers who may also shop at other nodes (merchants). The node signs it into every release
  (``exclusive_customers``), and the federation's headline is the worst node's epsilon only
  when every node vouched true (docs/privacy.md, "The headline"). Default false for a deployed
  node (the safe side: a customer's spending at every node composes); a simulated node, whose
  data is the simulation's own split, takes it from its ``node.json``'s ``partition``
  (``regional``: true).

A request weaker than the policy is refused with a reason naming the policy
(:meth:`NodePolicy.refusal`); the server records it as a ``refused`` ledger entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from shared.federation.node_directory import round_down_2sf
from shared.recommender.metrics import RANK_BATCH
from shared.recommender.model import ModelConfig
from shared.recommender.text import DEFAULT_MODEL
from shared.recommender.training import PHYSICAL_BATCHES, steps_per_epoch
from shared.runs.config import MAX_NOISE_MULTIPLIER, MIN_NOISE_MULTIPLIER, RunConfig

DEPLOYED_MAX_EPSILON = 8.0
DEPLOYED_MIN_EXACT_CUSTOMERS = 50
DEPLOYED_MAX_EPOCHS = 10
DEPLOYED_MAX_ROUNDS = 20
DEPLOYED_MAX_STEPS = 10_000
# SecAgg+ shares: fedrec's server asks for one a sampled node (server/federation/secagg.py),
# so 200 covers twice the 100 nodes the docs promise; the work a setup asks grows with shares x
# threshold (100 / 50: 5 s on 2 cores, 1,000 / 500: over 5 minutes), done twice (the rehearsal)
DEPLOYED_MAX_SECAGG_SHARES = 200
# 500 M weights, 2 GB in float32: 37 times Amazon Beauty's default model (13.5 M), room for a
# catalog of a million products at dim 128 (256 M)
DEPLOYED_MAX_MODEL_WEIGHTS = 500_000_000
# 500 M values, about 10 GB at a step's measured 12 to 18 bytes a value: 16 times what Amazon
# Beauty's default private step holds (31 M: 128 customers x 20 positions x 12,101 products),
# room for a private step over a whole Beauty node at once (133 M) or a catalog of 190,000
# products at the default settings
DEPLOYED_MAX_STEP_ACTIVATIONS = 500_000_000
# the share of max-epsilon a deployed node's private answers may spend: a default plan's (6
# evaluations at noise 10 and the start guard's comparison) spends about 1 of the default 8
DEPLOYED_MAX_ANSWER_SHARE = 0.25
DEPLOYED_TEXT_MODELS = DEFAULT_MODEL  # the packaged MiniLM only: no path of the node's
# the clipping norms a node accepts: below the lower end DP-SGD's noise (sigma x the norm)
# reaches float32's denormals, which flush to zero on the node (some coordinates would leave
# with no noise at all); above the upper end one step is about one customer's unbounded say
CLIP_RANGE = (1e-3, 1e3)
POLICY_KEYS = (
    "require-dp",
    "max-epsilon",
    "max-delta",
    "declared-customers",
    "min-exact-customers",
    "max-epochs",
    "max-rounds",
    "max-steps",
    "max-secagg-shares",
    "max-model-weights",
    "text-models",
    "max-step-activations",
    "max-answer-share",
    "exclusive-customers",
)


class PolicyError(ValueError):
    """A node config whose policy cannot be read; names the key and the value."""


def _flag(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0"):
        raise PolicyError(f"node config {key}={value!r}: expected true or false")
    return text in ("true", "1")


def _positive(value: Any, key: str, upper: float = math.inf) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PolicyError(f"node config {key}={value!r}: expected a number") from None
    if not 0 < number < upper:
        bound = f" and below {upper:g}" if math.isfinite(upper) else ""
        raise PolicyError(f"node config {key}={value!r}: must be above 0{bound}")
    return number


def _count(value: Any, key: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PolicyError(f"node config {key}={value!r}: expected a whole number") from None
    if not (number >= 0 and number == int(number)):
        raise PolicyError(f"node config {key}={value!r}: expected a whole number >= 0")
    return int(number)


def _at_least_one(value: Any, key: str) -> int:
    count = _count(value, key)
    if count < 1:
        raise PolicyError(f"node config {key}={value!r}: expected a whole number >= 1")
    return count


def _names(value: Any, key: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in str(value).split(",") if name.strip())
    if not names:
        raise PolicyError(f"node config {key}={value!r}: expected names or paths, comma-separated")
    return names


@dataclass(frozen=True)
class NodePolicy:
    """What a node accepts; ``None`` means no limit of that kind."""

    require_dp: bool = False
    max_epsilon: float | None = None
    max_delta: float | None = None
    declared_customers: int | None = None
    min_exact_customers: int = 0
    max_epochs: int | None = None
    max_rounds: int | None = None
    max_steps: int | None = None
    max_secagg_shares: int | None = None
    max_model_weights: int | None = None
    text_models: tuple[str, ...] | None = None
    max_step_activations: int | None = None
    max_answer_share: float | None = None
    exclusive_customers: bool | None = None  # None: a simulated node's split decides
    # started with a ``data-dir``: a deployment's node, which sends no item counts whatever a
    # request's settings say (client/node.py; only a simulation's server adds the prior)
    deployed: bool = False

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any]) -> NodePolicy:
        """The policy in a node config; a deployed node (``data-dir`` set) defaults to
        ``require-dp=true max-epsilon=8 min-exact-customers=50 max-epochs=10 max-rounds=20
        max-steps=10000 max-secagg-shares=200 max-model-weights=500000000
        max-step-activations=500000000
        text-models=minilm max-answer-share=0.25 exclusive-customers=false``."""
        deployed = "data-dir" in node_config
        require = node_config.get("require-dp", deployed)
        max_epsilon = node_config.get("max-epsilon", DEPLOYED_MAX_EPSILON if deployed else None)
        max_delta = node_config.get("max-delta")
        declared = node_config.get("declared-customers")
        minimum = node_config.get(
            "min-exact-customers", DEPLOYED_MIN_EXACT_CUSTOMERS if deployed else 0
        )
        max_epochs = node_config.get("max-epochs", DEPLOYED_MAX_EPOCHS if deployed else None)
        max_rounds = node_config.get("max-rounds", DEPLOYED_MAX_ROUNDS if deployed else None)
        max_steps = node_config.get("max-steps", DEPLOYED_MAX_STEPS if deployed else None)
        max_shares = node_config.get(
            "max-secagg-shares", DEPLOYED_MAX_SECAGG_SHARES if deployed else None
        )
        max_weights = node_config.get(
            "max-model-weights", DEPLOYED_MAX_MODEL_WEIGHTS if deployed else None
        )
        text_models = node_config.get("text-models", DEPLOYED_TEXT_MODELS if deployed else None)
        max_activations = node_config.get(
            "max-step-activations", DEPLOYED_MAX_STEP_ACTIVATIONS if deployed else None
        )
        share = node_config.get("max-answer-share", DEPLOYED_MAX_ANSWER_SHARE if deployed else None)
        exclusive = node_config.get("exclusive-customers", False if deployed else None)
        return cls(
            require_dp=_flag(require, "require-dp"),
            max_epsilon=None if max_epsilon is None else _positive(max_epsilon, "max-epsilon"),
            max_delta=None if max_delta is None else _positive(max_delta, "max-delta", 1.0),
            declared_customers=None
            if declared is None
            else _at_least_one(declared, "declared-customers"),
            min_exact_customers=_count(minimum, "min-exact-customers"),
            max_epochs=None if max_epochs is None else _at_least_one(max_epochs, "max-epochs"),
            max_rounds=None if max_rounds is None else _at_least_one(max_rounds, "max-rounds"),
            max_steps=None if max_steps is None else _at_least_one(max_steps, "max-steps"),
            max_secagg_shares=None
            if max_shares is None
            else _at_least_one(max_shares, "max-secagg-shares"),
            max_model_weights=None
            if max_weights is None
            else _at_least_one(max_weights, "max-model-weights"),
            text_models=None if text_models is None else _names(text_models, "text-models"),
            max_step_activations=None
            if max_activations is None
            else _at_least_one(max_activations, "max-step-activations"),
            max_answer_share=None if share is None else _positive(share, "max-answer-share", 1.0),
            exclusive_customers=None
            if exclusive is None
            else _flag(exclusive, "exclusive-customers"),
            deployed=deployed,
        )

    def secagg_refusal(self, share_num: int, threshold: int) -> str | None:
        """Why this node refuses a SecAgg+ setup asking for ``share_num`` shares of its
        secrets at reconstruction ``threshold`` (None: it accepts)."""
        if self.max_secagg_shares is not None and max(share_num, threshold) > (
            self.max_secagg_shares
        ):
            return (
                f"the SecAgg+ setup asks for {share_num} shares at threshold {threshold}, "
                f"above this node's max-secagg-shares={self.max_secagg_shares}"
            )
        return None

    def refusal(self, request: RunConfig, customers: int, training: bool = True) -> str | None:
        """Why this node, of ``customers`` (its public figure), refuses to train (or,
        ``training`` false, to evaluate) for ``request`` (None: it accepts); ``max-epochs``
        bounds training only, an evaluation makes one pass."""
        if self.require_dp and not request.dp:
            return (
                "this node's policy requires customer-level DP (require-dp=true); the request "
                "has dp=false"
            )
        epochs = (
            request.dp_local_epochs
            if request.dp
            else max(request.local_epochs, request.max_local_epochs)
            * sequences_per_history(request)
        )
        if training and self.max_epochs is not None and epochs > self.max_epochs:
            return (
                f"the request asks for up to {epochs} passes over this node's data a round "
                "(a history learnt both ways counts twice), above this node's "
                f"max-epochs={self.max_epochs}"
            )
        if not request.dp:
            if training and request.local_batch_size < 1:  # no batch to step on (and 1 / 0)
                return f"the request's local-batch-size {request.local_batch_size} is not positive"
            return None
        # an answer's noise the server does not account (zero or negative noise would also
        # make it exact) would be charged here and then thrown away by the server
        answers = (  # (setting, its value, the noise multiplier it gives here)
            ("eval-noise-multiplier", request.eval_noise_multiplier, request.eval_noise_multiplier),
            ("dp-guard-noise-scale", request.dp_guard_noise_scale, request.guard_noise(customers)),
        )
        for name, setting, sigma in answers:
            if not MIN_NOISE_MULTIPLIER <= sigma <= MAX_NOISE_MULTIPLIER:
                return (
                    f"the request's {name} {setting:g} gives this node's private answer (of "
                    f"{customers} customers) noise multiplier {sigma:g}, outside "
                    f"[{MIN_NOISE_MULTIPLIER:g}, {MAX_NOISE_MULTIPLIER:g}]: the server "
                    "accounts no other"
                )
        low, high = CLIP_RANGE
        if not low <= request.max_grad_norm <= high:
            return (
                f"the request's max-grad-norm {request.max_grad_norm:g} is outside "
                f"[{low:g}, {high:g}] (below it DP-SGD's noise flushes to zero in float32)"
            )
        if not 0 < request.dp_lr < math.inf:
            return f"the request's dp-lr {request.dp_lr:g} is not a positive number"
        # answers too exact for the budget: no DP-SGD noise could then meet it
        budget, delta = self.budget(request), self.delta(request, customers)
        releases = request.gaussian_releases(customers)
        if releases_exceed(releases, budget, delta):
            answers = " and ".join(f"{count} at noise {sigma:g}" for sigma, count in releases)
            return (
                f"the request's private answers ({answers}: eval-noise-multiplier, "
                f"dp-guard-noise-scale) alone spend more than this node's budget (epsilon "
                f"{budget:g} at delta {delta:.3g})"
            )
        if reason := self.answers_refusal(releases, delta):  # the request's plan alone
            return reason
        # an empty expected batch has no sample rate to account (and would divide by zero)
        for name in ("dp_batch_size", "dp_encoder_batch"):
            if (batch := getattr(request, name)) < 1:
                return f"the request's {name.replace('_', '-')} {batch} is not positive"
        planned = request.dp_rounds + (
            request.text_finetune_rounds if request.text_finetune_layers else 0
        )
        if self.max_rounds is not None and planned > self.max_rounds:
            return (
                f"the request plans {planned} private rounds at this node (dp-rounds, plus "
                f"text-finetune-rounds when it tunes the encoder), above its "
                f"max-rounds={self.max_rounds}"
            )
        if self.max_steps is not None and (steps := planned_steps(request, customers)) > (
            self.max_steps
        ):
            return (
                f"the request plans {steps} DP-SGD steps at this node of {customers} customers "
                f"(dp-batch-size {request.dp_batch_size}), above its max-steps={self.max_steps}"
            )
        if self.max_epsilon is not None and request.target_epsilon > self.max_epsilon:
            return (
                f"the request's target-epsilon {request.target_epsilon:g} is above this node's "
                f"max-epsilon={self.max_epsilon:g}"
            )
        if self.max_delta is not None and request.delta > self.max_delta:
            return (
                f"the request's delta {request.delta:g} is above this node's "
                f"max-delta={self.max_delta:g}"
            )
        return None

    def answers_refusal(self, answers: tuple[tuple[float, int], ...], delta: float) -> str | None:
        """Why this node refuses to give private ``answers`` (evaluations and start-guard
        comparisons, as (noise multiplier, count), composed: :func:`releases_exceed`), or None:
        together they would spend more than its ``max-answer-share`` of its ``max-epsilon``,
        so that no operator can spend the node's lifetime budget on answers (no cap without
        both)."""
        if self.max_answer_share is None or self.max_epsilon is None:
            return None
        cap = self.max_answer_share * self.max_epsilon
        if not releases_exceed(answers, cap, delta):
            return None
        shown = " and ".join(f"{count} at noise {sigma:g}" for sigma, count in answers)
        return (
            f"private answers ({shown}: evaluations and start-guard comparisons, over this "
            f"node's lifetime) would spend more than its max-answer-share="
            f"{self.max_answer_share:g} of max-epsilon={self.max_epsilon:g} (epsilon {cap:g} "
            f"at delta {delta:.3g})"
        )

    def model_refusal(self, model: ModelConfig) -> str | None:
        """Why this node refuses to build the model a request asks for (more weights than
        its ``max-model-weights``: an operator's setting must not exhaust its machine), or
        None."""
        if self.max_model_weights is None or (count := model.weight_count()) <= (
            self.max_model_weights
        ):
            return None
        return (
            f"the request's model holds {count:,} weights (dim {model.dim}, layers "
            f"{model.layers}, {model.num_items:,} products), above this node's "
            f"max-model-weights={self.max_model_weights}"
        )

    def text_model_refusal(self, text_model: str) -> str | None:
        """Why this node refuses to load ``text_model`` (not among its ``text-models``), or
        None; decided on the name alone, so that the answer says nothing of the node's files."""
        if self.text_models is None or text_model in self.text_models:
            return None
        shown = text_model[:40] + ("..." if len(text_model) > 40 else "")
        return (
            f"the request's text-model {shown!r} is not one this node's policy lets it load "
            "(text-models)"
        )

    def step_refusal(
        self, request: RunConfig, model: ModelConfig, customers: int, training: bool = True
    ) -> str | None:
        """Why this node, of ``customers`` (its public figure), refuses the steps ``request``
        would take with ``model`` (``training`` false: the passes of an evaluation, which
        takes no training step) (their activations above its ``max-step-activations``: an
        operator's batch sizes must not exhaust its machine), or None."""
        if self.max_step_activations is None:
            return None
        count = step_activations(request, model, customers, training)
        if count <= self.max_step_activations:
            return None
        batch = "dp-batch-size" if request.dp else "local-batch-size"
        size = request.dp_batch_size if request.dp else request.local_batch_size
        if not training:
            batch, size = "customers ranked at once", min(RANK_BATCH, customers)
        return (
            f"one step of the request at this node of {customers} customers holds {count:,} "
            f"activation values ({batch} {size}, {model.max_len} positions (max-len or "
            f"dp-max-len), {model.num_items:,} products, {model.layers} layers of "
            f"{model.heads} heads), above this node's "
            f"max-step-activations={self.max_step_activations}"
        )

    def budget(self, request: RunConfig) -> float:
        """The epsilon this node may spend in total: the request's, capped by its own."""
        if self.max_epsilon is None:
            return request.target_epsilon
        return min(request.target_epsilon, self.max_epsilon)

    def delta(self, request: RunConfig, customers: int) -> float:
        """The node's own delta: ``1 / (10 x customers)``, or the request's or the policy's
        if smaller."""
        own = request.customer_delta(customers)
        return min(own, self.max_delta) if self.max_delta else own

    def exclusive(self, split: str) -> bool:
        """Whether this node vouches that its customers are its own alone: its
        ``exclusive-customers``, else (a simulated node) whether ``split``, its ``node.json``'s
        ``partition``, is regional."""
        if self.exclusive_customers is not None:
            return self.exclusive_customers
        return split == "regional"

    def customers(self, exact: int, in_node_json: int | None) -> int:
        """The public customer figure: declared in the node config, else in ``node.json``,
        else ``exact`` rounded down to two significant figures."""
        if self.declared_customers is not None:
            return self.declared_customers
        if in_node_json:
            return int(in_node_json)
        return round_down_2sf(exact)


def planned_steps(request: RunConfig, customers: int) -> int:
    """The DP-SGD steps of ``request``'s whole private plan at a node of ``customers``: its
    training rounds and, when it tunes the encoder, its encoder rounds (one expected pass over
    the customers a round, client/encoder.py); what the node's calibration composes."""
    per_epoch, _ = steps_per_epoch(customers, request.dp_batch_size)
    steps = per_epoch * request.dp_local_epochs * request.dp_rounds
    if request.text_finetune_layers:
        per_round, _ = steps_per_epoch(customers, request.dp_encoder_batch)
        steps += per_round * request.text_finetune_rounds
    return steps


def sequences_per_history(request: RunConfig) -> int:
    """The training sequences a customer's history may give without DP: two when it may also
    be learnt backwards (``reverse-histories`` not off; never under any DP:
    shared.recommender.training.learns_reversed), else one."""
    return 2 if request.reverse_histories != "off" and not request.private else 1


def step_activations(
    request: RunConfig, model: ModelConfig, customers: int, training: bool = True
) -> int:
    """The most activation values (:meth:`ModelConfig.activation_count`) one step of
    ``request`` holds at a node of ``customers`` (its public figure), ``model`` being the one
    it asks for: a training step (under DP the expected Poisson batch, at most the customers,
    in :data:`PHYSICAL_BATCHES` passes; else ``local-batch-size`` sequences, at most the
    customers' histories, twice that when learnt both ways) or an evaluation step
    (:data:`RANK_BATCH` customers ranked at once), the latter alone when the request does not
    train (``training`` false: an evaluation or the start guard's comparison builds no training
    batch, whatever its size). A private encoder step holds what its code fixes (8 customers a
    pass: shared.recommender.private_finetune.CHUNK), whatever the batch."""
    ranking = model.activation_count(min(RANK_BATCH, customers), training=False)
    if not training:
        return ranking
    if request.dp:
        at_once = math.ceil(min(request.dp_batch_size, customers) / PHYSICAL_BATCHES)
    else:
        at_once = min(request.local_batch_size, customers * sequences_per_history(request))
    return max(model.activation_count(max(at_once, 0)), ranking)


def releases_exceed(releases: tuple[tuple[float, int], ...], epsilon: float, delta: float) -> bool:
    """Whether Gaussian ``releases`` of sensitivity 1, as (noise multiplier, count), alone
    spend more than (``epsilon``, ``delta``): they compose exactly into one Gaussian of noise
    multiplier 1 / sqrt(sum of count / sigma^2), whose delta at ``epsilon`` has a closed form
    (Balle and Wang, ICML 2018, Theorem 8)."""
    if not releases:
        return False
    mu = math.sqrt(sum(count / sigma**2 for sigma, count in releases))

    def normal_cdf(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    tail = normal_cdf(-epsilon / mu - mu / 2)
    spent = normal_cdf(-epsilon / mu + mu / 2) - (
        math.exp(epsilon + math.log(tail)) if tail > 0 else 0.0
    )
    return spent > delta


def parse_node_config(text: str) -> dict[str, Any]:
    """``"require-dp=true max-epsilon=4"`` as a dict, keys checked against the policy's (and
    ``data-dir``); the same syntax as Flower's ``--node-config``."""
    values: dict[str, Any] = {}
    for token in text.split():
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise PolicyError(f"node config {token!r}: expected key=value")
        if key not in POLICY_KEYS:
            raise PolicyError(f"node config: unknown key {key!r}; known: {', '.join(POLICY_KEYS)}")
        values[key] = value.strip("\"'")
    NodePolicy.from_node_config(values)  # every value checked now, not at the first round
    return values
