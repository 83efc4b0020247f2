"""``fedrec deploy local``: the federation on Flower's deployment engine, all on this machine.

A real SuperLink and N SuperNodes run as separate processes on loopback, with certificates made
for the run (TLS) and every node's key registered (SuperNode authentication); the nodes reach
the SuperLink through the Fleet gateway (server/federation/fleet_gateway.py), which forwards the
Fleet API
only, and the ``flwr`` CLI reaches it directly on its own loopback port. The server side is
given the public catalog only (``--catalog``) and never reads events; each node reads only its
own data directory (``--node-data``), with its own privacy policy (``--node-config``), and the
nodes evaluate the model. ``--data`` is the convenience: ``fedrec data split`` into OUT/split
first. The run goes through them with ``flwr run`` and everything is shut down at the end, on
failure and on Ctrl-C too. It lives in ``simulations/`` because it
plays every party on one machine, to try and test the deployment; across machines the parties
run the same Flower commands (docs/deployment.md). Run again with the same OUT, it resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from client.policy import NodePolicy
from server.federation.credentials import VALID_DAYS
from server.federation.registry import write_registry
from server.federation.settings import check_settings
from shared.federation.node_directory import NODE_FILE, NodeInfo
from shared.runs.checkpoint import Checkpoint, CheckpointError
from shared.runs.config import RunConfig
from shared.runs.durable import OutputInUse, RunLock
from shared.runs.outputs import CHECKPOINT
from simulations.interrupt import interrupted, raise_interrupt, stop_signals
from simulations.local_federation import CONNECTION, DeployError, LocalFederation
from simulations.simulate import add_node_config_argument
from simulations.split import CATALOG, split_dataset
from simulations.train import add_run_config_arguments, run_config_from_args
from simulations.verdict import privacy_line

STATUS_EVERY_S = 20.0  # how often the run's status is asked before its metrics are written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--catalog",
        type=Path,
        default=None,
        help="the public catalog the server is given (a directory with items.*, e.g. "
        "fedrec data split's OUT/catalog); with --node-data",
    )
    parser.add_argument(
        "--node-data",
        type=Path,
        nargs="+",
        default=None,
        metavar="DIR",
        help="one data directory per node (fedrec data split's OUT/node-<k>), each read only by "
        "its own SuperNode; with --catalog",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="convenience instead of --catalog/--node-data: split this dataset into --nodes "
        "nodes under OUT/split first (default: the embedded synthetic marketplace)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/deploy"),
        help="outputs (default runs/deploy): the run's results, partitions/, logs/ (one per "
        "process) and deploy/ (certificates, keys, Flower state); an interrupted run resumes",
    )
    parser.add_argument("--nodes", type=int, default=3, help="with --data: how many nodes")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="the most federated rounds (validation may stop the run earlier); under DP it "
        f"sets dp-rounds, exactly the rounds run ({RunConfig.dp_rounds} unless given) "
        f"(default: {RunConfig.rounds})",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help="the port the nodes dial: the Fleet gateway's (with --insecure, the SuperLink's); "
        "default: a free one",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS, no SuperNode authentication and no gateway (debugging only)",
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


def config_from_args(args: argparse.Namespace, catalog: Path, nodes: int) -> RunConfig:
    """The run's settings from ``fedrec deploy local``'s arguments: the server is given the
    ``catalog`` only, and evaluates through the nodes (``federated-eval``)."""
    with_defaults = argparse.Namespace(
        **{**vars(args), "overrides": ["federated-eval=true", *args.overrides]}
    )
    config = run_config_from_args(
        with_defaults,
        catalog=str(catalog.resolve()),
        out=str(args.out.resolve()),
        clients=nodes,
    )
    return config.with_rounds(args.rounds)


def planned_nodes(args: argparse.Namespace) -> int:
    """How many nodes the run will have: ``--node-data``'s, else those of the split in OUT (a
    resumed run reuses it, whatever ``--nodes`` says), else ``--nodes``."""
    if args.node_data:
        return len(args.node_data)
    split = args.out.resolve() / "split"
    return len(list(split.glob("node-*"))) if split.is_dir() else max(args.nodes, 1)


def node_directories(args: argparse.Namespace) -> tuple[Path, list[Path]]:
    """The catalog and the nodes' data: given (``--catalog``, ``--node-data``), or split from
    ``--data`` (or the embedded default) into OUT/split once (a resumed run reuses it)."""
    if args.catalog is not None or args.node_data is not None:
        if args.catalog is None or not args.node_data or args.data is not None:
            raise SystemExit("fedrec: give --catalog with --node-data (and no --data)")
        for directory in (args.catalog, *args.node_data):
            if not directory.is_dir():
                raise SystemExit(f"fedrec: {directory}: not a directory")
        return args.catalog, list(args.node_data)
    if args.nodes < 1:
        raise SystemExit("fedrec: --nodes must be at least 1")
    from server.federation.server_app import embedded_dataset

    out = args.out.resolve()
    split = out / "split"
    if split.is_dir():
        return split / CATALOG, sorted(split.glob("node-*"), key=lambda d: int(d.name[5:]))
    if args.data is not None and not args.data.is_dir():
        raise SystemExit(f"fedrec: {args.data}: not a dataset directory")
    data = args.data if args.data is not None else embedded_dataset(out)
    settings = run_config_from_args(args)
    return split_dataset(data, split, args.nodes, settings.partition, settings.seed)


def with_nodes_partition(overrides: list[str], settings: RunConfig, nodes: list[Path]) -> list[str]:
    """``overrides`` with ``partition=merchant`` first when the node directories were split by
    merchant (their ``node.json``) and no partition was set: a customer may shop at several of
    those nodes, and only a merchant federation shares the budget among them and states that
    customer's total ε. A regional partition set for them is refused: it would state one
    node's ε (the audit passing it) for a customer who spent it at every node."""
    try:
        split = {NodeInfo.read(d).partition for d in nodes if (d / NODE_FILE).is_file()}
    except ValueError as error:
        raise SystemExit(f"fedrec: {error}") from None
    if "merchant" not in split or settings.partition == "merchant":
        return overrides
    if any(o.partition("=")[0].strip() == "partition" for o in overrides):
        raise SystemExit(
            f"fedrec: the node directories were split by merchant (their {NODE_FILE}) but the "
            f"run is set to partition={settings.partition}: a customer shopping at several of "
            "them would be stated one node's epsilon; drop that --set or set partition=merchant"
        )
    print("deploy: the nodes were split by merchant (node.json): a merchant federation")
    return ["partition=merchant", *overrides]


