"""Ctrl-C during ``fedrec simulate`` (simulations/simulate.py, simulations/interrupt.py): one
stops the run and every process it started, says where the spending is and how to resume, and
the same command resumes it to a ledger the audit passes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TINY

from server.privacy.ledger import read_ledger, verify_chain
from server.privacy.ledger_gaps import outstanding_requests
from simulations.cli import main

ROOT = Path(__file__).resolve().parents[2]


def session_processes(session: int) -> list[int]:
    """The processes of ``session`` still running (what Ctrl-C in a terminal reaches)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # ended while we looked
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == session and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def contributions(ledger: Path) -> int:
    """How many releases ``ledger`` holds so far (0 before it exists)."""
    if not ledger.exists():
        return 0
    kinds = [line.partition('"kind":')[2][:20] for line in ledger.read_text().splitlines()]
    return sum("contribution" in kind for kind in kinds)


@pytest.mark.e2e
def test_one_ctrl_c_stops_simulate_and_the_same_command_resumes(
    tiny_synth_dataset_dir: Path, tmp_path: Path
) -> None:
    """Ctrl-C printed about 80 lines of Ray and Flower tracebacks and waited for a second one."""
    out = tmp_path / "run"
    argv = ["simulate", "--data", str(tiny_synth_dataset_dir), "--out", str(out)]
    argv += ["--clients", "2", "--rounds", "2", "--dp", "--target-epsilon", "3", *TINY]
    run = subprocess.Popen(
        [sys.executable, "-m", "simulations.cli", *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own session and process group, as a terminal's command
    )
    try:
        deadline = time.monotonic() + 600
        while contributions(out / "ledger.jsonl") < 2 and time.monotonic() < deadline:
            assert run.poll() is None, run.communicate()
            time.sleep(0.2)
        time.sleep(1.0)  # round 2 under way
        os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
        stopped = time.monotonic()
        _, stderr = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    lines = stderr.strip().splitlines()
    assert run.returncode == 130, stderr
    assert len(lines) < 15 and "Traceback" not in stderr, stderr
    assert f"{out / 'ledger.jsonl'} (nothing is lost)" in stderr
    assert lines[-1] == f"resume with the same command: fedrec {' '.join(argv)}"
    while session_processes(run.pid) and time.monotonic() - stopped < 60:
        time.sleep(0.5)
    assert session_processes(run.pid) == [], "a process of the run outlived it"
    assert verify_chain(read_ledger(out / "ledger.jsonl")) == []
    assert not (out / "metrics.json").exists()  # stopped, not finished
    assert main(argv) == 0  # the same command resumes
    assert json.loads((out / "metrics.json").read_text())["privacy"]
    # the request in flight at the stop (ledgered before it left) is settled by the nodes'
    # releases after the resume: nothing is left counted as spent beyond what was spent
    assert outstanding_requests(read_ledger(out / "ledger.jsonl")) == {}
    assert main(["audit", str(out)]) == 0
