"""The benchmarks: the baselines (simulations/baselines.py), ``fedrec bench quality``,
``fedrec bench privacy``, ``scale`` and ``dp-cost`` on the small synthetic marketplace."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TEST_DEVICE, TINY

from shared.data.dataset import load_dataset
from shared.recommender.experiment import Experiment
from shared.recommender.metrics import METRICS, evaluate
from shared.runs.config import RunConfig
from simulations.baselines import baselines, text_only
from simulations.bench.privacy import parse_customers, parse_epsilons, sample_for
from simulations.cli import main

BASELINES = {"popularity", "als", "itemknn", "text", "late_fusion"}


def tiny_curve(data: Path, out: Path) -> list[str]:
    """``fedrec bench privacy`` at one epsilon, 2 nodes, 1 round and a tiny model."""
    return [
        *("bench", "privacy", "--data", str(data), "--out", str(out), "--epsilons", "4"),
        *("--variants", "text", "--clients", "2", "--rounds", "1", "--quiet"),
        *("--set", "dim=16", "--set", "dp_dim=16", "--set", "layers=1"),
        *("--set", "max_len=10", "--set", "dp_max_len=10"),
    ]


@pytest.fixture(scope="module")
def experiment(synth_dataset_dir: Path) -> Experiment:
    return Experiment.prepare(synth_dataset_dir, RunConfig(), show_progress=False)


@pytest.fixture(scope="module")
def fitted(experiment: Experiment) -> dict:
    """name -> (test-stage score_fn, chosen settings)."""
    return {name: (fn, params) for name, fn, params in baselines(experiment)}


def ndcg(score_fn, split, stage: str = "test") -> float:
    return evaluate(score_fn, split, stage)[0]["ndcg@10"]


def test_every_baseline_beats_random_ranking(experiment, fitted):
    generator = torch.Generator().manual_seed(0)

    def random_scores(users, histories):
        return torch.rand(len(histories), experiment.split.num_items, generator=generator)

    chance = ndcg(random_scores, experiment.split)
    assert set(fitted) == BASELINES
    for name, (score_fn, _) in fitted.items():
        assert ndcg(score_fn, experiment.split) > 1.5 * chance, name


def test_text_baseline_ranks_like_the_untrained_model(experiment, fitted):
    recency = fitted["text"][1]["recency"]
    model_run = dataclasses.replace(
        experiment, config=dataclasses.replace(experiment.config, recency=recency)
    )
    _, model_top = model_run.evaluate(model_run.new_model(), "test")
    _, text_top = evaluate(text_only(experiment.text, recency), experiment.split, "test")
    agreement = np.mean(
        [len(set(a[:10]) & set(b[:10])) / 10 for a, b in zip(model_top, text_top, strict=True)]
    )
    assert agreement > 0.9  # the model keeps the catalog's top `dim` text directions


def test_settings_are_chosen_without_reading_test_targets(experiment, fitted):
    split = experiment.split
    rng = np.random.default_rng(1)
    scrambled = np.where(
        split.test_target >= 0, rng.integers(0, split.num_items, len(split.test_target)), -1
    )
    patched = dataclasses.replace(
        experiment, split=dataclasses.replace(split, test_target=scrambled)
    )
    chosen = {name: params for name, _, params in baselines(patched)}
    assert chosen == {name: params for name, (_, params) in fitted.items()}
    assert {"weight", "recency"} <= set(chosen["late_fusion"])
    # the patch did change what the test split says
    late_fusion = fitted["late_fusion"][0]
    assert ndcg(late_fusion, patched.split) < ndcg(late_fusion, split)


@pytest.mark.e2e
def test_bench_quality_reports_every_method_and_metric(synth_dataset_dir, tmp_path):
    out = tmp_path / "quality.json"
    assert (
        main(
            [
                "bench",
                "quality",
                "--data",
                str(synth_dataset_dir),
                "--out",
                str(out),
                "--skip-model",
                "--quiet",
            ]
        )
        == 0
    )
    methods = json.loads(out.read_text())["methods"]
    assert set(methods) == BASELINES
    for result in methods.values():
        assert set(METRICS) <= set(result["test"])
        assert result["wall_s"] >= 0
        assert "cold" not in result["test"]


@pytest.mark.e2e
def test_bench_quality_cold_items_reports_cold_and_warm_views(synth_dataset_dir, tmp_path):
    out = tmp_path / "cold.json"
    assert (
        main(
            [
                "bench",
                "quality",
                "--data",
                str(synth_dataset_dir),
                "--out",
                str(out),
                "--skip-model",
                "--cold-items",
                "0.2",
                "--quiet",
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["cold_items"] == 60
    for result in report["methods"].values():
        test = result["test"]
        assert test["cold"]["users"] > 0
        assert test["cold"]["users"] + test["warm"]["users"] == test["users"]
        assert set(METRICS) <= set(test["cold"]) & set(test["warm"])
    methods = report["methods"]
    assert methods["als"]["test"]["cold"]["hr@20"] == pytest.approx(0.0, abs=0.01)
    assert methods["als"]["test"]["warm"]["ndcg@10"] > 0.02
    assert methods["text"]["test"]["cold"]["ndcg@10"] > 0.05  # text needs no interactions


@pytest.mark.e2e
def test_bench_quality_new_item_boosts_trade_warm_for_cold(synth_dataset_dir, tmp_path):
    out = tmp_path / "boost.json"
    assert (
        main(
            [
                "bench",
                "quality",
                "--data",
                str(synth_dataset_dir),
                "--out",
                str(out),
                "--cold-items",
                "0.2",
                "--variants",
                "fusion",
                "--baselines",
                "",
                "--new-item-boosts",
                "8",
                *TINY,
                "--set",
                "epochs=2",
            ]
        )
        == 0
    )
    methods = json.loads(out.read_text())["methods"]
    plain, boosted = methods["model:fusion"], methods["model:fusion boost 8"]
    assert plain["params"]["new_item_boost"] == 0 and boosted["params"]["new_item_boost"] == 8
    # a large boost puts the held-out products first: more cold hits, fewer warm ones
    assert boosted["test"]["cold"]["hr@20"] > plain["test"]["cold"]["hr@20"]
    assert boosted["test"]["warm"]["hr@20"] < plain["test"]["warm"]["hr@20"]


def test_new_item_boosts_need_held_out_items(synth_dataset_dir, tmp_path, capsys):
    with pytest.raises(SystemExit, match="needs --cold-items"):
        main(
            [
                "bench",
                "quality",
                "--data",
                str(synth_dataset_dir),
                "--out",
                str(tmp_path / "x.json"),
                "--skip-model",
                "--new-item-boosts",
                "1",
                "--quiet",
            ]
        )
    assert not (tmp_path / "x.json").exists()


def test_parse_epsilons():
    assert parse_epsilons("1, 2.5,none") == [1.0, 2.5, None]
    with pytest.raises(argparse.ArgumentTypeError, match="positive"):
        parse_epsilons("0")


def test_parse_customers():
    assert parse_customers("4000, all") == [4000, None]
    with pytest.raises(argparse.ArgumentTypeError, match="customer count"):
        parse_customers("0")
    with pytest.raises(argparse.ArgumentTypeError, match="customer count"):
        parse_customers("4k")


def test_bench_privacy_refuses_a_sample_larger_than_the_data(synth_dataset_dir, tmp_path):
    args = [*tiny_curve(synth_dataset_dir, tmp_path), "--customers", "100000"]
    with pytest.raises(SystemExit, match=r"--customers must be in 1\.\.600, got 100000"):
        main(args)
    assert not (tmp_path / "customers-100000").exists()


def test_a_sample_is_reused_only_for_the_dataset_it_was_drawn_from(
    synth_dataset_dir, tiny_synth_dataset_dir, tmp_path
):
    """Pointing one OUT at another dataset must not measure the first one's sample again."""
    drawn = argparse.Namespace(data=tiny_synth_dataset_dir, out=tmp_path)
    sample = sample_for(drawn, 50)
    record = json.loads((tmp_path / "customers-50" / "sample.json").read_text())
    assert record["source"] == str(tiny_synth_dataset_dir.resolve())
    assert load_dataset(sample).num_users == 50
    assert sample_for(argparse.Namespace(data=tiny_synth_dataset_dir, out=tmp_path), 50) == sample
    other = argparse.Namespace(data=synth_dataset_dir, out=tmp_path)
    with pytest.raises(SystemExit, match=r"holds a sample of .*tiny-synth.*, not of .*synth"):
        sample_for(other, 50)
    (tmp_path / "customers-50" / "sample.json").unlink()  # a sample that does not say its source
    with pytest.raises(SystemExit, match="a dataset it does not name"):
        sample_for(drawn, 50)
    (tmp_path / "customers-50" / "sample.json").write_text("{not json")  # or says it garbled
    with pytest.raises(SystemExit, match="a dataset it does not name"):
        sample_for(drawn, 50)


