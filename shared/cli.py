"""The ``fedrec`` command line.

Each command lives in its own module, which exposes ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them up, importing a module when its command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from shared import __version__
from shared.data import DataError

# (command path, module, one-line help)
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("data", "synth"), "shared.synth", "write a synthetic marketplace dataset"),
    (("data", "validate"), "shared.validate", "check a dataset directory and summarise it"),
    (("data", "convert"), "shared.convert", "convert Amazon or MovieLens raw files"),
    (("data", "sample"), "simulations.sample", "a random sample of a dataset's customers"),
    (("data", "split"), "simulations.split", "a pilot's data: the public catalog and each node's"),
    (("train",), "simulations.centralized", "centralized training: the reference run"),
    (("simulate",), "simulations.simulate", "a federated run on Flower's simulation engine"),
    (
        ("deploy", "local"),
        "simulations.deploy",
        "a real SuperLink and SuperNodes on this machine (TLS, node authentication)",
    ),
    (
        ("gateway",),
        "server.fleet_gateway",
        "the SuperLink's public address: forwards its Fleet API (TLS) and refuses the rest",
    ),
    (("audit",), "server.audit", "audit the privacy ledger of a run"),
    (
        ("ledger", "repair"),
        "server.ledger_repair",
        "remove the torn last line a crash left in a run's ledger (a backup is kept)",
    ),
    (("serve",), "server.service", "serve the global recommender over HTTP"),
    (
        ("bench", "quality"),
        "simulations.bench_quality",
        "baselines, ablations and fusion side by side",
    ),
    (("bench", "privacy"), "simulations.bench_privacy", "the federated privacy-utility curve"),
    (("bench", "dp-cost"), "simulations.bench_dp_cost", "DP-SGD time and memory against non-DP"),
    (("bench", "search"), "simulations.bench_search", "search quality: BM25, dense, fusion"),
    (("bench", "serve"), "simulations.bench_serve", "latency of the service, exact and ANN"),
    (("bench", "robust"), "simulations.bench_robust", "robust aggregation against attackers"),
]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help already states it or the
    option has none to show (a flag that is off, an option whose default is a run setting)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "default" in (action.help or "") or action.default in (None, False, []):
            return action.help
        return super()._get_help_string(action)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser; only the command named in ``argv`` imports its module for its options."""
    parser = argparse.ArgumentParser(
        prog="fedrec",
        description="Privacy-preserving federated search and recommendation.",
    )
    parser.add_argument("--version", action="version", version=f"fedrec {__version__}")
    groups: dict[tuple[str, ...], argparse._SubParsersAction] = {
        (): parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    }
    for path, module, help_text in COMMANDS:
        for depth in range(1, len(path)):
            prefix = path[:depth]
            if prefix not in groups:
                group_parser = groups[path[: depth - 1]].add_parser(
                    prefix[-1], help=f"{prefix[-1]} commands", formatter_class=HelpFormatter
                )
                groups[prefix] = group_parser.add_subparsers(
                    dest=f"{prefix[-1]}_command", required=True, metavar="COMMAND"
                )
        sub = groups[path[:-1]].add_parser(
            path[-1], help=help_text, description=help_text, formatter_class=HelpFormatter
        )
        sub.set_defaults(module=module)
        if list(path) == argv[: len(path)]:
            importlib.import_module(module).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return int(importlib.import_module(args.module).run(args) or 0)
    except DataError as error:
        print(f"fedrec: bad input: {error}", file=sys.stderr)
        return 2
    except FileNotFoundError as error:
        print(f"fedrec: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
