"""The ServerApp counts its federation once the nodes have gathered (they register one by one)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from server.federation.server_app import gathered_nodes


class ArrivingGrid:
    """A grid whose nodes connect one per poll, up to ``total``."""

    def __init__(self, total: int, first: int = 1):
        self.total, self.connected = total, first

    def get_node_ids(self) -> list[int]:
        ids = list(range(1, self.connected + 1))
        self.connected = min(self.connected + 1, self.total)
        return ids


def test_waits_for_every_expected_node() -> None:
    # a count taken at once sees one node: the CI run that wrote one partition for two nodes
    assert gathered_nodes(ArrivingGrid(total=3), expected=3, settle_s=math.inf) == 3


def test_a_smaller_federation_is_counted_once_it_holds() -> None:
    assert gathered_nodes(ArrivingGrid(total=2), expected=5, settle_s=0.3) == 2


def test_missing_nodes_time_out_with_what_was_connected() -> None:
    with pytest.raises(TimeoutError, match="2 of the federation's 4 nodes"):
        gathered_nodes(ArrivingGrid(total=2), expected=4, settle_s=math.inf, timeout_s=0.3)


def test_no_node_at_all_is_never_a_federation() -> None:
    with pytest.raises(TimeoutError, match="0 of the federation's 2 nodes"):
        gathered_nodes(ArrivingGrid(total=0, first=0), expected=2, settle_s=0.1, timeout_s=0.3)


def test_fewer_nodes_than_min_nodes_are_refused_before_any_round(
    monkeypatch, tmp_path: Path
) -> None:
    """Two nodes gathered for min-nodes 3: the run's clients became 2 without a check, and
    every round then waited forever for a third node."""
    from server.federation import server_app

    monkeypatch.setattr(server_app, "gathered_nodes", lambda grid, expected: 2)
    monkeypatch.setattr(server_app, "main_with", lambda *args, **kw: pytest.fail("it ran"))
    context = SimpleNamespace(run_config={"min-nodes": 3, "out": str(tmp_path / "run")})
    with pytest.raises(ValueError, match=r"min-nodes must be at most clients \(2\), got 3"):
        server_app.main(ArrivingGrid(total=2), context)
