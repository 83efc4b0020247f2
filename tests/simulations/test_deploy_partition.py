"""`fedrec deploy local` over node directories split by merchant: a merchant federation."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.federation.node_directory import NodeInfo
from shared.runs.config import RunConfig
from simulations.cli import main
from simulations.deploy import with_nodes_partition


def node_dirs(tmp_path: Path, partition: str) -> list[Path]:
    """A catalog and two node directories whose node.json name ``partition``."""
    (tmp_path / "catalog").mkdir()
    nodes = []
    for k in (1, 2):
        directory = tmp_path / f"node-{k}"
        directory.mkdir()
        NodeInfo(f"{partition}-{k}", partition, None, 100).write(directory)
        nodes.append(directory)
    return nodes


def test_merchant_split_nodes_make_a_merchant_federation(tmp_path, capsys) -> None:
    """The documented pilot (split --partition merchant, deploy without --set partition) ran as
    regional: each merchant spent ε 8, and the audit passed 7.997 as the guarantee of a
    customer who had spent 11.9 at both."""
    nodes = node_dirs(tmp_path, "merchant")
    overrides = with_nodes_partition(["dp=true"], RunConfig(), nodes)
    assert RunConfig.from_flat(dict(o.split("=") for o in overrides)).partition == "merchant"
    assert "merchant federation" in capsys.readouterr().out


def test_regional_split_nodes_are_left_as_set(tmp_path) -> None:
    nodes = node_dirs(tmp_path, "regional")
    assert with_nodes_partition(["dp=true"], RunConfig(), nodes) == ["dp=true"]


def test_regional_set_for_merchant_split_nodes_is_refused_before_anything_starts(
    tmp_path, capsys
) -> None:
    nodes = node_dirs(tmp_path, "merchant")
    argv = ["deploy", "local", "--catalog", str(tmp_path / "catalog"), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as refused:
        main([*argv, "--node-data", *map(str, nodes), "--set", "partition=regional"])
    assert "split by merchant" in str(refused.value) and "partition=regional" in str(refused.value)
    assert not (tmp_path / "o").exists()


def test_a_resumed_deploy_checks_min_nodes_against_its_split(tmp_path, capsys) -> None:
    """A run resumed over its OUT/split of 4 nodes, without --nodes (3 by default): min-nodes
    was checked against 3 nodes, so min-nodes=4, which the run had started with, was refused."""
    out = tmp_path / "o"
    for k in (1, 2, 3, 4):
        (out / "split" / f"node-{k}").mkdir(parents=True)
    try:
        status = main(["deploy", "local", "--out", str(out), "--set", "min-nodes=5"])
    except SystemExit as refused:
        status = str(refused)
    said = f"{status} {capsys.readouterr().err}"
    assert "min-nodes must be at most clients (4), got 5" in said