class TestPrivacyCurves:
    """The privacy benchmark's curves (a class: a worker of its own, tests/conftest.py)."""

    @pytest.mark.e2e
    def test_bench_privacy_runs_a_curve_per_sample_and_reuses_runs(
        self, tiny_synth_dataset_dir, tmp_path
    ):
        """``--customers 80,all``: a seeded sample of 80 customers and the whole dataset, each with
        its own curve, and the gain over each one's own public start in one JSON and PNG; a second
        invocation reuses both finished runs, but not for other settings or another dataset."""
        args = [*tiny_curve(tiny_synth_dataset_dir, tmp_path), "--customers", "80,all"]
        assert main(args) == 0
        sample = tmp_path / "customers-80" / "data"
        assert load_dataset(sample).num_users == 80
        result = json.loads((tmp_path / "privacy_by_customers.json").read_text())
        small, whole = result["rows"]
        assert (small["customers"], small["per_node"]) == (80, 40)
        assert (whole["customers"], whole["per_node"]) == (160, 80)
        curves = {"80": tmp_path / "customers-80", "all": tmp_path / "customers-all"}
        for row, out in zip((small, whole), curves.values(), strict=True):
            curve = json.loads((out / "privacy_curve.json").read_text())
            (point,) = row["points"]
            (run,) = curve["points"]
            assert run["variant"] == "text" and run["target_epsilon"] == 4.0
            assert set(METRICS) <= set(run["test"]) and not run["reused"]
            assert row["public_start"] == curve["untrained_text"]["ndcg@10"] > 0
            assert point["ndcg@10"] == run["test"]["ndcg@10"]
            assert point["gain"] == pytest.approx(point["ndcg@10"] / row["public_start"] - 1)
            assert 0 < point["epsilon"] <= 4.0 + 1e-6
            assert (out / "privacy_curve.png").stat().st_size > 1000
        assert (tmp_path / "privacy_by_customers.png").stat().st_size > 1000
        assert main(args) == 0  # a second invocation reuses the finished runs
        for out in curves.values():
            assert json.loads((out / "privacy_curve.json").read_text())["points"][0]["reused"]
        with pytest.raises(SystemExit, match="other settings"):  # but not one made differently
            main([*args, "--set", "dp_lr=0.01"])
        whole_args = tiny_curve(tiny_synth_dataset_dir, curves["all"])
        other = [*whole_args[:3], str(sample), *whole_args[4:]]  # nor one of another dataset
        with pytest.raises(SystemExit, match=r"other settings \(data: .*customers-80"):
            main(other)


