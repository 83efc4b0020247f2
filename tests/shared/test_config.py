"""Run settings (shared/runs/config.py): pyproject.toml's Flower run config, string coercion, and
the command-line help of ``fedrec train`` and ``fedrec simulate``."""

from __future__ import annotations

import argparse
import re
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from shared.runs.config import CHOICES, RANGES, RunConfig, _coerce
from simulations.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def kebab(name: str) -> str:
    return name.replace("_", "-")


def test_pyproject_run_config_mirrors_run_config() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flower = pyproject["tool"]["flwr"]["app"]["config"]
    defaults = RunConfig()
    assert list(flower) == [kebab(f.name) for f in fields(RunConfig)]  # same keys, same order
    for field in fields(RunConfig):
        value = flower[kebab(field.name)]
        expected = getattr(defaults, field.name)
        assert type(value) is type(expected), field.name
        assert value == expected, field.name
    # and Flower's run config, as the ServerApp receives it, builds the default RunConfig
    assert RunConfig.from_flat(flower) == defaults


def test_from_flat_coerces_strings() -> None:
    config = RunConfig.from_flat(
        {
            "dp": "true",
            "refit": "0",
            "layers": "3",
            "dropout": "0.5",
            "target-epsilon": "2",
            "fusion": "concat",
            "logit_scale": "10",
        }
    )
    assert config.dp is True and config.refit is False
    assert config.layers == 3 and isinstance(config.layers, int)
    assert config.dropout == 0.5 and config.target_epsilon == 2.0
    assert isinstance(config.target_epsilon, float) and isinstance(config.logit_scale, float)
    assert config.fusion == "concat"
    assert RunConfig.from_flat({"dp": "False", "refit": "TRUE"}).refit is True
    assert RunConfig.from_flat({}) == RunConfig()
    # a config round-trips through its dict (what metrics.json and the checkpoint store)
    assert RunConfig.from_flat(config.to_dict()) == config


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"dimension": "3"}, "dimension"),
        ({"target_epsilonn": 1.0}, "target_epsilonn"),
        ({"layers": "two"}, "layers"),
        ({"layers": "1.5"}, "layers"),
        ({"dropout": "high"}, "dropout"),
        ({"dp": "maybe"}, "dp"),
        ({"max-grad-norm": ""}, "max-grad-norm"),
        # a server message's number: int(inf) raised an OverflowError naming no setting
        ({"layers": float("inf")}, "layers"),
        ({"dp-rounds": float("-inf")}, "dp-rounds"),
        # a server message's value of another kind is refused, never converted
        ({"dim": 16.9}, "dim"),
        ({"dp": [1, 2]}, "dp"),
        ({"dp": 2}, "dp"),
        ({"dp": 0.5}, "dp"),
        ({"dp-batch-size": True}, "dp-batch-size"),
        ({"target-epsilon": False}, "target-epsilon"),
        ({"target-epsilon": [8.0]}, "target-epsilon"),
        ({"text-model": 5}, "text-model"),
        ({"text-model": ["minilm"]}, "text-model"),
        ({"fusion": b"gate"}, "fusion"),
    ],
)
def test_from_flat_rejects_unknown_keys_and_bad_values(values: dict, key: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        RunConfig.from_flat(values)


@pytest.mark.parametrize(
    "key", ["lr", "dropout", "max-grad-norm", "round-timeout", "fraction-train", "server-lr"]
)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", float("nan")])
def test_no_setting_takes_nan_or_infinity(key: str, value) -> None:
    """A float setting at NaN or infinity means nothing (a server's lr of NaN trained a node
    to NaN weights; these were accepted): refused, naming the setting."""
    with pytest.raises(ValueError, match=f"{key}.*(finite|must|expects)"):
        RunConfig.from_flat({key: value})


# (setting, a value it refuses): each was taken, and then failed deep in a run, gave a wrong
# result without a word or waited forever
OUT_OF_RANGE = [
    ("trim-fraction", 0.5),  # the trimmed mean kept no node: every aggregate was zero
    ("trim-fraction", -0.1),  # absent nodes were averaged in as zeros
    ("fraction-train", 1.5),  # Flower waited forever for nodes that did not exist
    ("fraction-train", 0.0),
    ("min-nodes", 6),  # above clients (5): the same wait
    ("min-nodes", 0),
    ("server-lr", 0.0),  # the model never moved
    ("server-lr", -1.0),  # it moved away from what the nodes learnt
    ("row-clip", 0.5),  # the median node itself was cut
    ("row-clip", -1.0),  # taken as off
    ("shift-clip", 0.5),  # the median node's own shift was cut
    ("shift-clip", -1.0),
    ("proximal-mu", -0.01),  # pushed each node away from the global model
    ("dropout", 1.0),  # every activation dropped (above 1 torch failed)
    ("recency", 1.5),  # history weights (1 - recency)^age of alternating sign
    ("recency", -1.0),  # weights growing with age, past float32 in long histories
    ("logit-scale", 0.0),
    ("lr", 0.0),
    ("lr", -0.001),
    ("weight-decay", -0.1),
    ("dp-lr", -2.0),
    ("max-grad-norm", 0.0),
    ("dp-id-scale", 0.0),
    ("seed", -1),  # numpy's generator failed in the partition
    ("seed", 2**63),  # above what Flower's messages carry
    ("epochs", 0),
    ("batch-size", 0),
    ("patience", -1),
    ("dp-batch-size", 0),
    ("dp-epochs", 0),
    ("dp-local-epochs", 0),
    ("dp-encoder-batch", 0),
    ("local-batch-size", 0),  # a division by zero at every node
    ("local-epochs", 0),
    ("max-local-epochs", 0),
    ("local-steps", -1),
    ("clients", 0),
    ("rounds", 0),
    ("dp-rounds", 0),
    ("round-patience", -1),
    ("valid-customers", -1),
    ("text-finetune-layers", -1),
    ("text-finetune-steps", 0),
    ("text-finetune-rounds", 0),
    ("fragment-nodes", -2),
    ("canaries", -1),
    ("round-timeout", -5.0),
    ("catalog-epochs", -1),
    ("epoch-steps", -1),
    ("epoch-tolerance", -0.5),
    ("cold-items", 1.0),
    ("delta", 1.0),
    ("dirichlet-alpha", -1.0),
    ("target-epsilon", 0.0),
    ("node-target-epsilon", 101.0),
    ("fusion", "xor"),  # a node failed building its model
    ("variant", "both"),
    ("dp-train", "everything"),
    ("wire-dtype", "int8"),  # a node's reply rounded to whole numbers
    ("reverse-histories", "2"),
    ("dp-denoise", "yes"),
    ("regions", "north"),
]


@pytest.mark.parametrize(("key", "value"), OUT_OF_RANGE)
def test_a_setting_outside_its_range_is_refused_naming_it_its_value_and_the_range(
    key: str, value: object
) -> None:
    """Range checks live in RunConfig alone: every command, Flower's run config and a node
    reading the server's request refuse the value before anything runs."""
    name = key.replace("-", "_")
    allowed = str(RANGES[name]) if name in RANGES else " or ".join(CHOICES[name][-2:])
    shown = f"{value:g}" if isinstance(value, float) else repr(value)
    with pytest.raises(ValueError) as refused:
        RunConfig.from_flat({key: value})
    message = str(refused.value)
    assert message.startswith(f"{key} must be"), message
    assert allowed in message and message.endswith(f"got {shown}") or "clients (5)" in message


def test_every_range_is_tested_and_its_ends_are_taken() -> None:
    tested = {key for key, _ in OUT_OF_RANGE}
    assert {kebab(name) for name in [*RANGES, *CHOICES]} <= tested
    ends = {
        "trim_fraction": 0.0,
        "row_clip": 1.0,
        "shift_clip": 1.0,
        "fraction_train": 1.0,
        "min_nodes": 5,
        "seed": 2**63 - 1,
        "recency": 1.0,
        "dropout": 0.0,
        "proximal_mu": 0.0,
        "local_steps": 0,
        "epoch_tolerance": 0.0,
    }
    for name, value in ends.items():
        assert getattr(RunConfig(**{name: value}), name) == value
    assert RunConfig(row_clip=0.0).row_clip == 0.0  # off
    assert RunConfig(shift_clip=0.0).shift_clip == 0.0
    assert RunConfig(clients=1, min_nodes=1).min_nodes == 1


def test_from_flat_takes_each_kind_as_text_or_as_itself() -> None:
    config = RunConfig.from_flat(
        {"dim": 16.0, "layers": "2", "dp": 1, "refit": "false", "lr": 3, "target-epsilon": "4.5"}
    )
    assert (config.dim, config.layers, config.dp, config.refit) == (16, 2, True, False)
    assert (config.lr, config.target_epsilon) == (3.0, 4.5)
    assert isinstance(config.dim, int) and isinstance(config.lr, float)


def test_coerce_names_the_key() -> None:
    with pytest.raises(ValueError, match="'rounds' expects int"):
        _coerce("three", int, "rounds")


def test_model_config_uses_the_dp_shape_under_dp() -> None:
    config = RunConfig(max_len=30, dp_max_len=12, dim=24, dp_dim=40)
    assert config.model_config(10, 8).max_len == 30
    private = RunConfig(max_len=30, dp_max_len=12, dim=24, dp_dim=40, dp=True)
    assert (private.model_config(10, 8).max_len, private.model_config(10, 8).dim) == (12, 40)
    model = config.model_config(10, 8)
    assert (model.num_items, model.text_dim, model.dim) == (10, 8, 24)
    # the item biases' scale is the private step's (a reparametrisation, docs/privacy.md)
    assert model.id_scale == 1.0
    assert RunConfig(dp=True, dp_id_scale=7.0).model_config(10, 8).id_scale == 7.0
    for bad in (0.0, float("inf"), float("nan")):  # an operator's value a node would build
        with pytest.raises(ValueError, match="dp-id-scale"):
            RunConfig(dp_id_scale=bad)


# --- command-line help ----------------------------------------------------------------------


def options_of(command: list[str]) -> list[argparse.Action]:
    parser = build_parser(command)
    sub = parser
    for name in command:
        sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[
            name
        ]
    return [a for a in sub._actions if a.option_strings and a.dest != "help"]


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (
            ["train"],
            {
                "--data",
                "--out",
                "--epochs",
                "--dp",
                "--target-epsilon",
                "--delta",
                "--set",
                "--device",
                "--quiet",
            },
        ),
        (
            ["simulate"],
            {
                "--data",
                "--out",
                "--clients",
                "--rounds",
                "--partition",
                "--strategy",
                "--local-epochs",
                "--dp",
                "--target-epsilon",
                "--delta",
                "--set",
                "--device",
                "--quiet",
            },
        ),
    ],
)
def test_help_explains_every_option(command: list[str], expected: set[str], capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        main([*command, "--help"])
    assert stopped.value.code == 0
    text = capsys.readouterr().out
    actions = options_of(command)
    assert expected <= {o for a in actions for o in a.option_strings}  # options
    for action in actions:
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
        assert any(re.search(re.escape(o) + r"\b", text) for o in action.option_strings)
    assert "docs/configuration.md" in text  # where --set's settings are listed


def test_bad_set_is_refused_with_the_key(capsys, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="'layers'"):
        main(
            ["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--set", "layers=two"]
        )
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--set", "layers"])
    with pytest.raises(SystemExit, match="'colour'"):
        main(["simulate", "--out", str(tmp_path / "o"), "--set", "colour=blue"])


def test_a_cold_items_fraction_outside_0_1_is_refused_by_every_command(tmp_path: Path) -> None:
    out = str(tmp_path / "o")
    with pytest.raises(SystemExit, match=r"cold-items must be in \[0, 1\), got 1.5"):
        main(["train", "--data", str(tmp_path), "--out", out, "--set", "cold-items=1.5"])
    with pytest.raises(SystemExit, match=r"--cold-items must be in \[0, 1\), got -0.1"):
        main(["bench", "quality", "--data", str(tmp_path), "--out", out, "--cold-items", "-0.1"])
    assert not (tmp_path / "o").exists()


def test_negative_catalog_epochs_are_refused_before_anything_runs(tmp_path: Path) -> None:
    out = tmp_path / "o"
    with pytest.raises(SystemExit, match=r"catalog-epochs must be 0 \(off\) or at least 1, got -1"):
        main(["train", "--data", str(tmp_path), "--out", str(out), "--set", "catalog-epochs=-1"])
    assert not out.exists()


def test_reversed_histories_are_refused_under_dp_by_every_command(tmp_path: Path) -> None:
    """A reversed copy would be a second sample of the customer, which DP accounts as one."""
    out = str(tmp_path / "o")
    for command in (["train"], ["simulate", "--clients", "2"]):
        with pytest.raises(SystemExit, match="reverse-histories=on makes each customer two"):
            main(
                [
                    *command,
                    "--data",
                    str(tmp_path),
                    "--out",
                    out,
                    "--dp",
                    "--set",
                    "reverse-histories=on",
                ]
            )
    with pytest.raises(SystemExit, match="reverse-histories must be auto, on or off, got '2'"):
        main(["train", "--data", str(tmp_path), "--out", out, "--set", "reverse-histories=2"])
    assert RunConfig(dp=True).reverse_histories == "auto"  # auto: never under DP
    # what a node builds from the server's settings: a server asking for both is refused
    for private in ({"dp": True}, {"node-dp": True}):
        with pytest.raises(ValueError, match="reverse-histories=on"):
            RunConfig.from_flat({**private, "reverse-histories": "on"})
    assert not (tmp_path / "o").exists()


def test_a_federations_nodes_send_counts_only_where_the_server_validates_without_dp() -> None:
    """The popularity prior's counts leave a node only without DP (under DP they would be
    private and unaccounted) and only in a simulation, whose server validates the candidates
    (a deployment's validation is the nodes'), and not when the prior is off."""
    assert RunConfig().counts_popularity
    for off in ({"dp": True}, {"node_dp": True}, {"catalog": "items"}, {"valid_customers": 0}):
        assert not RunConfig(**off).counts_popularity, off
    assert not RunConfig(popularity_prior=False).counts_popularity


def test_rounds_are_a_cap_without_dp_and_exact_under_dp() -> None:
    open_run, private = RunConfig(), RunConfig(dp=True)
    assert open_run.max_rounds == open_run.rounds and open_run.selects_rounds
    assert private.max_rounds == private.dp_rounds and not private.selects_rounds
    assert not RunConfig(node_dp=True).selects_rounds  # node-level DP: fixed rounds too
    # --rounds sets the rounds the run is governed by
    assert open_run.with_rounds(7).rounds == 7
    assert open_run.with_rounds(7).dp_rounds == RunConfig.dp_rounds
    assert private.with_rounds(5).dp_rounds == 5
    assert private.with_rounds(5).rounds == RunConfig.rounds
    assert private.with_rounds(None) == private


def test_train_epochs_are_a_cap_without_dp_and_dp_epochs_under_dp() -> None:
    """``fedrec train --epochs``: the most epochs (validation stops earlier), or under DP the
    exact epochs, ``dp-epochs``, a setting of its own so that each default fits its mode."""
    open_run, private = RunConfig(), RunConfig(dp=True)
    assert open_run.with_epochs(7).epochs == 7
    assert open_run.with_epochs(7).dp_epochs == RunConfig.dp_epochs
    assert private.with_epochs(5).dp_epochs == 5
    assert private.with_epochs(5).epochs == RunConfig.epochs
    assert private.with_epochs(None) == private


def test_the_validation_share_covers_valid_customers() -> None:
    config = RunConfig(valid_customers=2000)
    assert config.valid_fraction(20_000) == pytest.approx(0.1)
    assert config.valid_fraction(1_000) == 1.0  # all of them when fewer
    assert config.valid_fraction(0) == 1.0  # unknown: every validation event
    assert RunConfig(refit=False).valid_fraction(20_000) == 1.0  # none trains on them anyway
    assert RunConfig(valid_customers=0).valid_fraction(20_000) == 0.0  # rounds fixed
    assert RunConfig(dp=True).valid_fraction(20_000) == 0.0


def test_simulate_rounds_govern_dp_rounds_under_dp(tmp_path: Path) -> None:
    from simulations.simulate import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    private = config_from_args(parser.parse_args(["--out", str(tmp_path), "--rounds", "4", "--dp"]))
    assert (private.dp_rounds, private.rounds) == (4, RunConfig.rounds)
    plain = config_from_args(parser.parse_args(["--out", str(tmp_path), "--rounds", "4"]))
    assert (plain.rounds, plain.dp_rounds) == (4, RunConfig.dp_rounds)


def test_a_budget_outside_0_100_or_a_delta_outside_0_1_is_refused_before_anything_runs(
    tmp_path: Path,
) -> None:
    """An epsilon of 1,000 left every node's calibration running for over 15 minutes: a budget
    that large, or none at all, is refused by name before any output exists."""
    out = tmp_path / "o"
    base = ["simulate", "--clients", "2", "--data", str(tmp_path), "--out", str(out), "--dp"]
    with pytest.raises(SystemExit, match=r"target-epsilon must be in \(0, 100\] .*, got 1000"):
        main([*base, "--target-epsilon", "1000"])
    with pytest.raises(SystemExit, match=r"target-epsilon must be in \(0, 100\] .*, got 0"):
        main([*base, "--target-epsilon", "0"])
    with pytest.raises(SystemExit, match=r"node-target-epsilon must be in \(0, 100\] .*, got -1"):
        main([*base, "--set", "node-target-epsilon=-1"])
    with pytest.raises(SystemExit, match=r"delta must be in \[0, 1\) .* got 1"):
        main([*base, "--set", "delta=1"])
    assert not out.exists()
    assert RunConfig(target_epsilon=100.0).target_epsilon == 100.0  # the bound itself is allowed
    # what a node builds from the server's settings: an operator asking more is refused there too
    for hostile in (1000.0, float("nan"), float("inf"), "nan"):
        with pytest.raises(ValueError, match="target-epsilon must be (in|a finite)"):
            RunConfig.from_flat({"dp": True, "target-epsilon": hostile})
    with pytest.raises(ValueError, match="delta must be a finite number"):
        RunConfig.from_flat({"dp": True, "delta": float("nan")})
