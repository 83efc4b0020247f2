"""The command line around the runs: ``--version``, and what ``fedrec simulate`` / ``fedrec
train`` say when OUT already holds a run (decided before anything starts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TEST_DEVICE
from safetensors.torch import save_file

from server.privacy.ledger import PrivacyLedger
from shared import __version__
from shared.runs.outputs import OtherSettings, check_rerun
from simulations import simulate
from simulations.cli import build_parser, main
from simulations.simulate import config_from_args
from simulations.verdict import verdict


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out.strip() == f"fedrec {__version__}"


def simulate_args(out: Path, *extra: str) -> list[str]:
    return ["simulate", "--out", str(out), "--rounds", "2", "--device", TEST_DEVICE, *extra]


def finished_run(out: Path, argv: list[str]) -> None:
    """A finished run's metrics.json in ``out``, with the settings ``argv`` asks for."""
    config = config_from_args(build_parser(argv).parse_args(argv))
    out.mkdir(parents=True)
    test = {"ndcg@10": 0.01, "hr@10": 0.02}
    context = {"popularity": {"ndcg@10": 0.05, "hr@10": 0.1}}
    (out / "metrics.json").write_text(
        json.dumps({"test": test, "config": config.to_dict(), "context": context})
    )


def test_finished_run_with_the_same_settings_is_not_run_again(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    finished_run(out, simulate_args(out))
    assert main(simulate_args(out)) == 0
    printed = capsys.readouterr().out
    assert f"nothing to do: run complete ({out})" in printed
    assert "below popularity" in printed  # the verdict, from the stored metrics


def test_run_with_other_settings_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    finished_run(out, simulate_args(out))
    with pytest.raises(SystemExit, match=r"refused: .* other settings \(rounds: 2 -> 3\)"):
        main([*simulate_args(out), "--rounds", "3"])
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]  # nothing started


def test_unfinished_run_with_other_settings_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    config = config_from_args(build_parser(simulate_args(out)).parse_args(simulate_args(out)))
    progress = {"round": 1, "history": [], "config": config.to_dict(), "trained_rows": []}
    save_file(
        {"model/w": torch.zeros(1)},
        str(out / "checkpoint.safetensors"),
        metadata={"progress": json.dumps(progress)},
    )
    with pytest.raises(SystemExit, match=r"other settings \(clients: 5 -> 3\)"):
        main([*simulate_args(out), "--clients", "3"])


def test_a_run_stopped_before_its_first_checkpoint_is_not_continued_with_other_settings(
    tmp_path: Path,
) -> None:
    """Stopped before its first checkpoint (in its encoder rounds, say), a run left its ledger
    alone, and a start with other settings went on: it continued that ledger and asked the
    nodes for the first start's budget (``--target-epsilon 2`` over a start of 8 asked for
    8's). The ledger's first entry holds the settings it started with: another start with
    other settings is refused before anything is touched; one with the same resumes."""
    out = tmp_path / "run"
    argv = simulate_args(out, "--dp", "--target-epsilon", "8")
    config = config_from_args(build_parser(argv).parse_args(argv))
    ledger = PrivacyLedger(out / "ledger.jsonl")
    ledger.append("run_start", config={**config.to_dict(), "num_nodes": config.clients}, unit="u")
    before = (out / "ledger.jsonl").read_bytes()
    with pytest.raises(SystemExit, match=r"other settings \(target_epsilon: 8.0 -> 2.0\)"):
        main(simulate_args(out, "--dp", "--target-epsilon", "2"))
    assert (out / "ledger.jsonl").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["ledger.jsonl"]  # nothing started
    assert check_rerun(out, config.to_dict()) is False  # the same settings: resumed
    (out / "ledger.jsonl").write_text('{"seq": 0, "kind": "run_start"}\n')
    with pytest.raises(OtherSettings, match="first entry has no settings"):
        check_rerun(out, config.to_dict())


def test_a_run_stored_before_a_setting_existed_resumes_at_its_default(tmp_path: Path) -> None:
    """A federation stopped before an upgrade added a setting (``popularity_prior``, which no
    federation reads) was refused over its OUT: started again elsewhere, a private run would
    spend its nodes' budgets twice. Absent from the stored run, a setting at its default now
    matches; at another value, or any setting the run stored, it is still compared."""
    out = tmp_path / "run"
    argv = simulate_args(out, "--dp", "--target-epsilon", "8")
    config = config_from_args(build_parser(argv).parse_args(argv))
    stored = {k: v for k, v in config.to_dict().items() if k != "popularity_prior"}
    PrivacyLedger(out / "ledger.jsonl").append("run_start", config=stored, unit="u")
    assert check_rerun(out, config.to_dict()) is False  # resumed
    with pytest.raises(OtherSettings, match=r"popularity_prior: None -> False"):
        check_rerun(out, {**config.to_dict(), "popularity_prior": False})
    with pytest.raises(OtherSettings, match=r"target_epsilon: 8.0 -> 2.0"):
        check_rerun(out, {**config.to_dict(), "target_epsilon": 2.0})