def test_the_memory_of_a_process_tree_counts_its_children() -> None:
    """Peak memory covers Ray's workers: a child holding 200 MiB adds to the tree's total."""
    import os
    import subprocess
    import sys
    import time

    from simulations.bench.scale import tree_rss

    alone = tree_rss(os.getpid())
    assert alone > 10 * 2**20  # this Python process, at least
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "x = bytearray(200 * 2**20); x[::4096] = b'1' * len(x[::4096]); "
            "import time; time.sleep(30)",
        ]
    )
    try:
        grown = alone
        for _ in range(100):  # until the child has touched its pages
            grown = tree_rss(os.getpid())
            if grown - alone > 150 * 2**20:
                break
            time.sleep(0.1)
        assert grown - alone > 150 * 2**20
    finally:
        child.kill()
        child.wait()


class TestScale:
    """The scale benchmark (a class: a worker of its own, tests/conftest.py)."""

    @pytest.mark.e2e
    def test_bench_scale_times_one_round_per_federation_size(
        self, tiny_synth_dataset_dir, tmp_path
    ):
        args = ["bench", "scale", "--data", str(tiny_synth_dataset_dir), "--out", str(tmp_path)]
        args += ["--nodes", "1,2", "--partition", "regional", *TINY]
        assert main(args) == 0
        report = json.loads((tmp_path / "scale.json").read_text())
        assert [p["nodes"] for p in report["points"]] == [1, 2]
        for point in report["points"]:
            assert point["round_s"] > 0 and point["contributed"] == point["nodes"]
            assert point["peak_rss_mb"] > 100  # the driver and its Ray workers
            assert 0 < point["test_ndcg@10"] < 1
        assert report["points"][0]["round_s_vs_first"] == 1.0
        assert (tmp_path / "scale.png").stat().st_size > 1000
        assert main(args) == 0  # a second invocation reuses both runs
        again = json.loads((tmp_path / "scale.json").read_text())["points"]
        assert all(p["reused"] for p in again)
        assert [p["peak_rss_mb"] for p in again] == [p["peak_rss_mb"] for p in report["points"]]


@pytest.mark.e2e
def test_bench_dp_cost_measures_both_modes_on_the_device_asked(tiny_synth_dataset_dir, tmp_path):
    """Each mode runs in its own process, on the device asked for (not the default's), over the
    same customers and weights; GPU memory is reported where there is a GPU."""
    out = tmp_path / "dp_cost.json"
    args = ["bench", "dp-cost", "--data", str(tiny_synth_dataset_dir), "--out", str(out)]
    assert main([*args, "--customers", "60", *TINY]) == 0
    report = json.loads(out.read_text())
    plain, private = report["plain"], report["dp"]
    assert (plain["mode"], private["mode"]) == ("plain", "dp")
    for key in ("customers", "trained_parameters", "dim", "batch"):
        assert plain[key] == private[key]
    assert plain["customers"] == 60 and plain["trained_parameters"] > 0
    for mode in (plain, private):
        assert mode["device"].split(":")[0] == TEST_DEVICE
        assert mode["epoch_s"] > 0 and mode["peak_rss_mb"] > 100
        assert (mode["training_gpu_mb"] is None) == (TEST_DEVICE == "cpu")
    assert report["time_ratio"] == pytest.approx(private["epoch_s"] / plain["epoch_s"], abs=0.01)