def vouching_policy(directory: Path, node_config: dict | None) -> dict:
    """``node_config`` for the node in ``directory``, vouching that its customers are its own
    alone (``exclusive-customers``, client/policy.py) where its ``node.json`` says it was split
    by region: here the split is this command's own. A node config that sets it wins."""
    split = NodeInfo.read(directory).partition if (directory / NODE_FILE).is_file() else ""
    return {"exclusive-customers": split == "regional", **(node_config or {})}


def completed_round(out: Path) -> int:
    """The last round the server checkpointed in ``out`` (0: none yet)."""
    try:
        progress = Checkpoint(out / CHECKPOINT).progress()
    except CheckpointError:
        return 0
    return int(progress["round"]) if progress else 0


def follow(federation: LocalFederation, run_id: int, config: RunConfig, timeout: float = 0) -> str:
    """Wait for the run to finish, printing each completed round (its checkpoint, every 2 s);
    returns its final status. The SuperLink is asked (``flwr ls``: a process, about 2 s of CPU)
    as soon as the ServerApp has written the run's metrics.json, and every
    :data:`STATUS_EVERY_S` seconds before (a run that fails writes none)."""
    out, started, shown = Path(config.out), time.time(), -1
    asked = started
    while True:
        done = completed_round(out)
        if done != shown:
            print(f"deploy: run {run_id}: {done}/{config.max_rounds} rounds done", flush=True)
            shown = done
        if timeout and time.time() - started > timeout:
            federation.flwr("stop", str(run_id), CONNECTION)
            raise DeployError(f"the run took longer than {timeout:g} s and was stopped")
        if written_since(out / "metrics.json", started) or time.time() - asked >= STATUS_EVERY_S:
            asked = time.time()
            status = federation.status(run_id)
            if status.startswith("finished"):
                if completed_round(out) != shown:
                    print(
                        f"deploy: run {run_id}: {completed_round(out)}/{config.max_rounds} "
                        "rounds done"
                    )
                return status
        time.sleep(2)


def written_since(path: Path, moment: float) -> bool:
    """Whether ``path`` was written at or after ``moment`` (a time.time())."""
    try:
        return path.stat().st_mtime >= moment
    except FileNotFoundError:
        return False


