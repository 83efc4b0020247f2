"""Bad input everywhere: malformed data files and run settings get a clear error (what is wrong
and where) from every command that reads them, a non-zero exit, and leave nothing behind: no
output directory where there was none, an earlier run's output untouched, the input unchanged.

The cases are counted (``test_the_cases_are_counted``; docs/deployment.md quotes the count).
Malformed API requests to ``fedrec serve`` are covered in tests/server/test_search_service.py.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from helpers import TEST_DEVICE

from client.policy import parse_node_config
from shared.runs.config import RunConfig
from simulations.cli import main
from simulations.deploy import unloadable_text_model


def _rewrite(table: str, change: Callable[[pd.DataFrame], pd.DataFrame]):
    def mutate(directory: Path) -> None:
        path = directory / f"{table}.csv.gz"
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        path.unlink()
        change(frame).to_csv(directory / f"{table}.csv", index=False)

    return mutate


def _cell(column: str, value: str, row: int = 3):
    def change(frame: pd.DataFrame) -> pd.DataFrame:
        frame.loc[row, column] = value
        return frame

    return change


def _replace_file(name: str, content: bytes):
    def mutate(directory: Path) -> None:
        for old in directory.glob(f"{name.split('.')[0]}.*"):
            old.unlink()
        (directory / name).write_bytes(content)

    return mutate


# (case, how the dataset is spoiled, what the error must say)
DATA_CASES = [
    (
        "interactions lack user_id",
        _rewrite("interactions", lambda f: f.drop(columns="user_id")),
        "missing required column",
    ),
    (
        "items lack title",
        _rewrite("items", lambda f: f.drop(columns="title")),
        "missing required column",
    ),
    (
        "bad header",
        _rewrite("interactions", lambda f: f.set_axis(["usr", *f.columns[1:]], axis=1)),
        "missing required column",
    ),
    (
        "unparseable timestamp",
        _rewrite("interactions", _cell("timestamp", "next tuesday")),
        "unparseable timestamp",
    ),
    (
        "unknown item",
        _rewrite("interactions", _cell("item_id", "no-such-product")),
        "not in the items table",
    ),
    ("unknown event", _rewrite("interactions", _cell("event", "teleport")), "unknown event"),
    ("empty user_id", _rewrite("interactions", _cell("user_id", "")), "empty user_id"),
    ("item listed twice", _rewrite("items", lambda f: pd.concat([f, f.iloc[:1]])), "appears twice"),
    ("empty interactions file", _replace_file("interactions.csv", b""), "empty"),
    (
        "header but no rows",
        _replace_file("interactions.csv", b"user_id,item_id,timestamp\n"),
        "no rows",
    ),
    (
        "not a gzip file",
        _replace_file("interactions.csv.gz", b"\x00garbage\xff" * 10),
        "cannot be parsed",
    ),
    (
        "corrupt gzip",
        _replace_file("interactions.csv.gz", gzip.compress(b"a,b\n1,2\n")[:-9]),
        "cannot be parsed",
    ),
    ("no items table", lambda d: next(d.glob("items.*")).unlink(), "no items table"),
]
# commands that read a dataset; {data} and {out} are filled in
DATA_COMMANDS = {
    "validate": ["data", "validate", "{data}"],
    "train": ["train", "--data", "{data}", "--out", "{out}", "--device", TEST_DEVICE, "--quiet"],
    "deploy": ["deploy", "local", "--data", "{data}", "--out", "{out}", "--nodes", "2", "--quiet"],
}
# (case, settings, what the error must say)
CONFIG_CASES = [
    ("unknown setting", ["--set", "learning_rate=1"], "unknown setting"),
    ("not an integer", ["--set", "layers=two"], "expects int"),
    ("not a number", ["--set", "lr=fast"], "expects float"),
    ("not a boolean", ["--set", "dp=maybe"], "expects true/false"),
    ("no value", ["--set", "dim"], "KEY=VALUE"),
    ("unknown strategy", ["--set", "strategy=krum"], "strategy must be one of"),
    ("unknown partition", ["--set", "partition=zip"], "partition must be one of"),
    ("unknown fusion", ["--set", "fusion=xor"], "fusion must be gated, sum or concat"),
    ("unknown wire dtype", ["--set", "wire_dtype=int8"], "wire-dtype must be float32 or float16"),
    ("zero rounds", ["--set", "rounds=0"], "rounds must be at least 1"),
    ("negative round timeout", ["--set", "round_timeout=-5"], "round-timeout"),
    (
        "encoder rounds under node-level DP",
        ["--set", "node_dp=true", "--set", "text_finetune_layers=1"],
        "node-level DP are not built",
    ),
    ("no encoder rounds", ["--set", "text_finetune_rounds=0"], "text-finetune-rounds"),
    ("unknown attack", ["--set", "attack=flood"], "attack"),
    ("cold items out of range", ["--set", "cold-items=1.5"], "cold-items must be in [0, 1)"),
    # a trimmed mean that keeps no node (every aggregate zero), rounds waiting forever
    ("trimming every node", ["--set", "trim-fraction=0.5"], "trim-fraction must be in [0, 0.5)"),
    ("more nodes than exist", ["--set", "fraction-train=1.5"], "fraction-train must be in (0, 1]"),
    ("min-nodes above the nodes", ["--set", "min-nodes=3"], "min-nodes must be at most clients"),
    ("a device nobody has", ["--device", "cuda:99"], "this machine has"),
    (  # every node would refuse such answers (or the server would discard them, charged)
        "evaluation noise the server does not account",
        ["--set", "dp=true", "--set", "eval-noise-multiplier=1e7"],
        "eval-noise-multiplier must be in [0.001, 1e+06] under dp",
    ),
    (
        "guard noise the server does not account",
        ["--set", "dp=true", "--set", "dp-guard-noise-scale=2e6"],
        "dp-guard-noise-scale must be in (0, 1e+06] under dp",
    ),
]
CONFIG_COMMANDS = {
    "simulate": ["simulate", "--data", "{data}", "--out", "{out}", "--clients", "2", "--quiet"],
    "deploy": ["deploy", "local", "--data", "{data}", "--out", "{out}", "--nodes", "2", "--quiet"],
}


def snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def run_failing(argv: list[str], capsys) -> str:
    """Run a command that must fail; returns everything it said (output, error, exit)."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as stopped:
        code = stopped.code
    said = capsys.readouterr()
    assert code not in (0, None), argv
    return f"{said.out}\n{said.err}\n{code}"


