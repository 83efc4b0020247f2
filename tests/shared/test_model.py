"""The fusion recommender (shared/recommender/model.py): the text-baseline start, the fast scoring
path, the ablations, cold-item filling and the independence of a customer's state from its batch."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from shared.recommender.catalog import fill_cold_items, full_table
from shared.recommender.model import FusionRecommender, ModelConfig, pad_histories
from shared.recommender.training import (
    learns_reversed,
    passes_per_epoch,
    train_epoch,
    training_tensors,
    trim,
    with_reversed,
)
from shared.runs.config import RunConfig

TEXT_MODULES = ("text_in", "query_to_text")
ID_MODULES = ("id_in", "id_scores")
FUSION_MODULES = ("gate", "mix")


def random_text(num_items: int, text_dim: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(
        torch.randn(num_items, text_dim, generator=generator), dim=1
    )


def random_histories(num_items: int, lengths, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.choice(num_items, size=n, replace=False) for n in lengths]


def perturbed(model: FusionRecommender, scale: float = 0.1, seed: int = 0) -> FusionRecommender:
    """Move every weight off its initialisation, so that every path (ID, gate, transformer,
    residual) contributes to the scores."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def small_model(
    variant: str = "fusion",
    fusion: str = "gated",
    *,
    num_items: int = 60,
    text_dim: int = 24,
    dim: int = 16,
    max_len: int = 8,
    recency: float = 0.3,
) -> FusionRecommender:
    torch.manual_seed(0)
    config = ModelConfig(
        num_items=num_items,
        text_dim=text_dim,
        dim=dim,
        max_len=max_len,
        layers=1,
        heads=2,
        dropout=0.0,
        fusion=fusion,
        variant=variant,
        recency=recency,
    )
    return FusionRecommender(config, random_text(num_items, text_dim))


# --- at initialisation the model is the text baseline ---------------------------------------


def baseline_scores(
    text: np.ndarray,
    histories: list[np.ndarray],
    dim: int,
    recency: float,
    max_len: int,
    scale: float,
) -> np.ndarray:
    """The text baseline, computed independently in float64 numpy: project the text onto the
    catalog's top ``dim`` principal directions, take the recency-weighted mean of the last
    ``max_len`` history items (weight (1 - recency)^age, age 0 = the latest) and score every
    item by the inner product with its projected text."""
    text = text.astype(np.float64)
    _, _, vt = np.linalg.svd(text - text.mean(0), full_matrices=False)
    projected = text @ vt[:dim].T
    out = np.zeros((len(histories), len(text)))
    for row, history in enumerate(histories):
        tail = np.asarray(history[-max_len:])
        weights = (1.0 - recency) ** np.arange(len(tail))[::-1]
        state = weights @ projected[tail] / weights.sum()
        out[row] = scale * projected @ state
    return out


@pytest.fixture(scope="module")
def initial_model(synth_item_text: torch.Tensor):
    """Untrained models on the synthetic catalog's MiniLM text, built once per (variant, dim):
    building one takes an SVD of the catalog's text."""
    built: dict[tuple[str, int], FusionRecommender] = {}

    def get(variant: str, dim: int) -> FusionRecommender:
        if (variant, dim) not in built:
            text = synth_item_text
            config = ModelConfig(
                num_items=len(text),
                text_dim=text.shape[1],
                dim=dim,
                max_len=10,
                layers=1,
                heads=2,
                dropout=0.3,
                variant=variant,
                recency=0.3,
            )
            torch.manual_seed(0)
            built[variant, dim] = FusionRecommender(config, text).eval()
        return built[variant, dim]

    return get


