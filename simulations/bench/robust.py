"""``fedrec bench robust``: robust aggregation measured against malicious nodes.

Every run is a ``fedrec simulate`` run (``simulations.simulate.run``) in ``OUT/<name>``, reused
when it already holds a ``metrics.json`` (an interrupted benchmark resumes):

- ``clean-fedavg``: no attack, plain FedAvg (the reference), and ``clean-<defence>``: no
  attack, the defence on (what the defence costs when nobody attacks);
- ``<attack>-fedavg`` and ``<attack>-<defence>``: ``--malicious`` of the ``--clients`` nodes
  send the attack (simulations/attacks.py), without and with the defence.

Writes ``OUT/robust.json``: each run's test metrics and the updates its server rejected, and a
table of test NDCG@10 per attack and aggregation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shared.recommender.artifacts import write_json
from simulations import simulate
from simulations.attacks import ATTACKS
from simulations.bench.privacy import check_settings
from simulations.train import add_run_config_arguments, run_config_from_args

CLEAN = "clean"
DEFENCES = ("median", "trimmed")


def _choices(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [v for v in values if v not in allowed]
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"expected some of {allowed}, got {text!r}")
        return values

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", required=True, type=Path, help="dataset directory (docs/data-and-evaluation.md)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/bench-robust"),
        help="directory for the runs and robust.json (default runs/bench-robust); runs "
        "already there are reused",
    )
    parser.add_argument("--clients", type=int, default=10, help="nodes per run (default 10)")
    parser.add_argument(
        "--malicious", type=int, default=2, help="malicious nodes among them (default 2)"
    )
    parser.add_argument(
        "--attacks",
        type=_choices(ATTACKS[1:]),
        default=list(ATTACKS[1:]),
        help="comma-separated attacks (default scale,sign-flip,random)",
    )
    parser.add_argument(
        "--defences",
        type=_choices(DEFENCES),
        default=["trimmed"],
        help="comma-separated robust aggregations to compare with fedavg: median, trimmed "
        "(default trimmed; trim-fraction 0.2 cuts 2 of 10 nodes at each end)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds per run, fixed (valid-customers=0: no run stops early or keeps an "
        "earlier round, so the table measures the aggregation alone) (default 3)",
    )
    add_run_config_arguments(parser)


def plan(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(run name, attack, strategy) of every run, the clean reference first."""
    runs = [(f"{CLEAN}-{s}", "none", s) for s in ["fedavg", *args.defences]]
    runs += [(f"{a}-{s}", a, s) for a in args.attacks for s in ["fedavg", *args.defences]]
    return runs


def simulate_args(args: argparse.Namespace, attack: str, strategy: str, out: Path):
    """The arguments ``fedrec simulate`` would parse for this run."""
    argv = ["--data", str(args.data), "--out", str(out), "--clients", str(args.clients)]
    argv += ["--strategy", strategy, "--set", f"attack={attack}"]
    argv += ["--set", f"malicious_nodes={args.malicious if attack != 'none' else 0}"]
    argv += ["--rounds", str(args.rounds), "--set", "valid-customers=0"]
    argv += [token for item in args.overrides for token in ("--set", item)]
    argv += ["--device", args.device] if args.device else []
    argv += ["--quiet"] if args.quiet else []
    parser = argparse.ArgumentParser(prog="fedrec simulate")
    simulate.add_arguments(parser)
    return parser.parse_args(argv)


def run_one(args: argparse.Namespace, name: str, attack: str, strategy: str) -> dict:
    """One run (or the finished one already in its directory) and what the table needs."""
    out = args.out / name
    run_args = simulate_args(args, attack, strategy, out)
    reused = (out / "metrics.json").exists()
    if not reused and simulate.run(run_args) != 0:
        return {
            "name": name,
            "attack": attack,
            "strategy": strategy,
            "dir": str(out),
            "error": "the federation did not finish; see its log",
        }
    metrics = json.loads((out / "metrics.json").read_text())
    if reused:
        check_settings(metrics, run_args)
    return {
        "name": name,
        "attack": attack,
        "strategy": strategy,
        "malicious_nodes": metrics["config"]["malicious_nodes"],
        "test": metrics["test"],
        "rejected_updates": sum(len(r["rejected"]) for r in metrics["rounds"]),
        "dir": str(out),
        "reused": reused,
    }


def run(args: argparse.Namespace) -> int:
    if not 0 < args.malicious < args.clients:
        raise SystemExit("fedrec: --malicious must be between 1 and --clients - 1")
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    todo = plan(args)
    for index, (name, attack, strategy) in enumerate(todo, start=1):
        print(f"[{index}/{len(todo)}] {name}", flush=True)
        result = run_one(args, name, attack, strategy)
        runs.append(result)
        summary = result.get("error") or f"test ndcg@10 {result['test']['ndcg@10']:.4f}"
        print(f"[{index}/{len(todo)}] {name}: {summary}", flush=True)
    table: dict[str, dict[str, float]] = {}
    for r in runs:
        if "error" not in r:
            table.setdefault(r["attack"], {})[r["strategy"]] = r["test"]["ndcg@10"]
    config = run_config_from_args(args, clients=args.clients, rounds=args.rounds, valid_customers=0)
    write_json(
        args.out / "robust.json",
        {
            "data": str(args.data),
            "clients": args.clients,
            "malicious": args.malicious,
            "attack_scale": config.attack_scale,
            "config": config.to_dict(),
            "test_ndcg@10": table,
            "runs": runs,
        },
    )
    print(f"wrote {args.out}/robust.json")
    return 1 if any("error" in r for r in runs) else 0