def deploy(
    config: RunConfig,
    nodes: list[Path],
    secure: bool = True,
    port: int | None = None,
    timeout: float = 0,
    node_config: dict | None = None,
    cert_days: int = VALID_DAYS,
) -> int:
    """SuperLink, one SuperNode per directory of ``nodes``, the run, and teardown; returns
    the exit code."""
    out = Path(config.out)
    with (
        RunLock(out / "deploy"),  # one deployment per OUT; the ServerApp itself locks OUT
        LocalFederation(out, secure=secure, port=port, cert_days=cert_days) as federation,
    ):
        federation.start_superlink()
        if secure:
            print(
                f"deploy: SuperLink on 127.0.0.1:{federation.link_port}, nodes dial its Fleet "
                f"gateway on 127.0.0.1:{federation.port} (TLS, SuperNode authentication)",
                flush=True,
            )
        else:
            print(f"deploy: SuperLink on 127.0.0.1:{federation.port} (INSECURE: no TLS, no auth)")
        for directory in nodes:
            key = federation.node_key(directory.name) if secure else None
            policy = vouching_policy(directory, node_config)
            federation.start_node(directory.name, directory, key, policy=policy)
        if secure:  # the operator registers what it knows of each node: its public node.json
            config = replace(config, registry=str(register_nodes(federation, nodes)))
        federation.wait_for_nodes(len(nodes))
        print(f"deploy: {len(nodes)} SuperNodes online", flush=True)
        run_id = federation.submit(config)
        status = follow(federation, run_id, config, timeout)
        log = federation.save_run_log(run_id)
    if status != "finished:completed":
        print(f"fedrec: the run ended {status}; see {log} and {out / 'logs'}", file=sys.stderr)
        return 1
    for line in finished(out):
        print(line)
    return 0


def finished(out: Path) -> list[str]:
    """What a finished run says last: the nodes' NDCG@10 and what was written, then, for a
    private run, its guarantee (epsilon rounded up, delta, the unit) and the audit command, as
    ``fedrec simulate``'s verdict states them."""
    metrics = json.loads((out / "metrics.json").read_text())
    evaluations = metrics.get("federated_evaluation") or [{}]
    quality = evaluations[-1].get("ndcg@10")
    figure = f"federated ndcg@10 {quality:.4f}; " if quality is not None else ""
    lines = [
        f"deploy: {figure}wrote {out}/metrics.json, model/, ledger.jsonl; logs in {out / 'logs'}"
    ]
    if privacy := metrics.get("privacy"):
        lines.append(privacy_line(privacy, out))
    return lines


def register_nodes(federation: LocalFederation, nodes: list[Path]) -> Path:
    """The node registry (server/federation/registry.py): each registered key's Flower node id with
    the public description of its node (``node.json``: name, catalog, declared customers)."""
    entries = {}
    for directory in nodes:
        info = NodeInfo.read(directory)
        if info.customers is None:
            raise DeployError(
                f"{directory}/node.json declares no customers: the registry needs each node's "
                'public customer figure (e.g. "customers": 2200), or its weight would be '
                "whatever its replies claim"
            )
        entries[federation.node_ids[directory.name]] = {
            "name": info.node,
            "catalog": info.catalog,
            "customers": info.customers,
        }
    path = federation.home / "registry.json"
    write_registry(path, entries)
    return path


def unloadable_text_model(settings: RunConfig, node_config: dict) -> str | None:
    """Why every node, reading ``node_config`` as its policy, would refuse the run's
    ``text-model`` (not among its ``text-models``), with the setting that lists it; None when
    they load it."""
    policy = NodePolicy.from_node_config({"data-dir": "", **node_config})
    if not policy.text_model_refusal(settings.text_model):
        return None
    listed = policy.text_models or ()
    return (
        f"the nodes load only the text models their policy lists ({','.join(listed)}), not "
        f"the run's text-model {settings.text_model!r}: add it, e.g. --node-config "
        f'"text-models={",".join((*listed, settings.text_model))}"'
    )


def run(args: argparse.Namespace) -> int:
    # checked before anything is written, with as many nodes as it will have (min-nodes)
    settings = run_config_from_args(args, clients=planned_nodes(args))
    if settings.malicious_nodes or settings.attack != "none" or settings.canaries:
        raise SystemExit("fedrec: malicious-nodes, attack and canaries are for simulations only")
    try:
        check_settings(settings)
    except ValueError as error:
        raise SystemExit(f"fedrec: {error}") from None
    if problem := unloadable_text_model(settings, args.node_config):
        raise SystemExit(f"fedrec: {problem}")
    catalog, nodes = node_directories(args)
    args.overrides = with_nodes_partition(args.overrides, settings, nodes)
    config = config_from_args(args, catalog, len(nodes))
    try:
        with stop_signals(raise_interrupt):  # SIGTERM as Ctrl-C: through the teardown
            return deploy(
                config,
                nodes,
                secure=not args.insecure,
                port=args.port,
                timeout=args.timeout,
                node_config=args.node_config,
                cert_days=args.cert_days,
            )
    except (DeployError, OutputInUse) as error:
        print(f"fedrec: deploy failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return interrupted(Path(config.out), "every process was stopped")