@pytest.mark.parametrize(("variant", "dim"), [("fusion", 32), ("text", 384)])
def test_initial_model_ranks_like_the_text_baseline(
    synth_item_text: torch.Tensor, initial_model, variant: str, dim: int
) -> None:
    text = synth_item_text
    model = initial_model(variant, dim)
    # lengths beyond max_len too: only the last max_len items count
    histories = random_histories(len(text), [1, 2, 3, 5, 8, 10, 13, 25] * 4, seed=1)
    with torch.no_grad():
        scores = model.scores(model.user_states(histories)).double().numpy()
    expected = baseline_scores(text.numpy(), histories, dim, 0.3, 10, model.config.logit_scale)
    # equal up to a constant per customer (which no ranking can see): with fewer items than
    # ``dim`` the model pads its projection with extra directions that only the catalog's mean
    # text reaches, adding the same amount to every item's score
    np.testing.assert_allclose(
        scores - scores.mean(1, keepdims=True),
        expected - expected.mean(1, keepdims=True),
        rtol=1e-4,
        atol=1e-4 * np.abs(expected).max(),
    )
    k = 10
    agree = 0
    for got, want in zip(scores, expected, strict=True):
        order = np.argsort(-want)
        if want[order[k - 1]] - want[order[k]] < 1e-3:  # a near tie at the cut: either is right
            continue
        agree += 1
        assert set(np.argsort(-got)[:k]) == set(order[:k])
    assert agree >= len(histories) // 2  # the check above did run on most customers


def test_initial_scores_are_cosine_when_the_projection_keeps_every_dimension(
    synth_item_text: torch.Tensor, initial_model
) -> None:
    """dim = text_dim: the projection keeps every direction the catalog spans, so a one-item
    history scores every item by logit_scale * cosine with that item (texts are unit vectors)."""
    text = synth_item_text
    model = initial_model("text", text.shape[1])
    with torch.no_grad():
        scores = model.scores(model.user_states([np.array([7]), np.array([123])]))
    cosine = model.config.logit_scale * text[[7, 123]] @ text.T
    # up to a constant per customer (see the test above)
    torch.testing.assert_close(
        scores - scores.mean(1, keepdim=True),
        cosine - cosine.mean(1, keepdim=True),
        rtol=1e-4,
        atol=1e-3,
    )
    assert scores[0].argmax() == 7 and scores[1].argmax() == 123


# --- the fused fast path equals the module path ---------------------------------------------


@pytest.mark.parametrize(
    ("variant", "fusion"),
    [
        ("fusion", "gated"),
        ("fusion", "sum"),
        ("fusion", "concat"),
        ("text", "gated"),
        ("id", "gated"),
    ],
)
def test_scores_of_states_equal_forward(variant: str, fusion: str) -> None:
    model = perturbed(small_model(variant, fusion))
    histories = random_histories(60, [1, 3, 4, 8, 12], seed=2)
    items = pad_histories(histories, model.config.max_len)
    with torch.no_grad():
        fast = model.scores(model.encode(items)[:, -1])
        modules = model(items)[:, -1]
        all_fast = model.scores(model.encode(items))
        all_modules = model(items)
    assert fast.shape == (5, 60)
    torch.testing.assert_close(fast, modules, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(all_fast, all_modules, rtol=1e-5, atol=1e-5)
    assert fast.std(dim=1).min() > 0  # real scores, not a constant


@pytest.mark.parametrize("variant", ["fusion", "id"])
def test_id_scale_is_a_reparametrisation(variant: str) -> None:
    """A model whose ID weights are stored divided by ``id_scale`` scores exactly as the same
    model at scale 1, by every path: the module-by-module forward (what DP-SGD trains), the
    fused table, and the serving index's rows (``full_table``)."""
    model = perturbed(small_model(variant, "gated"))
    scaled_config = replace(model.config, id_scale=10.0)
    state = {
        k: v / 10.0 if k.startswith("id_scores.") else v for k, v in model.state_dict().items()
    }
    scaled = FusionRecommender.from_state(scaled_config, model.text, state)
    items = pad_histories(random_histories(60, [2, 5, 9], seed=5), model.config.max_len)
    with torch.no_grad():
        torch.testing.assert_close(scaled(items), model(items), rtol=1e-5, atol=1e-5)
        states = model.encode(items)[:, -1]
        torch.testing.assert_close(scaled.scores(states), model.scores(states))
    torch.testing.assert_close(
        torch.from_numpy(full_table(scaled)), torch.from_numpy(full_table(model))
    )
    # and the scale is what the ID part is multiplied by, not a no-op
    unscaled = FusionRecommender.from_state(model.config, model.text, state)
    with torch.no_grad():
        assert not torch.allclose(unscaled(items), model(items), atol=1e-3)


@pytest.mark.parametrize("variant", ["fusion", "text", "id"])
def test_a_model_from_a_state_is_that_state_and_needs_all_of_it(variant: str) -> None:
    """``from_state`` (what nodes build every round) skips the public start and must hold
    exactly the weights it is given: the same scores, and a state missing a weight refused."""
    model = perturbed(small_model(variant, "gated"))
    state = model.state_dict()
    rebuilt = FusionRecommender.from_state(model.config, model.text, state)
    items = pad_histories(random_histories(60, [2, 5, 9], seed=4), model.config.max_len)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(items), model(items), rtol=0, atol=0)
    partial = {k: v for k, v in state.items() if not k.startswith("position")}
    with pytest.raises(RuntimeError, match="position"):
        FusionRecommender.from_state(model.config, model.text, partial)


