"""A run's outputs survive crashes and stay their owner's: checkpoints, model/, metrics.json,
the lock on OUT, the ledger's repair, and owner-only permissions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_model

from server.privacy.ledger import LedgerError, PrivacyLedger
from server.privacy.ledger_repair import repair
from shared.data.dataset import load_dataset
from shared.data.partition import write_partitions
from shared.recommender.artifacts import save_model, write_json
from shared.runs.checkpoint import Checkpoint, CheckpointError
from shared.runs.durable import RunLock
from simulations.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def loose_umask():
    """A umask that would let other users read what is created: the code must not rely on it."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def save_rounds(checkpoint: Checkpoint, rounds: int) -> None:
    for number in range(1, rounds + 1):
        state = {"w": torch.full((3,), float(number))}
        checkpoint.save(state, {"m": torch.zeros(3)}, {"round": number})


def test_a_torn_checkpoint_falls_back_to_the_previous(tmp_path: Path) -> None:
    checkpoint = Checkpoint(tmp_path / "checkpoint.safetensors")
    save_rounds(checkpoint, 2)
    latest = tmp_path / "checkpoint.safetensors"
    latest.write_bytes(latest.read_bytes()[:40])  # a crash mid-write
    state, _, progress = Checkpoint(latest).load()
    assert progress["round"] == 1 and state["w"].tolist() == [1.0, 1.0, 1.0]
    assert mode(latest.with_name("checkpoint.prev.safetensors")) == 0o600


def test_a_resumed_run_never_keeps_a_torn_checkpoint_as_the_previous(tmp_path: Path) -> None:
    latest = tmp_path / "checkpoint.safetensors"
    save_rounds(Checkpoint(latest), 2)
    latest.write_bytes(b"torn")
    resumed = Checkpoint(latest)
    assert resumed.load()[2]["round"] == 1
    resumed.save({"w": torch.zeros(3)}, {}, {"round": 2})
    assert Checkpoint(latest.with_name("checkpoint.prev.safetensors")).load()[2]["round"] == 1


def test_no_readable_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    latest = tmp_path / "checkpoint.safetensors"
    save_rounds(Checkpoint(latest), 2)
    for path in (latest, latest.with_name("checkpoint.prev.safetensors")):
        path.write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="checkpoint.safetensors.*checkpoint.prev"):
        Checkpoint(latest).load()


def test_a_non_finite_state_is_never_saved(tmp_path: Path) -> None:
    checkpoint = Checkpoint(tmp_path / "checkpoint.safetensors")
    save_rounds(checkpoint, 1)
    with pytest.raises(CheckpointError, match="non-finite.*model/w"):
        checkpoint.save({"w": torch.tensor([1.0, float("nan")])}, {}, {"round": 2})
    with pytest.raises(CheckpointError, match="optimizer/m"):
        checkpoint.save({"w": torch.ones(2)}, {"m": torch.tensor([float("inf")])}, {"round": 2})
    assert checkpoint.load()[2]["round"] == 1


def test_a_second_run_on_the_same_out_is_refused_while_the_first_holds_it(
    tmp_path: Path,
) -> None:
    second = (
        "import sys\nfrom shared.runs.durable import RunLock, OutputInUse\n"
        "try:\n    RunLock(sys.argv[1]).__enter__()\n"
        "except OutputInUse as error:\n    sys.exit(str(error))\n"
    )
    command = [sys.executable, "-c", second, str(tmp_path)]
    with RunLock(tmp_path):
        refused = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0
        assert f"pid {os.getpid()}" in refused.stderr and "another --out" in refused.stderr
    assert subprocess.run(command, cwd=ROOT, timeout=60).returncode == 0  # released
    assert mode(tmp_path) == 0o700 and mode(tmp_path / ".lock") == 0o600


def ledger_with_entries(out: Path, count: int) -> bytes:
    ledger = PrivacyLedger(out / "ledger.jsonl")
    ledger.append("run_start", config={}, unit="a node")
    for number in range(count - 1):
        ledger.append("refused", round=number + 1, node="7", reason="policy")
    return (out / "ledger.jsonl").read_bytes()


