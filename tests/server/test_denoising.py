"""Denoising the private rounds' updates (server/federation/denoising.py): a matrix's few strong
directions survive, the noise spread over the rest goes, a direction too weak for one round
emerges from their sum, the item biases of the few products with signal stay while the rest
go to their median, and nothing changes without DP."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from server.federation.aggregation import NodeUpdate
from server.federation.denoising import (
    AUTO_BELOW_EPSILON,
    ITEM_BIASES,
    RANDOM_WALK_SHARE,
    CumulativeDenoiser,
    denoises,
    injected_bias_variance,
    marchenko_pastur_median,
    shrink_singular_values,
    soft_threshold,
)
from server.federation.strategy import FedRecStrategy
from shared.federation.reports import NodeReport, Release
from shared.runs.checkpoint import Checkpoint
from shared.runs.config import RunConfig


def low_rank_plus_noise(
    rows: int, cols: int, strengths: tuple[float, ...], noise: float, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(rows, len(strengths), generator=generator))
    right, _ = torch.linalg.qr(torch.randn(cols, len(strengths), generator=generator))
    signal = (left * torch.tensor(strengths)) @ right.T
    return signal, signal + noise * torch.randn(rows, cols, generator=generator)


def test_the_marchenko_pastur_median_is_where_noise_spectra_centre() -> None:
    rng = np.random.default_rng(0)
    for m, n in ((600, 600), (300, 600)):
        z = rng.standard_normal((m, n))
        simulated = float(np.median(np.linalg.eigvalsh(z @ z.T / n)))
        assert abs(marchenko_pastur_median(m / n) - simulated) < 0.01 * simulated


def test_a_few_strong_directions_survive_and_the_noise_goes() -> None:
    """The noise level is not given: it is read from the median singular value."""
    for rows, cols in ((384, 384), (384, 128), (128, 384)):
        edge = 0.01 * (math.sqrt(rows) + math.sqrt(cols))  # the largest noise singular value
        signal, noisy = low_rank_plus_noise(rows, cols, (8 * edge, 4 * edge, 2 * edge), 0.01)
        denoised, kept = shrink_singular_values(noisy)
        assert kept == 3
        assert denoised.shape == noisy.shape
        error, raw = (denoised - signal).norm(), (noisy - signal).norm()
        assert error < 0.3 * raw, (rows, cols, float(error), float(raw))
    # a direction weaker than the noise's own scale (0.01 x sqrt(256)) cannot be told from it
    _, noisy = low_rank_plus_noise(256, 256, (0.5 * 0.01 * 16,), 0.01)
    assert shrink_singular_values(noisy)[1] == 0
    pure = torch.randn(256, 256, generator=torch.Generator().manual_seed(1))
    # pure noise: at most a direction at the edge's random fluctuation, shrunk nearly to 0
    denoised, kept = shrink_singular_values(pure)
    assert kept <= 1 and denoised.norm() < 0.05 * pure.norm()


def test_denoise_leaves_what_did_not_move_or_is_too_small() -> None:
    _, noisy = low_rank_plus_noise(64, 64, (1.0,), 0.01)
    delta = {
        "moved": noisy,
        "still": torch.zeros(64, 64),
        "small": torch.ones(4, 64),
        "vector": torch.ones(64),
        ITEM_BIASES: torch.randn(500, generator=torch.Generator().manual_seed(0)),
    }
    start = {k: torch.zeros_like(v) for k, v in delta.items()}
    out, report = CumulativeDenoiser()(start, delta, bias_noise=1.0)  # the biases: all noise
    assert set(report) == {"moved", ITEM_BIASES}
    assert not torch.equal(out[ITEM_BIASES], delta[ITEM_BIASES])
    # without the nodes' noise figure the biases are applied as averaged
    out, report = CumulativeDenoiser()(start, delta)
    assert set(report) == {"moved"} and torch.equal(out[ITEM_BIASES], delta[ITEM_BIASES])
    for name in ("still", "small", "vector"):
        assert torch.equal(out[name], delta[name])
    assert not torch.equal(out["moved"], noisy)


def test_the_server_denoises_private_rounds_only() -> None:
    signal, noisy = low_rank_plus_noise(64, 48, (1.0,), 0.01)
    state = {"w": torch.zeros(64, 48)}
    updates = [NodeUpdate("a", 1.0, {"w": noisy}), NodeUpdate("b", 1.0, {"w": noisy})]
    plain, _ = FedRecStrategy(RunConfig(row_clip=0)).apply(state, updates)
    assert torch.allclose(plain["w"], noisy)
    private = FedRecStrategy(RunConfig(dp=True, dp_denoise="on", row_clip=0))
    denoised = private.apply(state, updates)[0]["w"]
    assert torch.allclose(denoised, shrink_singular_values(noisy)[0])
    assert (denoised - signal).norm() < 0.5 * (noisy - signal).norm()
    asked_off = FedRecStrategy(RunConfig(dp=True, dp_denoise="off", row_clip=0))
    assert torch.allclose(asked_off.apply(state, updates)[0]["w"], noisy)


def test_auto_denoises_below_its_budget_threshold_and_only_under_customer_level_dp() -> None:
    small, large = AUTO_BELOW_EPSILON / 2, AUTO_BELOW_EPSILON
    assert denoises(RunConfig(dp=True, target_epsilon=small))
    assert not denoises(RunConfig(dp=True, target_epsilon=large))
    assert denoises(RunConfig(dp=True, target_epsilon=large, dp_denoise="on"))
    assert not denoises(RunConfig(dp=True, target_epsilon=small, dp_denoise="off"))
    assert not denoises(RunConfig(target_epsilon=small, dp_denoise="on"))  # no DP, no noise
    assert not denoises(RunConfig(node_dp=True, target_epsilon=small))
    # what sets a node's noise is the budget it is asked to keep: a merchant's share of the run's
    merchants = RunConfig(dp=True, partition="merchant", clients=10, target_epsilon=8.0)
    assert denoises(merchants) and not denoises(replace(merchants, partition="regional"))
    signal, noisy = low_rank_plus_noise(64, 48, (1.0,), 0.01)
    state = {"w": torch.zeros(64, 48)}
    updates = [NodeUpdate("a", 1.0, {"w": noisy})]
    at_large = FedRecStrategy(RunConfig(dp=True, target_epsilon=large, row_clip=0))
    assert torch.allclose(at_large.apply(state, updates)[0]["w"], noisy)
    at_small = FedRecStrategy(RunConfig(dp=True, target_epsilon=small, row_clip=0))
    assert not torch.allclose(at_small.apply(state, updates)[0]["w"], noisy)


def test_an_unknown_denoise_mode_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="dp-denoise must be auto, on or off"):
        RunConfig(dp=True, dp_denoise="true")


def test_a_direction_too_weak_for_one_round_emerges_from_the_rounds_sum() -> None:
    """Each round carries the same weak direction (below one round's noise edge) and fresh
    noise: no round alone finds it, the denoised sum of nine does, and the model lands far
    nearer to the nine rounds' signal than the plain sum of their noisy updates."""
    rows = cols = 128
    edge = 0.01 * (math.sqrt(rows) + math.sqrt(cols))
    direction, _ = low_rank_plus_noise(rows, cols, (0.3 * edge,), 0.0)
    strategy = FedRecStrategy(RunConfig(dp=True, dp_denoise="on", row_clip=0))
    start = torch.full((rows, cols), 0.5)
    state, plain = {"w": start}, start.clone()
    generator = torch.Generator().manual_seed(3)
    for _ in range(9):
        noisy = direction + 0.01 * torch.randn(rows, cols, generator=generator)
        alone = shrink_singular_values(noisy)[0]  # one round alone: nothing of the direction
        assert abs((alone * direction).sum()) <= 0.2 * alone.norm() * direction.norm()
        plain = plain + noisy
        trained = {"w": state["w"] + noisy}  # a node sends its weights, not its update
        state, _ = strategy.apply(state, [NodeUpdate("a", 1.0, trained)])
    learnt, target = state["w"] - start, 9 * direction
    assert (learnt - target).norm() < 0.2 * (plain - start - target).norm()
    assert (learnt * target).sum() / (learnt.norm() * target.norm()) > 0.6


def test_a_resumed_server_denoises_as_one_that_never_stopped() -> None:
    """The denoiser's sums travel in the checkpointed server state; without them a server
    would denoise the later rounds alone and land elsewhere."""
    config = RunConfig(dp=True, dp_denoise="on", row_clip=0)
    updates = [low_rank_plus_noise(64, 64, (1.0,), 0.05, seed=s)[1] for s in range(3)]

    def run(strategy: FedRecStrategy, state: dict, rounds: list) -> dict:
        for update in rounds:  # a node sends its weights: the global ones plus its update
            trained = {"w": state["w"] + update}
            state, _ = strategy.apply(state, [NodeUpdate("a", 1.0, trained)])
        return state

    straight = run(FedRecStrategy(config), {"w": torch.zeros(64, 64)}, updates)
    first = FedRecStrategy(config)
    after_one = run(first, {"w": torch.zeros(64, 64)}, updates[:1])
    resumed = FedRecStrategy(config)
    resumed.server_state = {k: v.clone() for k, v in first.server_state.items()}
    assert set(resumed.server_state) == {"denoise/start/w", "denoise/raw/w"}
    assert torch.allclose(run(resumed, after_one, updates[1:])["w"], straight["w"], atol=1e-6)
    forgetful = run(FedRecStrategy(config), after_one, updates[1:])
    assert not torch.allclose(forgetful["w"], straight["w"], atol=1e-3)


def test_a_round_that_is_not_finite_leaves_the_sums_as_they_were() -> None:
    """The round loop does not apply a non-finite aggregate; the denoiser must not keep it in
    its sums either, or every later round would be NaN."""
    denoiser = CumulativeDenoiser()
    state = {"w": torch.zeros(64, 64)}
    first = low_rank_plus_noise(64, 64, (1.0,), 0.05)[1]
    state = {"w": state["w"] + denoiser(state, {"w": first})[0]["w"]}
    before = {k: v.clone() for k, v in denoiser.state.items()}
    broken = first.clone()
    broken[0, 0] = float("nan")
    assert not torch.isfinite(denoiser(state, {"w": broken})[0]["w"]).all()
    assert all(torch.equal(denoiser.state[k], v) for k, v in before.items())
    # a NaN elsewhere (the item biases) rejects the whole round: the finite matrix is not summed
    biases = torch.full((64,), float("nan"))
    denoiser(state, {"w": first, "bias": biases})
    assert all(torch.equal(denoiser.state[k], v) for k, v in before.items())


def test_a_node_sending_noise_cannot_hide_the_others_signal() -> None:
    """A malicious node's garbage raises the noise the server reads from the median singular
    value; bounded by the row bound (3x the round's median norm), it cannot push the honest
    nodes' common direction under the edge, and the denoised round stays nearer to it than the
    plain average, which takes the garbage in whole."""
    rows = cols = 128
    generator = torch.Generator().manual_seed(2)
    direction = torch.outer(
        torch.randn(rows, generator=generator), torch.randn(cols, generator=generator)
    )
    signal = direction / direction.norm() * 0.5
    honest = [signal + 0.01 * torch.randn(rows, cols, generator=generator) for _ in range(9)]
    garbage = 1e3 * torch.randn(rows, cols, generator=generator)
    updates = [NodeUpdate(f"n{i}", 1.0, {"w": u}) for i, u in enumerate(honest)]
    updates.append(NodeUpdate("attacker", 1.0, {"w": garbage}))
    state = {"w": torch.zeros(rows, cols)}

    def applied(denoised: bool) -> torch.Tensor:
        strategy = FedRecStrategy(RunConfig(dp=True, dp_denoise="on" if denoised else "off"))
        fresh = [NodeUpdate(u.node, u.weight, dict(u.arrays)) for u in updates]
        return strategy.apply(state, fresh)[0]["w"]

    plain, denoised = applied(False), applied(True)
    assert (denoised - signal).norm() < 0.5 * (plain - signal).norm()
    cosine = (denoised * signal).sum() / (denoised.norm() * signal.norm())
    assert cosine > 0.9


def sparse_plus_noise(
    items: int, strong: int, strength: float, noise: float, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Item biases: ``strong`` products with a signal of ``strength`` (either sign), the rest
    none, all with Gaussian noise of std ``noise``."""
    generator = torch.Generator().manual_seed(seed)
    signal = torch.zeros(items)
    chosen = torch.randperm(items, generator=generator)[:strong]
    signs = torch.randint(0, 2, (strong,), generator=generator) * 2.0 - 1.0
    signal[chosen] = strength * signs
    return signal, signal + noise * torch.randn(items, generator=generator)


def test_the_item_biases_of_the_few_strong_products_survive_and_the_noise_goes() -> None:
    """The noise level is not given: it is read from the median absolute deviation."""
    signal, noisy = sparse_plus_noise(5000, 200, 6.0, 1.0)
    denoised, kept = soft_threshold(noisy)
    assert (denoised - signal).norm() < 0.6 * (noisy - signal).norm()
    strong = signal != 0
    assert bool((denoised[strong].sign() == signal[strong].sign()).all())
    assert kept < 0.4 * len(noisy)  # of pure noise, about a third lies beyond one std
    # the same update at any scale (the noise level follows it: nothing is a fixed number)
    assert torch.allclose(soft_threshold(1e-3 * noisy)[0], 1e-3 * denoised, atol=1e-9)
    # a constant shift (it changes no ranking) is kept: the biases move towards their median
    shifted, _ = soft_threshold(noisy + 5.0)
    assert torch.allclose(shifted, denoised + 5.0, atol=1e-5)
    pure = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    assert soft_threshold(pure)[0].norm() < 0.5 * pure.norm()


def test_the_server_soft_thresholds_the_sum_of_the_rounds_item_biases() -> None:
    """Each round's biases are fresh noise around a few products' signal; the model's biases
    after three rounds are the threshold of the rounds' sum, nearer to its signal than the
    plain sum."""
    strategy = FedRecStrategy(RunConfig(dp=True, dp_denoise="on", row_clip=0))
    signal, _ = sparse_plus_noise(3000, 100, 3.0, 0.0)
    generator = torch.Generator().manual_seed(5)
    state, total = {ITEM_BIASES: torch.zeros(3000)}, torch.zeros(3000)
    for _ in range(3):
        noisy = signal + torch.randn(3000, generator=generator)
        total = total + noisy
        trained = {ITEM_BIASES: state[ITEM_BIASES] + noisy}  # a node sends its weights
        state, _ = strategy.apply(state, [NodeUpdate("a", 1.0, trained)], bias_noise=1.0)
    assert torch.allclose(state[ITEM_BIASES], soft_threshold(total)[0], atol=1e-5)
    assert (state[ITEM_BIASES] - 3 * signal).norm() < 0.6 * (total - 3 * signal).norm()
    assert set(strategy.server_state) == {
        f"denoise/start/{ITEM_BIASES}",
        f"denoise/raw/{ITEM_BIASES}",
        f"denoise/noise/{ITEM_BIASES}",  # the injected noise summed: a resumed run has it
    }
    assert float(strategy.server_state[f"denoise/noise/{ITEM_BIASES}"]) == pytest.approx(3.0)


def test_biases_that_training_holds_to_the_data_are_not_thresholded(tmp_path: Path) -> None:
    """Dense biases (every product's popularity) whose spread is far below what the nodes'
    injected noise alone would give: training pulled the noise back, what is left is signal,
    and the threshold (which reads it as noise) would erase it. They are applied as averaged;
    once a round's noise is unknown they stay so."""
    generator = torch.Generator().manual_seed(4)
    popularity = 0.3 * torch.randn(1000, generator=generator)  # a dense signal
    denoiser = CumulativeDenoiser()
    state = {ITEM_BIASES: torch.zeros(1000)}
    injected = (popularity.std() / (0.5 * RANDOM_WALK_SHARE)) ** 2  # twice the share's noise
    out, report = denoiser(state, {ITEM_BIASES: popularity}, bias_noise=float(injected))
    assert report == {} and torch.equal(out[ITEM_BIASES], popularity)
    # the same spread with noise a quarter of it: a random walk, thresholded
    walk = CumulativeDenoiser()
    out, report = walk(state, {ITEM_BIASES: popularity}, bias_noise=float(popularity.var()) / 4)
    assert report[ITEM_BIASES] < 1000 and not torch.equal(out[ITEM_BIASES], popularity)
    state = {ITEM_BIASES: out[ITEM_BIASES]}
    out, report = walk(state, {ITEM_BIASES: popularity}, bias_noise=None)  # a report missing
    assert report == {}
    assert torch.allclose(state[ITEM_BIASES] + out[ITEM_BIASES], 2 * popularity)  # as averaged
    out, report = walk(state, {ITEM_BIASES: popularity}, bias_noise=1e-6)
    assert report == {}  # unknown once, unknown for good
    # ... and the state stays finite: the server checkpoints it, and refuses what is not
    Checkpoint(tmp_path / "checkpoint.safetensors").save(state, walk.state, {"round": 3})
    assert Checkpoint(tmp_path / "checkpoint.safetensors").load()[1].keys() == walk.state.keys()


def release(node: str, sigma: float, rate: float, customers: int, steps: int) -> NodeReport:
    fields = dict(run_id="r", round=1, node=node, purpose="training", contribution_index=0)
    fields |= dict(mechanism="poisson_subsampled_gaussian", noise_multiplier=sigma)
    fields |= dict(sample_rate=rate, steps=steps, max_grad_norm=2.0, delta=1e-5, epsilon=1.0)
    fields |= dict(accountant="prv", unit="u", target_epsilon=1.0, num_customers=customers)
    return NodeReport(node=node, release=Release(**fields, update_digest="d"))


def test_the_injected_noise_is_what_the_nodes_signed_releases_state() -> None:
    """Per step a node adds lr x sigma x clip / dp-batch-size to a weight (the run's
    normaliser, whatever the node's own expected batch), over its steps; the weighted mean's
    variance weighs each node's by its squared share. A node that samples every customer
    (rate 1) leaves the figure unknown: the biases are then applied as averaged."""
    reports = [release("a", 4.0, 0.25, 800, 12), release("b", 2.0, 0.8, 300, 9)]
    updates = [NodeUpdate("a", 3.0, {}), NodeUpdate("b", 1.0, {})]
    config = RunConfig(dp=True, dp_lr=0.5, dp_batch_size=200)
    a = 12 * (0.5 * 4.0 * 2.0 / 200) ** 2
    b = 9 * (0.5 * 2.0 * 2.0 / 200) ** 2  # not / 240, its own expected batch
    expected = (3 / 4) ** 2 * a + (1 / 4) ** 2 * b
    state = {ITEM_BIASES: torch.zeros(50)}
    assert injected_bias_variance(reports, updates, config, state) == pytest.approx(expected)
    assert injected_bias_variance(reports[:1], updates, config, state) is None  # b: no report
    unreported = [NodeReport(node="a"), reports[1]]
    assert injected_bias_variance(unreported, updates, config, state) is None
    # an encoder round's release: not the biases' noise
    encoder = NodeReport(node="a", release=replace(reports[0].release, purpose="encoder"))
    assert injected_bias_variance([encoder, reports[1]], updates, config, state) is None
    assert injected_bias_variance(reports, [], config, state) is None
    infinite = NodeReport(node="a", release=replace(reports[0].release, noise_multiplier=math.inf))
    assert injected_bias_variance([infinite, reports[1]], updates, config, state) is None
    small = [reports[0], release("b", 2.0, 1.0, 150, 3)]  # fewer customers than dp-batch-size
    assert injected_bias_variance(small, updates, config, state) is None
    assert injected_bias_variance(reports, updates, config, {}) is None  # a model without biases


def test_a_merchants_products_carry_its_noise_whole() -> None:
    """Row-sparse updates (merchant nodes, each sending its own products' rows) are averaged
    per product over the nodes that sent it: a product one node sells carries that node's
    noise whole, a product two sell their weighted mean's; products nobody sent none."""
    reports = [release("a", 4.0, 0.25, 800, 12), release("b", 2.0, 0.5, 400, 9)]
    a = 12 * (0.5 * 4.0 * 2.0 / 200) ** 2
    b = 9 * (0.5 * 2.0 * 2.0 / 200) ** 2
    rows = {"a": np.array([0, 1, 2, 3]), "b": np.array([3, 4, 5])}
    updates = [
        NodeUpdate(node, weight, {ITEM_BIASES: torch.zeros(len(rows[node]))}, {ITEM_BIASES: r})
        for (node, r), weight in zip(rows.items(), (3.0, 1.0), strict=True)
    ]
    shared = (3 / 4) ** 2 * a + (1 / 4) ** 2 * b
    expected = (3 * a + shared + 2 * b) / 10  # products 6-9 are nobody's
    state, config = {ITEM_BIASES: torch.zeros(10)}, RunConfig(dp=True, dp_lr=0.5, dp_batch_size=200)
    assert injected_bias_variance(reports, updates, config, state) == pytest.approx(expected)
    assert expected > 3 * shared / 10  # weighing every node over all products: too low


def test_a_node_sending_garbage_biases_cannot_wreck_the_others() -> None:
    """A malicious node's bias update, 1,000 times the honest noise, is bounded by the row
    bound; the median absolute deviation reads the honest noise around it, and the few strong
    products the honest nodes share keep their sign and stand out."""
    generator = torch.Generator().manual_seed(6)
    signal, _ = sparse_plus_noise(2000, 60, 4.0, 0.0)
    updates = [
        NodeUpdate(f"n{i}", 1.0, {ITEM_BIASES: signal + torch.randn(2000, generator=generator)})
        for i in range(9)
    ]
    garbage = 1e3 * torch.randn(2000, generator=generator)
    updates.append(NodeUpdate("attacker", 1.0, {ITEM_BIASES: garbage}))
    state = {ITEM_BIASES: torch.zeros(2000)}
    strategy = FedRecStrategy(RunConfig(dp=True, dp_denoise="on"))
    learnt = strategy.apply(state, updates, bias_noise=1.0 / 10)[0][ITEM_BIASES]
    strong = signal != 0
    assert torch.isfinite(learnt).all()
    assert bool((learnt[strong].sign() == signal[strong].sign()).all())
    assert float(learnt[strong].abs().min()) > float(learnt[~strong].abs().median())
