"""What a node's release may state, from the run's settings, checked before any accounting.

Accounting a release (dp-accounting's PLD) takes time and memory that grow with its privacy
loss: one release of 10**6 steps without amplification asked for 3.75 GiB, one at noise 0.001
for 76 GiB. So the server first checks that a release is one the run could have planned for the
node's declared customers (``num_customers``):

- DP-SGD (``training``, ``encoder``): Poisson sampled at the plan's rate, min(1, batch /
  customers) (``dp-batch-size``, ``dp-encoder-batch``), for at most the plan's steps of one
  round (``dp-local-epochs`` epochs of training, one pass of the encoder);
- a private answer (``evaluation``, ``guard``): one Gaussian release with at least the run's
  noise (``eval-noise-multiplier``, ``RunConfig.guard_noise``);
- with a registry, no more customers than the node's registered figure;
- DP-SGD at the run's ``max-grad-norm`` (what every node clips to);
- what the audit recomputes (``shared.federation.reports.release_value_problem``, the same
  definition its ``releases`` check applies): the customer-level unit, an accountant it knows
  (prv or pld), at least one step, a sample rate in (0, 1], a delta in (0, 1), a finite
  epsilon >= 0 and a noise multiplier within [``MIN_NOISE_MULTIPLIER``,
  ``MAX_NOISE_MULTIPLIER``] (shared/runs/config.py: the nodes refuse to answer outside it),
  where the accountant's arithmetic holds: at 1e-160 its RDP bound underflowed to a spend of
  0, at 1e-200 it divided by zero and at 1e155 it overflowed, each crashing the round;
  anything else one node's release would fail the whole run's audit instead of its own reply;
- the release alone spends at most ``RDP_SPARE`` x ``target-epsilon`` + 1 by dp-accounting's
  RDP bound, which costs microseconds whatever the parameters and is above PLD's epsilon: no
  honest release spends more than its node's budget, itself at most the target.

A release outside them is refused as malformed (server/federation/releases.py): its update is
not used and the ledger keeps what it claims, never recomputed.
"""

from __future__ import annotations

import math

from server.privacy.accounting import RDP_SPARE, rdp_epsilon
from shared.federation.reports import Release, release_value_problem
from shared.recommender.training import steps_per_epoch
from shared.runs.config import RunConfig

DP_SGD = {"training": "poisson_subsampled_gaussian", "encoder": "poisson_subsampled_gaussian"}


def release_problem(
    release: Release, config: RunConfig, registered: int | None = None
) -> str | None:
    """Why ``release`` is outside what ``config`` plans for its node (None: it is within);
    ``registered``: the customers a registry declares for the node, which its release may not
    exceed (more customers would loosen every bound below)."""
    customers = release.num_customers
    if problem := release_value_problem(release.as_dict()):  # what the audit could recompute
        return problem
    if registered is not None and customers > registered:
        return f"num_customers {customers} is above the {registered} registered for the node"
    if release.purpose in DP_SGD:
        if release.mechanism != DP_SGD[release.purpose]:
            return f"a {release.purpose} release must be {DP_SGD[release.purpose]}"
        if not math.isclose(release.max_grad_norm, config.max_grad_norm, rel_tol=1e-9):
            return (
                f"max_grad_norm {release.max_grad_norm:g} is not the run's {config.max_grad_norm:g}"
            )
        training = release.purpose == "training"
        batch = config.dp_batch_size if training else config.dp_encoder_batch
        per_epoch, rate = steps_per_epoch(customers, batch)
        most = per_epoch * (config.dp_local_epochs if training else 1)
        if not math.isclose(release.sample_rate, rate, rel_tol=1e-9):
            return (
                f"sample_rate {release.sample_rate:g} is not the plan's {rate:g} for "
                f"{customers} customers"
            )
    else:
        if release.mechanism != "gaussian":
            return f"a {release.purpose} release must be gaussian"
        most = 1
        noise = (
            config.eval_noise_multiplier
            if release.purpose == "evaluation"
            else config.guard_noise(customers)
        )
        if release.noise_multiplier < noise * (1 - 1e-9):
            return f"noise_multiplier {release.noise_multiplier:g} is below the run's {noise:g}"
    if release.steps > most:
        return (
            f"{release.steps} steps, outside the 1 to {most} the run plans for {customers} "
            "customers"
        )
    limit = RDP_SPARE * config.target_epsilon + 1
    spent = rdp_epsilon([release.as_dict()], release.delta)
    if not spent <= limit:
        return (
            f"the release alone spends epsilon {spent:.4g} (RDP bound), above the "
            f"{limit:g} any release of this run can (noise_multiplier {release.noise_multiplier:g})"
        )
    return None