# --- ablations ------------------------------------------------------------------------------


def module_names(model: torch.nn.Module) -> set[str]:
    return {name.split(".")[0] for name, _ in model.named_modules() if name}


def test_text_ablation_has_no_id_modules() -> None:
    model = small_model("text")
    names = module_names(model)
    assert set(TEXT_MODULES) <= names
    assert not names & set(ID_MODULES + FUSION_MODULES)
    assert not any(k.startswith(ID_MODULES) for k in model.state_dict())
    with torch.no_grad():
        assert model(pad_histories([np.array([1, 2])], 8)).shape == (1, 8, 60)
    table, bias = model.item_table()
    assert table.shape == (60, 16) and torch.all(bias == 0)


def test_id_ablation_has_no_text_modules() -> None:
    model = small_model("id")
    names = module_names(model)
    assert set(ID_MODULES) <= names
    assert not names & set(TEXT_MODULES + FUSION_MODULES)
    assert not any(k.startswith(TEXT_MODULES) for k in model.state_dict())
    # alone, ID embeddings start random (symmetry broken); the padding row stays zero
    assert model.id_in.weight[1:].abs().sum() > 0
    assert torch.all(model.id_in.weight[0] == 0)
    with torch.no_grad():
        assert model(pad_histories([np.array([1, 2])], 8)).shape == (1, 8, 60)


@pytest.mark.parametrize(("fusion", "extra"), [("gated", "gate"), ("concat", "mix"), ("sum", None)])
def test_fusion_modules(fusion: str, extra: str | None) -> None:
    names = module_names(small_model("fusion", fusion))
    assert set(TEXT_MODULES + ID_MODULES) <= names
    assert names & set(FUSION_MODULES) == ({extra} if extra else set())


@pytest.mark.parametrize("variant", ["fusion", "text", "id"])
@pytest.mark.parametrize("fusion", ["gated", "concat", "sum"])
@pytest.mark.parametrize(("dim", "layers", "max_len"), [(8, 0, 5), (12, 3, 7)])
def test_the_weight_count_is_the_models_without_building_it(
    variant: str, fusion: str, dim: int, layers: int, max_len: int
) -> None:
    """What a node checks against its max-model-weights is exactly what it would build."""
    config = ModelConfig(
        num_items=30, text_dim=16, dim=dim, layers=layers, heads=2, max_len=max_len,
        variant=variant, fusion=fusion,
    )  # fmt: skip
    model = FusionRecommender(config, torch.randn(30, 16))
    assert config.weight_count() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("layers", "heads"), [(0, 1), (2, 2), (3, 4)])
