"""The ``fedrec`` command line: the top of the house, which nothing imports.

Each command lives in its own module, which exposes ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them up. :func:`command_module` imports a command's
module only when that command is named, so ``fedrec --help`` loads neither torch nor Flower.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from shared import __version__
from shared.data.errors import DataError

# (command path, one-line help)
COMMANDS: list[tuple[tuple[str, ...], str]] = [
    (("data", "synth"), "write a synthetic marketplace dataset"),
    (("data", "validate"), "check a dataset directory and summarise it"),
    (("data", "convert"), "convert Amazon or MovieLens raw files"),
    (("data", "sample"), "a random sample of a dataset's customers"),
    (("data", "split"), "a pilot's data: the public catalog and each node's"),
    (("train",), "centralized training: the reference run"),
    (("simulate",), "a federated run on Flower's simulation engine"),
    (
        ("deploy", "local"),
        "a real SuperLink and SuperNodes on this machine (TLS, node authentication)",
    ),
    (
        ("gateway",),
        "the SuperLink's public address: forwards its Fleet API (TLS) and refuses the rest",
    ),
    (("audit",), "audit the privacy ledger of a run"),
    (
        ("ledger", "repair"),
        "remove the torn last line a crash left in a run's ledger (a backup is kept)",
    ),
    (("serve",), "serve the global recommender over HTTP"),
    (("bench", "quality"), "baselines, ablations and fusion side by side"),
    (("bench", "privacy"), "the federated privacy-utility curve"),
    (("bench", "dp-cost"), "DP-SGD time and memory against non-DP"),
    (("bench", "search"), "search quality: BM25, dense, fusion"),
    (("bench", "serve"), "latency of the service, exact and ANN"),
    (("bench", "robust"), "robust aggregation against attackers"),
    (("bench", "scale"), "round time and memory as the federation grows"),
]


def command_module(path: tuple[str, ...]) -> ModuleType:
    """The module of the command at ``path``, imported now (plain imports: the import check
    sees every arrow)."""
    match path:
        case ("data", "synth"):
            from shared.data import synth as module
        case ("data", "validate"):
            from shared.data import validate as module
        case ("data", "convert"):
            from shared.data import convert as module
        case ("data", "sample"):
            from simulations import sample as module
        case ("data", "split"):
            from simulations import split as module
        case ("train",):
            from simulations import train as module
        case ("simulate",):
            from simulations import simulate as module
        case ("deploy", "local"):
            from simulations import deploy as module
        case ("gateway",):
            from server.federation import fleet_gateway as module
        case ("audit",):
            from server.privacy import audit as module
        case ("ledger", "repair"):
            from server.privacy import ledger_repair as module
        case ("serve",):
            from server.serving import service as module
        case ("bench", "quality"):
            from simulations.bench import quality as module
        case ("bench", "privacy"):
            from simulations.bench import privacy as module
        case ("bench", "dp-cost"):
            from simulations.bench import dp_cost as module
        case ("bench", "search"):
            from simulations.bench import search as module
        case ("bench", "serve"):
            from simulations.bench import serve as module
        case ("bench", "robust"):
            from simulations.bench import robust as module
        case ("bench", "scale"):
            from simulations.bench import scale as module
        case _:
            raise KeyError(path)
    return module


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help already states it or the
    option has none to show (a flag that is off, an option whose default is a run setting).
    A default of 0 is shown: it is a value (``0 in (False,)`` holds, so no ``in`` test)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        nothing = action.default is None or action.default is False or action.default == []
        if "default" in (action.help or "") or nothing:
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
    for path, help_text in COMMANDS:
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
        sub.set_defaults(command_path=path)
        if list(path) == argv[: len(path)]:
            command_module(path).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` names; its exit status (2 for bad input or a missing file)."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return int(command_module(args.command_path).run(args) or 0)
    except DataError as error:
        print(f"fedrec: bad input: {error}", file=sys.stderr)
        return 2
    except FileNotFoundError as error:
        print(f"fedrec: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