@pytest.fixture(scope="module")
def clean_copy(tiny_synth_dataset_dir: Path) -> Callable[[Path], Path]:
    import shutil

    def copy(target: Path) -> Path:
        return Path(shutil.copytree(tiny_synth_dataset_dir, target))

    return copy


@pytest.mark.parametrize("command", DATA_COMMANDS)
@pytest.mark.parametrize(("case", "spoil", "message"), DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_a_malformed_dataset_is_refused_and_leaves_nothing(
    clean_copy, tmp_path: Path, capsys, case: str, spoil, message: str, command: str
) -> None:
    data = clean_copy(tmp_path / "data")
    spoil(data)
    before = snapshot(data)
    out = tmp_path / "out"
    argv = [a.format(data=data, out=out) for a in DATA_COMMANDS[command]]
    said = run_failing(argv, capsys)
    assert message in said, said
    assert str(data) in said  # where: the dataset (or the file in it)
    assert not out.exists()  # no partial output
    assert snapshot(data) == before  # the input is never touched


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
@pytest.mark.parametrize(
    ("case", "settings", "message"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES]
)
def test_bad_settings_are_refused_and_leave_nothing(
    tiny_synth_dataset_dir: Path,
    tmp_path: Path,
    capsys,
    case: str,
    settings: list[str],
    message: str,
    command: str,
) -> None:
    out = tmp_path / "out"
    argv = [a.format(data=tiny_synth_dataset_dir, out=out) for a in CONFIG_COMMANDS[command]]
    said = run_failing(argv + settings, capsys)
    assert message in said, said
    assert not out.exists()


def test_deploy_local_refuses_a_text_model_its_nodes_would_not_load(
    tiny_synth_dataset_dir: Path, tmp_path: Path, capsys
) -> None:
    """A deployed node loads only the text models its policy lists (minilm by default): a
    run naming another would be refused by every node, so deploy local says so, and how to
    list it, before anything starts; with the model listed it goes past that check."""
    out, model = tmp_path / "out", str(tmp_path / "bert")
    argv = [a.format(data=tiny_synth_dataset_dir, out=out) for a in CONFIG_COMMANDS["deploy"]]
    said = run_failing([*argv, "--set", f"text-model={model}"], capsys)
    assert f'--node-config "text-models=minilm,{model}"' in said, said
    assert not out.exists()
    asked = RunConfig(text_model=model)
    assert unloadable_text_model(asked, parse_node_config(f"text-models=minilm,{model}")) is None
    assert unloadable_text_model(RunConfig(), {}) is None  # the packaged model: loaded


def test_a_refused_run_leaves_an_earlier_output_as_it_was(
    tiny_synth_dataset_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    (out / "metrics.json").write_text('{"test": {}}')
    (out / "ledger.jsonl").write_text("")
    before = snapshot(out)
    for command in CONFIG_COMMANDS.values():
        argv = [a.format(data=tiny_synth_dataset_dir, out=out) for a in command]
        run_failing(argv + ["--set", "strategy=krum"], capsys)
        assert snapshot(out) == before and sorted(out.iterdir()) == sorted(
            [out / "model", out / "metrics.json", out / "ledger.jsonl"]
        )


def test_the_cases_are_counted() -> None:
    data = len(DATA_CASES) * len(DATA_COMMANDS)
    config = len(CONFIG_CASES) * len(CONFIG_COMMANDS)
    assert (len(DATA_CASES), len(CONFIG_CASES), data + config + 1) == (13, 21, 82)
