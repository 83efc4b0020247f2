"""The node's accountant under concurrent releases (two federations on one data directory):
no charge is lost, no two releases share a contribution index, and the budget is checked
against every charge made before."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

import pytest

from client.accountant import NodePrivacy
from client.node import over_budget

EVENT = (1.0, 1.0, 1)  # one Gaussian release at noise multiplier 1
DELTA = 1e-5


def test_interleaved_releases_are_both_charged(tmp_path: Path) -> None:
    """Two federations read the accountant, then charge it one after the other: the later
    charge re-reads the state under the lock and keeps the earlier one."""
    first, second = NodePrivacy(tmp_path), NodePrivacy(tmp_path)
    _, index_second = second.charge(EVENT, DELTA)
    epsilon, index_first = first.charge(EVENT, DELTA)
    assert (index_second, index_first) == (0, 1)
    saved = NodePrivacy(tmp_path)
    assert saved.state["contributions"] == 2
    assert len(saved.state["accountant"]["history"]) == 2
    one = NodePrivacy(tmp_path / "fresh").epsilon_after(DELTA, EVENT)
    assert epsilon == pytest.approx(saved.epsilon_after(DELTA)) and epsilon > one


def test_the_budget_is_checked_against_a_charge_made_meanwhile(tmp_path: Path) -> None:
    """Two releases with room for one in the budget: the second waits for the first's check
    and charge, then sees that charge and declines."""
    budget = NodePrivacy(tmp_path).epsilon_after(DELTA, EVENT) * 1.01
    outcomes: list[int | str] = []

    def release() -> None:
        privacy = NodePrivacy(tmp_path)
        with privacy.locked():
            if over_budget(privacy, DELTA, budget, EVENT):
                outcomes.append("declined")
                return
            time.sleep(0.2)  # the other release tries to check meanwhile
            outcomes.append(privacy.charge(EVENT, DELTA)[1])

    threads = [threading.Thread(target=release) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(outcomes, key=str) == [0, "declined"]
    assert NodePrivacy(tmp_path).state["contributions"] == 1


def _charge_several(directory: Path, count: int, indices: multiprocessing.Queue) -> None:
    for _ in range(count):
        indices.put(NodePrivacy(directory).charge(EVENT, DELTA)[1])


def test_processes_charging_at_once_lose_nothing(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    indices = context.Queue()
    workers = [
        context.Process(target=_charge_several, args=(tmp_path, 4, indices)) for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    charged = sorted(indices.get(timeout=120) for _ in range(8))
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert charged == list(range(8))
    saved = NodePrivacy(tmp_path)
    assert saved.state["contributions"] == 8
    assert len(saved.state["accountant"]["history"]) == 8
    assert {p.name for p in saved.path.parent.iterdir()} == {"accountant.json", "accountant.lock"}
