"""``fedrec deploy local``: the federation on Flower's deployment engine, all on this machine.

A real SuperLink and N SuperNodes run as separate processes on loopback, with certificates made
for the run (TLS) and every node's key registered (SuperNode authentication); each node reads
only its own partition directory. The run goes through them with ``flwr run`` and everything is
shut down at the end, on failure and on Ctrl-C too. It lives in ``simulations/`` because it
plays every party on one machine, to try and test the deployment; across machines the parties
run the same Flower commands (docs/deployment.md). Run again with the same OUT, it resumes.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from server.credentials import VALID_DAYS
from server.federation import check_settings, ensure_partitions
from shared.config import RunConfig
from shared.data import leave_one_out, load_dataset
from simulations.centralized import add_run_config_arguments, run_config_from_args
from simulations.local_federation import CONNECTION, DeployError, LocalFederation
from simulations.simulate import add_node_config_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="dataset directory (docs/data-and-evaluation.md); default: the embedded "
        "synthetic marketplace, generated under OUT/data",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/deploy"),
        help="outputs (default runs/deploy): the run's results, partitions/, logs/ (one per "
        "process) and deploy/ (certificates, keys, Flower state); an interrupted run resumes",
    )
    parser.add_argument("--nodes", type=int, default=3, help="SuperNodes to start (default 3)")
    parser.add_argument("--rounds", type=int, default=None, help="federated rounds (default 3)")
    parser.add_argument(
        "--port", type=int, default=None, help="the SuperLink's port (default: a free one)"
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS and no SuperNode authentication (debugging only)",
    )
    parser.add_argument(
        "--cert-days",
        type=int,
        default=VALID_DAYS,
        help="validity of the SuperLink's TLS certificate in days (the kept CA re-issues it)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=0,
        help="seconds the run may take before it is stopped (default: no limit)",
    )
    add_node_config_argument(parser, deployed=True)
    add_run_config_arguments(parser)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run's settings from ``fedrec deploy local``'s arguments (one partition per node)."""
    data = args.data.resolve() if args.data else None
    # a deployment evaluates at the nodes (unless --set federated-eval=false comes later)
    with_defaults = argparse.Namespace(
        **{**vars(args), "overrides": ["federated-eval=true", *args.overrides]}
    )
    return run_config_from_args(
        with_defaults,
        data=str(data) if data else None,
        out=str(args.out.resolve()),
        clients=args.nodes,
        rounds=args.rounds,
    )


def prepare_partitions(config: RunConfig) -> Path:
    """The nodes' data directories under OUT/partitions (the server reuses them)."""
    from server.server_app import embedded_dataset

    out = Path(config.out)
    data = Path(config.data) if config.data else embedded_dataset(out)
    dataset = load_dataset(data)
    return ensure_partitions(dataset, leave_one_out(dataset), config, out)


def completed_round(out: Path) -> int:
    """The last round the server checkpointed in ``out`` (0: none yet)."""
    from safetensors import safe_open

    path = out / "checkpoint.safetensors"
    try:
        with safe_open(str(path), "pt") as handle:
            return int(json.loads(handle.metadata()["progress"])["round"])
    except (OSError, KeyError, ValueError):
        return 0


def follow(federation: LocalFederation, run_id: int, config: RunConfig, timeout: float = 0) -> str:
    """Wait for the run to finish, printing each completed round; returns its final status."""
    out, started, shown = Path(config.out), time.time(), -1
    while True:
        for _ in range(5):  # the checkpoint every 2 s, the SuperLink every 10 s
            done = completed_round(out)
            if done != shown:
                print(f"deploy: run {run_id}: {done}/{config.rounds} rounds done", flush=True)
                shown = done
            if timeout and time.time() - started > timeout:
                federation.flwr("stop", str(run_id), CONNECTION)
                raise DeployError(f"the run took longer than {timeout:g} s and was stopped")
            time.sleep(2)
        status = federation.status(run_id)
        if status.startswith("finished"):
            if completed_round(out) != shown:
                print(f"deploy: run {run_id}: {completed_round(out)}/{config.rounds} rounds done")
            return status


def deploy(
    config: RunConfig,
    secure: bool = True,
    port: int | None = None,
    timeout: float = 0,
    node_config: dict | None = None,
    cert_days: int = VALID_DAYS,
) -> int:
    """Partitions, SuperLink, nodes, the run, and teardown; returns the exit code."""
    partitions = prepare_partitions(config)
    out = Path(config.out)
    with LocalFederation(out, secure=secure, port=port, cert_days=cert_days) as federation:
        federation.start_superlink()
        mode = "TLS, SuperNode authentication" if secure else "INSECURE: no TLS, no auth"
        print(f"deploy: SuperLink on 127.0.0.1:{federation.port} ({mode})", flush=True)
        for node in range(config.clients):
            name = f"node-{node}"
            key = federation.node_key(name) if secure else None
            federation.start_node(name, partitions / name, key, policy=node_config)
        federation.wait_for_nodes(config.clients)
        print(f"deploy: {config.clients} SuperNodes online", flush=True)
        run_id = federation.submit(config)
        status = follow(federation, run_id, config, timeout)
        log = federation.save_run_log(run_id)
    if status != "finished:completed":
        print(f"fedrec: the run ended {status}; see {log} and {out / 'logs'}", file=sys.stderr)
        return 1
    metrics = json.loads((out / "metrics.json").read_text())
    print(
        f"deploy: test ndcg@10 {metrics['test']['ndcg@10']:.4f}; wrote {out}/metrics.json, "
        f"recs.csv, model/, ledger.jsonl; logs in {out / 'logs'}"
    )
    return 0


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through the teardown


def run(args: argparse.Namespace) -> int:
    if args.data is not None and not args.data.is_dir():
        raise SystemExit(f"fedrec: {args.data}: not a dataset directory")
    if args.nodes < 1:
        raise SystemExit("fedrec: --nodes must be at least 1")
    config = config_from_args(args)
    if config.malicious_nodes or config.attack != "none":
        raise SystemExit("fedrec: malicious-nodes and attack are for simulations only")
    try:
        check_settings(config)
    except ValueError as error:
        raise SystemExit(f"fedrec: {error}") from None
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        return deploy(
            config,
            secure=not args.insecure,
            port=args.port,
            timeout=args.timeout,
            node_config=args.node_config,
            cert_days=args.cert_days,
        )
    except DeployError as error:
        print(f"fedrec: deploy failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedrec: interrupted; every process was stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
