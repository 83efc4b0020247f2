"""``fedrec bench scale``: time and memory of one federated round as the federation grows.

For each node count, one round of ``fedrec simulate`` (``simulations.simulate.run``) on the
same data, in ``OUT/nodes-<N>`` (reused when it already holds a ``metrics.json``). The round
time is the run's own (``rounds[0].round_s``: sending, local training at every node,
aggregation, evaluation); peak memory is the largest resident set of the whole process tree
(the simulation's driver, Ray and its workers), sampled from ``/proc`` every half second, so
it is measured on Linux only. Writes ``OUT/scale.json`` and ``OUT/scale.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import threading
from pathlib import Path

from shared.recommender.artifacts import write_json
from simulations import simulate
from simulations.interrupt import descendants
from simulations.train import add_run_config_arguments

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", required=True, type=Path, help="dataset directory (docs/data-and-evaluation.md)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/bench-scale"),
        help="directory for the runs, scale.json and scale.png (default runs/bench-scale); "
        "runs already there are reused",
    )
    parser.add_argument(
        "--nodes",
        type=_counts,
        default=[10, 30, 100],
        help="comma-separated node counts, one run each (default 10,30,100)",
    )
    parser.add_argument(
        "--partition",
        choices=("regional", "merchant"),
        default="merchant",
        help="how the data is split over the nodes (default merchant)",
    )
    add_run_config_arguments(parser)


def _counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected node counts like 10,30,100: {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"node counts must be at least 1: {text!r}")
    return counts


def tree_rss(root: int) -> int:
    """Bytes resident in ``root`` and every process descended from it (0 without /proc)."""
    total = 0
    for pid in (root, *descendants(root)):
        with contextlib.suppress(OSError, ValueError, IndexError):  # ended while we looked
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    return total


class PeakMemory:
    """The largest :func:`tree_rss` of this process while the ``with`` block runs."""

    def __init__(self, every: float = 0.5):
        self.every, self.peak = every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(os.getpid()))
            self._stop.wait(self.every)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_one(args: argparse.Namespace, nodes: int) -> dict:
    """One round with ``nodes`` nodes (or the finished run already in its directory)."""
    out = args.out / f"nodes-{nodes}"
    argv = ["--data", str(args.data), "--out", str(out), "--clients", str(nodes)]
    argv += ["--rounds", "1", "--partition", args.partition, "--set", "valid-customers=0"]
    argv += [token for item in args.overrides for token in ("--set", item)]
    argv += ["--device", args.device] if args.device else []
    argv += ["--quiet"] if args.quiet else []
    parser = argparse.ArgumentParser(prog="fedrec simulate")
    simulate.add_arguments(parser)
    result: dict = {"nodes": nodes, "dir": str(out)}
    if (out / "metrics.json").exists():
        measured = out / "memory.json"
        peak = json.loads(measured.read_text())["peak_rss_mb"] if measured.exists() else None
        result |= {"reused": True, "peak_rss_mb": peak}
    else:
        with PeakMemory() as memory:
            code = simulate.run(parser.parse_args(argv))
        if code != 0:
            return {**result, "error": "the federation did not finish; see its log"}
        result["peak_rss_mb"] = round(memory.peak / 2**20)
        write_json(out / "memory.json", {"peak_rss_mb": result["peak_rss_mb"]})
    metrics = json.loads((out / "metrics.json").read_text())
    entry = metrics["rounds"][0]
    return {
        **result,
        "round_s": entry["round_s"],
        "contributed": entry["nodes"],
        "bytes_up_per_node": entry["bytes_up_per_node"],
        "test_ndcg@10": metrics["test"]["ndcg@10"],
    }


def plot(points: list[dict], path: Path) -> None:
    """Round time and peak memory against the number of nodes (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = [p["nodes"] for p in points]
    fig, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    time_ax.plot(nodes, [p["round_s"] for p in points], "o-")
    time_ax.set_ylabel("seconds per round")
    memory = [(p["nodes"], p["peak_rss_mb"] / 1024) for p in points if p["peak_rss_mb"]]
    if memory:  # runs reused from before this benchmark measured memory have none
        memory_ax.plot(*zip(*memory, strict=True), "s-", color="tab:orange")
    memory_ax.set_ylabel("peak memory (GiB, all processes)")
    for ax in (time_ax, memory_ax):
        ax.set_xlabel("nodes")
        ax.set_xscale("log")
        ax.set_xticks(nodes, [str(n) for n in nodes])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.suptitle("One federated round as the federation grows")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    points = []
    for index, nodes in enumerate(args.nodes, start=1):
        print(f"[{index}/{len(args.nodes)}] one round with {nodes} nodes", flush=True)
        point = run_one(args, nodes)
        points.append(point)
        summary = point.get("error") or f"{point['round_s']} s, peak {point['peak_rss_mb']} MiB"
        print(f"[{index}/{len(args.nodes)}] {nodes} nodes: {summary}", flush=True)
    done = [p for p in points if "error" not in p]
    base = done[0] if done else None
    for point in done:
        point["round_s_vs_first"] = round(point["round_s"] / base["round_s"], 2)
    write_json(
        args.out / "scale.json",
        {"data": str(args.data), "partition": args.partition, "points": points},
    )
    if done:
        plot(done, args.out / "scale.png")
    print(f"wrote {args.out}/scale.json and scale.png")
    return 1 if len(done) < len(points) else 0