def test_verdict_states_the_privacy_guarantee_and_the_audit(tmp_path: Path) -> None:
    (tmp_path / "ledger.jsonl").write_text("")
    metrics = {
        "test": {"ndcg@10": 0.2, "hr@10": 0.3},
        "context": {"popularity": {"ndcg@10": 0.1, "hr@10": 0.2}},
        "privacy": {"epsilon": 8.0, "delta": 1e-5, "unit": "one customer's entire history"},
    }
    lines = verdict(metrics, tmp_path)
    assert not any(line.startswith("below") for line in lines)
    assert lines[-1].startswith("privacy: (8.000, 1e-05)-differential privacy for one customer")
    assert f"fedrec audit {tmp_path}" in lines[-1]


def test_verdict_rounds_the_guarantee_up(tmp_path: Path) -> None:
    """A DP run's ε 7.99489 at δ 3.33e-4 was printed '(7.99, 3.3e-04)': below what was spent."""
    metrics = {
        "test": {"ndcg@10": 0.2, "hr@10": 0.3},
        "privacy": {"epsilon": 7.99489, "delta": 1 / 3000, "unit": "one customer"},
    }
    assert verdict(metrics, tmp_path)[-1].startswith("privacy: (7.995, 0.00034)-differential")


def test_verdict_of_a_run_no_node_contributed_to(tmp_path: Path) -> None:
    """metrics.json of a private run with no contribution states an epsilon (the refused
    claims, the target for unanswered requests) and no delta: the verdict raised KeyError."""
    privacy = {"unit": "u", "per_node": {}, "epsilon": 7.99489, "statement": "No node..."}
    line = verdict({"test": {"ndcg@10": 0.2, "hr@10": 0.3}, "privacy": privacy}, tmp_path)[-1]
    assert line == "privacy: no node contributed; epsilon stated 7.995 (metrics.json)"


def test_verdict_never_calls_a_model_level_with_a_reference_above_it(tmp_path: Path) -> None:
    """A federation whose every node refused ships the public text model: level, not above."""
    context = {
        "popularity": {"ndcg@10": 0.09, "hr@10": 0.19},
        "text_only": {"ndcg@10": 0.2474, "hr@10": 0.3817},
    }
    lines = verdict({"test": {"ndcg@10": 0.2474, "hr@10": 0.3817}, "context": context}, tmp_path)
    assert "above every reference point" not in lines
    assert any(line.startswith("level with") for line in lines), lines
    lines = verdict({"test": {"ndcg@10": 0.25, "hr@10": 0.39}, "context": context}, tmp_path)
    assert lines[-1] == "above every reference point"
    lines = verdict({"test": {"ndcg@10": 0.2, "hr@10": 0.39}, "context": context}, tmp_path)
    assert any(line.startswith("below") for line in lines)


def test_outputs_without_settings_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text('{"test": {}}')
    with pytest.raises(SystemExit, match="refused: .* without their settings"):
        main(simulate_args(out))


@pytest.mark.parametrize("alpha", ["-1", "nan", "inf", "1e308"])
def test_data_split_refuses_a_dirichlet_alpha_that_is_no_skew(
    tiny_synth_dataset_dir: Path, tmp_path: Path, alpha: str
) -> None:
    """A negative alpha was taken as 0 (no skew) without a word; NaN and infinity crashed in
    numpy's sampling with a traceback, and so did 1e308 (its shares overflowed to 0)."""
    out = tmp_path / "pilot"
    argv = ["data", "split", str(tiny_synth_dataset_dir), "--nodes", "2", "--out", str(out)]
    with pytest.raises(SystemExit, match="--dirichlet-alpha must be 0 or a positive number"):
        main([*argv, "--dirichlet-alpha", alpha])
    assert not out.exists()


def test_ray_object_store_fits_a_virtual_memory_limit(monkeypatch):
    """Under ``ulimit -v`` (10 GB here) Ray's default store, 30% of the machine's memory, was
    mapped into every Ray process beside its own memory: "mmap failed", a C++ abort."""
    limit = 10_000_000 * 1024
    monkeypatch.setattr(simulate.resource, "getrlimit", lambda _: (limit, limit))
    assert simulate.backend_config(5, "cpu")["init_args"]["object_store_memory"] == limit // 4
    unlimited = (simulate.resource.RLIM_INFINITY,) * 2
    monkeypatch.setattr(simulate.resource, "getrlimit", lambda _: unlimited)
    assert "object_store_memory" not in simulate.backend_config(5, "cpu")["init_args"]


def test_deploy_states_the_guarantee_and_the_audit_last(tmp_path: Path) -> None:
    """`fedrec deploy local`'s last line stated the nodes' NDCG@10 only: no epsilon, no audit."""
    from simulations.deploy import finished

    (tmp_path / "ledger.jsonl").write_text("")
    privacy = {"epsilon": 7.99489, "delta": 1 / 3000, "unit": "one customer's history at a node"}
    metrics = {"federated_evaluation": [{"ndcg@10": 0.05}], "privacy": privacy}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    lines = finished(tmp_path)
    assert lines[0].startswith("deploy: federated ndcg@10 0.0500; wrote")
    assert lines[-1].startswith(
        "privacy: (7.995, 0.00034)-differential privacy for one customer's history at a node"
    )
    assert lines[-1].endswith(f"check it with: fedrec audit {tmp_path}")
    del metrics["privacy"]  # a run without DP states no guarantee
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert len(finished(tmp_path)) == 1