def test_the_activation_count_is_what_a_pass_computes(layers: int, heads: int, monkeypatch) -> None:
    """What a node checks against its max-step-activations is what one pass computes: the
    scores of every position (of the last one in evaluation), each layer's attention (heads x
    positions² a customer) and the recency weights (positions² a customer)."""
    config = ModelConfig(num_items=40, text_dim=16, dim=8, layers=layers, heads=heads, max_len=6)
    model = FusionRecommender(config, random_text(40, 16))
    attention: list[int] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recorded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
        attention.append(q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2])
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recorded)
    histories = random_histories(40, [7, 9, 6])  # every history fills all 6 positions
    recency = 3 * 6**2  # encode's recency weights: customers x positions x positions
    scores = model(pad_histories(histories, 6)).numel()
    assert config.activation_count(3) == scores + sum(attention) + recency
    attention.clear()
    with torch.no_grad():  # evaluation: the last position's scores, one layer at a time
        scores = model.scores(model.user_states(histories)).numel()
    one_layer = max(attention, default=0)
    assert config.activation_count(3, training=False) == scores + one_layer + recency
    assert len(attention) == layers


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"dim": 0}, "dim must be in"),
        ({"dim": 10**6}, "dim must be in"),
        ({"layers": 10**308}, "layers must be in"),
        ({"heads": 3, "dim": 128}, "heads must divide dim"),
        ({"max_len": 10**9}, "max-len must be in"),
    ],
)
def test_an_architecture_out_of_range_is_refused_before_it_is_built(
    settings: dict, words: str
) -> None:
    """An operator's setting must not make a node allocate without bound: ``layers`` 1e308
    made one allocate until it was killed (found fuzzing)."""
    with pytest.raises(ValueError, match=words):
        ModelConfig(num_items=3, **settings)
    with pytest.raises(ValueError, match=words):
        RunConfig(**settings)
    private = {("dp_" + k if k in ("dim", "max_len") else k): v for k, v in settings.items()}
    with pytest.raises(ValueError, match=words if "heads" not in settings else "dp-dim"):
        RunConfig(**private, dim=6 if "heads" in settings else 128)


def test_bad_variant_and_fusion_are_refused() -> None:
    with pytest.raises(ValueError, match="variant"):
        ModelConfig(num_items=3, variant="both")
    with pytest.raises(ValueError, match="fusion"):
        ModelConfig(num_items=3, fusion="product")
    with pytest.raises(ValueError, match="text embeddings"):
        FusionRecommender(ModelConfig(num_items=4, text_dim=8, dim=4), torch.zeros(5, 8))


# --- cold items -----------------------------------------------------------------------------


