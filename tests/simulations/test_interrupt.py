"""Ctrl-C during ``fedrec simulate`` (simulations/simulate.py, simulations/interrupt.py): one
stops the run and every process it started, says where the spending is and how to resume, and
the same command resumes it to a ledger the audit passes. What Ray's workers print as they are
stopped is not shown (shared/runs/quiet.py:show_worker_output)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import TINY

from server.privacy.ledger import read_ledger, verify_chain
from server.privacy.ledger_gaps import outstanding_requests
from shared.runs.quiet import show_worker_output
from simulations.cli import main
from simulations.simulate import stopping

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


def ray_logs(session: int) -> Path | None:
    """The log folder of the Ray that ``session`` runs (its raylet's ``--log_dir``), if any."""
    for pid in session_processes(session):
        with contextlib.suppress(OSError):  # ended while we looked
            for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                if arg.startswith(b"--log_dir="):
                    return Path(arg.removeprefix(b"--log_dir=").decode())
    return None


def forward(line: str) -> None:
    """``line`` as Ray forwards a line a node's worker wrote to its stderr to the driver's."""
    from ray._private.worker import print_to_stdstream

    batch = {"ip": "", "localhost": "", "pid": 4242, "job": "", "is_err": True}
    batch |= {"actor_name": "ClientAppActor", "task_name": "", "lines": [line]}
    print_to_stdstream(batch, ignore_prefix=False)


def contributions(ledger: Path) -> int:
    """How many releases ``ledger`` holds so far (0 before it exists)."""
    if not ledger.exists():
        return 0
    kinds = [line.partition('"kind":')[2][:20] for line in ledger.read_text().splitlines()]
    return sum("contribution" in kind for kind in kinds)


@pytest.mark.e2e
def test_one_ctrl_c_stops_simulate_and_the_same_command_resumes(
    tiny_synth_dataset_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture
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
        deadline, logs = time.monotonic() + 600, None
        while contributions(out / "ledger.jsonl") < 2 and time.monotonic() < deadline:
            assert run.poll() is None, run.communicate()
            logs = logs or ray_logs(run.pid)
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
    # Ray started no worker ahead of the nodes' own (job ffffffff): it stopped those as idle,
    # and their exit printed Ray's crash report at times, in the middle of the run
    assert logs is not None and list(logs.glob("worker-*-01000000-*.err"))
    assert list(logs.glob("worker-*-ffffffff-*.err")) == []
    assert verify_chain(read_ledger(out / "ledger.jsonl")) == []
    assert not (out / "metrics.json").exists()  # stopped, not finished
    assert main(argv) == 0  # the same command resumes
    forward("a worker's line after the run")  # shown again once the engine is down
    assert "a worker's line after the run" in capfd.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["privacy"]
    # the request in flight at the stop (ledgered before it left) is settled by the nodes'
    # releases after the resume: nothing is left counted as spent beyond what was spent
    assert outstanding_requests(read_ledger(out / "ledger.jsonl")) == {}
    assert main(["audit", str(out)]) == 0


def test_what_rays_workers_print_is_not_shown_once_the_stop_begins(
    capfd: pytest.CaptureFixture,
) -> None:
    """A Ray worker aborting as it was stopped (Ray's own "Mutex corrupt" check) printed 17
    lines of crash report around fedrec's stop message."""
    flower = logging.getLogger("flwr")
    level = flower.level
    forward("an error before the stop")
    try:
        stopping(threading.Event())(signal.SIGINT, None)
        forward("Mutex corrupt: waiting writer with no waiters")
    finally:  # what fedrec simulate does once its engine is down (the test above checks it)
        flower.setLevel(level)
        show_worker_output(True)
    err = capfd.readouterr().err
    assert "an error before the stop" in err and "fedrec: stopping the federation" in err
    assert "Mutex corrupt" not in err


def test_a_run_shows_its_workers_whatever_an_earlier_runs_server_left(
    tmp_path: Path, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flower does not wait for the ServerApp's thread: one that ended after its engine turned
    Ray's worker output off for the next run in the same process, whose nodes' errors then
    went unseen."""
    import flwr.simulation

    def engine(**kwargs) -> None:
        forward("a node's error in this run")
        raise RuntimeError("the engine failed")

    monkeypatch.setattr(flwr.simulation, "run_simulation", engine)
    show_worker_output(False)  # what an earlier run's late ServerApp thread left
    try:
        with pytest.raises(RuntimeError, match="the engine failed"):
            main(["simulate", "--out", str(tmp_path / "run"), "--clients", "2", "--quiet"])
    finally:
        show_worker_output(True)
    assert "a node's error in this run" in capfd.readouterr().err