def test_ledger_repair_removes_a_torn_tail_and_keeps_every_entry(tmp_path: Path) -> None:
    whole = ledger_with_entries(tmp_path, 3)
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(whole + b'{"seq":3,"kind":"ref')  # a crash mid-append
    with pytest.raises(LedgerError, match="fedrec ledger repair"):
        PrivacyLedger(path)  # the resume refusal names the command
    assert main(["ledger", "repair", str(tmp_path)]) == 0
    assert path.read_bytes() == whole and mode(path) == 0o600
    (backup,) = tmp_path.glob("ledger.jsonl.torn-*")
    assert backup.read_bytes().endswith(b'"ref') and mode(backup) == 0o600
    assert len(PrivacyLedger(path).entries) == 3  # resumable
    assert main(["ledger", "repair", str(tmp_path)]) == 0  # nothing left to repair


def test_ledger_repair_ends_a_complete_last_line_instead_of_dropping_it(tmp_path: Path) -> None:
    whole = ledger_with_entries(tmp_path, 2)
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(whole[:-1])  # the crash came just before the end of line
    with pytest.raises(LedgerError, match="fedrec ledger repair"):
        PrivacyLedger(path)  # appending would glue the next entry onto it
    assert "ended the complete last line 2" in repair(tmp_path)
    assert path.read_bytes() == whole


def test_ledger_repair_refuses_damage_inside_the_ledger(tmp_path: Path, capsys) -> None:
    lines = ledger_with_entries(tmp_path, 3).split(b"\n")
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(b"\n".join([lines[0], lines[1][:30], *lines[2:]]))
    assert main(["ledger", "repair", str(tmp_path)]) == 1
    assert "line 2 of 3" in capsys.readouterr().err
    entries = [json.loads(line) for line in lines[:-1]]
    entries[1]["reason"] = "edited"  # whole lines, but the chain is broken: not a torn tail
    path.write_text("".join(json.dumps(e) + "\n" for e in entries) + '{"torn')
    with pytest.raises(LedgerError, match="would not verify"):
        repair(tmp_path)
    assert not list(tmp_path.glob("ledger.jsonl.torn-*"))  # refused: nothing touched
    assert path.read_text().endswith('{"torn')


def test_created_outputs_are_the_owners_only(tmp_path: Path, tiny_synth_dataset_dir: Path) -> None:
    out = tmp_path / "out"
    with RunLock(out):
        write_json(out / "metrics.json", {"a": 1})
        save_model(out / "model", tiny_model(), np.arange(40), "minilm", "# card\n")
        PrivacyLedger(out / "ledger.jsonl").append("run_start", config={}, unit="a node")
    directories = write_partitions(load_dataset(tiny_synth_dataset_dir), out / "partitions", 2)
    created = [out, out / "model", *directories]
    created += [p for d in created for p in d.iterdir()]
    loose = {str(p): oct(mode(p)) for p in created if mode(p) != (0o700 if p.is_dir() else 0o600)}
    assert not loose


def test_an_existing_out_is_narrowed_to_its_owner(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir(mode=0o755)
    out.chmod(0o755)
    with RunLock(out):
        pass
    assert mode(out) == 0o700


def test_a_failed_model_write_leaves_the_old_model_whole(tmp_path: Path, monkeypatch) -> None:
    import shared.recommender.artifacts

    save_model(tmp_path / "model", tiny_model(), np.arange(40), "minilm", "# old\n")
    before = {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()}
    retrained = tiny_model()
    with torch.no_grad():
        retrained.id_scores.bias.add_(1.0)

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    # after the weights are written
    monkeypatch.setattr(shared.recommender.artifacts, "write_json", crash)
    with pytest.raises(OSError, match="disk full"):
        save_model(tmp_path / "model", retrained, np.arange(40), "minilm", "# new\n")
    assert {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no leftovers