def item_rows(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The item tables of a state dict, one row per item (id_in without its padding row)."""
    return {
        "id_in.weight": state["id_in.weight"][1:],
        "id_scores.weight": state["id_scores.weight"],
        "id_scores.bias": state["id_scores.bias"],
    }


def test_fill_cold_items_fills_exactly_the_untrained_rows() -> None:
    num_items, text_dim, dim = 120, 12, 8
    text = random_text(num_items, text_dim, seed=3)
    text[100:110] = text[:10]  # cold items 100..109 are textual twins of trained items 0..9
    config = ModelConfig(num_items=num_items, text_dim=text_dim, dim=dim, max_len=6, layers=1)
    model = FusionRecommender(config, text)
    trained = torch.ones(num_items, dtype=torch.bool)
    trained[100:] = False
    generator = torch.Generator().manual_seed(4)
    # trained ID vectors that text predicts well (plus a little noise); untrained rows stay 0
    mixing = torch.randn(text_dim, 2 * dim + 1, generator=generator)
    targets = text @ mixing + 0.01 * torch.randn(num_items, 2 * dim + 1, generator=generator)
    with torch.no_grad():
        model.id_in.weight[1:][trained] = targets[trained, :dim]
        model.id_scores.weight[trained] = targets[trained, dim : 2 * dim]
        model.id_scores.bias[trained] = targets[trained, -1]
    before = {k: v.clone() for k, v in model.state_dict().items()}

    assert fill_cold_items(model, trained) == 20
    after = model.state_dict()
    rows, old = item_rows(after), item_rows(before)
    for name in rows:
        assert torch.equal(rows[name][trained], old[name][trained]), name  # untouched
        changed = (rows[name][~trained] != old[name][~trained]).reshape(20, -1).any(1)
        assert changed.all(), name  # every cold row filled
    assert torch.all(after["id_in.weight"][0] == 0)  # the padding row too is untouched
    for name, value in before.items():  # nothing but the item tables changes
        if name not in rows:
            assert torch.equal(after[name], value), name

    # a cold item whose text equals a trained item's gets (nearly) that item's vectors
    filled = torch.cat(
        [rows["id_in.weight"], rows["id_scores.weight"], rows["id_scores.bias"][:, None]], dim=1
    )
    twins, originals = filled[100:110], filled[:10]
    cosine = torch.nn.functional.cosine_similarity(twins, originals, dim=1)
    assert cosine.min() > 0.95, cosine
    nearest = torch.cdist(twins, filled[trained]).argmin(1)
    assert torch.equal(nearest, torch.arange(10))


@pytest.mark.parametrize("id_scale", [1.0, 10.0])
def test_new_item_boost_raises_exactly_the_filled_biases(id_scale: float) -> None:
    """The boost is a logit on the new products' scores, whatever ``id_scale`` the stored
    biases are multiplied by."""
    trained = torch.arange(60) < 45
    plain, boosted = perturbed(small_model()), perturbed(small_model())
    for model in (plain, boosted):
        model.config.id_scale = id_scale
    boosted.config.new_item_boost = 1.5
    fill_cold_items(plain, trained)
    fill_cold_items(boosted, trained)
    difference = boosted.item_table()[1] - plain.item_table()[1]
    torch.testing.assert_close(difference[~trained], torch.full((15,), 1.5))
    assert torch.equal(difference[trained], torch.zeros(45))
    torch.testing.assert_close(boosted.id_scores.weight, plain.id_scores.weight)


def test_fill_cold_items_is_a_no_op_without_cold_items_or_ids() -> None:
    model = perturbed(small_model())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert fill_cold_items(model, torch.ones(60, dtype=torch.bool)) == 0
    assert fill_cold_items(model, torch.zeros(60, dtype=torch.bool)) == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert fill_cold_items(small_model("text"), torch.arange(60) < 30) == 0


# --- a customer's state does not depend on the batch or the padding -------------------------


@pytest.mark.parametrize("variant", ["fusion", "text", "id"])
def test_user_states_do_not_depend_on_the_batch(variant: str) -> None:
    model = perturbed(small_model(variant, max_len=8))
    histories = random_histories(60, [3, 1, 8, 5, 12, 2, 7, 3], seed=5)
    with torch.no_grad():
        together = model.user_states(histories)
        chunked = model.user_states(histories, chunk=3)
        alone = torch.cat([model.user_states([h]) for h in histories])
        reversed_batch = model.user_states(histories[::-1]).flip(0)
    assert together.abs().sum() > 0
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reversed_batch, alone, rtol=1e-5, atol=1e-5)
    # and the state is the encoder's last position however wide the padding
    for history, state in zip(histories, alone, strict=True):
        for width in (8, 10, 16):
            if width > model.config.max_len:
                continue
            items = pad_histories([history], width)
            torch.testing.assert_close(
                model.encode(items)[0, -1].detach(), state, rtol=1e-5, atol=1e-5
            )


def test_padding_and_left_trim_do_not_change_a_state() -> None:
    model = perturbed(small_model(max_len=10))
    histories = random_histories(60, [2, 4, 3], seed=6)
    with torch.no_grad():
        wide = model.encode(pad_histories(histories, 10))[:, -1]
        narrow = model.encode(pad_histories(histories, 4))[:, -1]
        inputs, targets = training_tensors(histories, 10)
        trimmed_inputs, trimmed_targets = trim(inputs, targets)
        assert trimmed_inputs.shape[1] == 3 < inputs.shape[1]  # the longest input has 3 items
        full_states = model.encode(inputs)
        trimmed_states = model.encode(trimmed_inputs)
    torch.testing.assert_close(wide, narrow, rtol=1e-5, atol=1e-5)
    # trimming removes only padding columns: every kept position has the same state
    width = trimmed_inputs.shape[1]
    torch.testing.assert_close(trimmed_states, full_states[:, -width:], rtol=1e-5, atol=1e-5)
    assert torch.equal(trimmed_targets, targets[:, -width:])
    assert torch.all(targets[:, :-width] == -1)


def test_pad_histories_right_aligns_the_last_items() -> None:
    out = pad_histories([np.array([4, 5, 6]), np.array([], dtype=np.int64), np.arange(10)], 4)
    assert out.tolist() == [[0, 5, 6, 7], [0, 0, 0, 0], [7, 8, 9, 10]]


def test_short_histories_are_also_learnt_backwards() -> None:
    histories = [np.array([1, 2]), np.array([3]), np.array([4, 5, 6])]
    out = with_reversed(histories)
    assert [h.tolist() for h in out] == [[1, 2], [3], [4, 5, 6], [2, 1], [6, 5, 4]]
    assert histories[2].tolist() == [4, 5, 6]  # the originals are untouched
    inputs, targets = training_tensors(out[-2:], 3)
    assert inputs.tolist() == [[0, 0, 3], [0, 7, 6]]  # item index + 1, right-aligned
    assert targets.tolist() == [[-1, -1, 1], [-1, 5, 4]]
    # auto: the median history that trains (two events or more) decides
    short = [np.arange(2), np.arange(3), np.arange(9), np.array([7])]
    long = [np.arange(4), np.arange(5), np.arange(2)]
    auto, on, off = (RunConfig(reverse_histories=v) for v in ("auto", "on", "off"))
    assert learns_reversed(auto, short) and not learns_reversed(auto, long)
    assert learns_reversed(on, long) and not learns_reversed(off, short)
    assert not learns_reversed(auto, [np.array([1])])  # nothing trains
    # never under DP, customer- or node-level: a customer would be two samples
    assert not learns_reversed(RunConfig(dp=True), short)
    assert not learns_reversed(RunConfig(node_dp=True), short)


def test_a_small_datasets_epoch_takes_as_many_passes_as_reach_its_steps() -> None:
    """``fedrec train``'s epoch on 300 sequences in batches of 128 is 3 steps; with
    ``epoch-steps`` 20 it is 7 passes (21 steps), with the default 50 it is 17, and a large
    dataset keeps one pass."""
    assert passes_per_epoch(300, 128, 20) == 7
    assert passes_per_epoch(300, 128, RunConfig.epoch_steps) == 17
    assert passes_per_epoch(6_400, 128, RunConfig.epoch_steps) == 1
    assert passes_per_epoch(300, 128, 0) == 1
    assert passes_per_epoch(22_363, 128, 20) == 1
    model = small_model()
    inputs, targets = training_tensors(random_histories(60, [6] * 10), model.config.max_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    steps = []
    optimizer.register_step_post_hook(lambda *_: steps.append(1))
    train_epoch(model, optimizer, inputs, targets, 4, "cpu", passes=3)
    assert len(steps) == 3 * 3  # 10 sequences in batches of 4: 3 steps a pass
