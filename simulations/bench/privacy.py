"""``fedrec bench privacy``: the federated privacy-utility curve.

For every variant and every epsilon, one federated run made by ``fedrec simulate``'s own code
(``simulations.simulate.run``) in ``OUT/<variant>/eps-<epsilon>``; a run whose directory
already holds a ``metrics.json`` is reused, so an interrupted benchmark resumes (and a run that
was cut off mid-way resumes from its checkpoint). Runs are sequential. The curve plots test
NDCG@10 against the epsilon each run reports, with the model every run starts from (the public
start: the text model, sharpened on the catalog's brands where it has them) as a reference line.

With ``--customers``, the same curve on seeded samples of the customers (``fedrec data sample``),
one in ``OUT/customers-<N>`` each, and ``privacy_by_customers.{json,png}``: what each budget adds
to its sample's public start, against customers per node (where private learning pays).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shared.data.convert import write_dataset
from shared.data.dataset import find_table, load_dataset, read_table
from shared.recommender.artifacts import write_json
from shared.recommender.experiment import Experiment
from shared.runs.config import RunConfig
from shared.runs.outputs import differences
from simulations import simulate
from simulations.sample import sample_customers
from simulations.train import add_run_config_arguments, run_config_from_args

NO_DP = "none"
ALL = "all"
SAMPLE_RECORD = "sample.json"  # beside each sample: the dataset it was drawn from


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", required=True, type=Path, help="dataset directory (docs/data-and-evaluation.md)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/bench-privacy"),
        help="directory for the runs, privacy_curve.json and privacy_curve.png "
        "(default runs/bench-privacy); runs already there are reused",
    )
    parser.add_argument(
        "--epsilons",
        type=parse_epsilons,
        default=parse_epsilons("1,2,4,8,none"),
        help="comma-separated per-node budgets; 'none' = no DP (default 1,2,4,8,none)",
    )
    parser.add_argument(
        "--variants",
        type=parse_variants,
        default=["text", "id", "fusion"],
        help="comma-separated model variants (default text,id,fusion)",
    )
    parser.add_argument(
        "--clients", type=int, default=None, help="nodes per run (default: fedrec simulate's)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"rounds per run (default: fedrec simulate's: dp-rounds {RunConfig.dp_rounds} under "
        f"DP; without DP at most rounds {RunConfig.rounds}, validation choosing)",
    )
    parser.add_argument(
        "--customers",
        type=parse_customers,
        default=None,
        help="also the curve against customers per node: comma-separated sample sizes, "
        f"'{ALL}' = the whole dataset (e.g. 4000,10000,{ALL}); each sample (seed 0) and its runs "
        "in OUT/customers-<N>, then privacy_by_customers.json and .png in OUT",
    )
    add_run_config_arguments(parser)


def parse_customers(text: str) -> list[int | None]:
    """``"4000,all"`` -> ``[4000, None]`` (None: every customer)."""
    sizes = []
    for part in text.split(","):
        part = part.strip().lower()
        if part == ALL:
            sizes.append(None)
            continue
        if not part.isdigit() or int(part) < 1:
            raise argparse.ArgumentTypeError(f"not a customer count or '{ALL}': {part!r}")
        sizes.append(int(part))
    return sizes


def parse_epsilons(text: str) -> list[float | None]:
    """``"1,2,none"`` -> ``[1.0, 2.0, None]``."""
    values = []
    for part in text.split(","):
        part = part.strip().lower()
        if part == NO_DP:
            values.append(None)
            continue
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an epsilon or '{NO_DP}': {part!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"epsilon must be positive, got {part!r}")
        values.append(value)
    return values


def parse_variants(text: str) -> list[str]:
    from shared.recommender.model import VARIANTS

    variants = [v.strip() for v in text.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {unknown}; known: {VARIANTS}")
    return variants


def epsilon_label(epsilon: float | None) -> str:
    return NO_DP if epsilon is None else f"{epsilon:g}"


def simulate_args(
    args: argparse.Namespace, variant: str, epsilon: float | None, out: Path
) -> argparse.Namespace:
    """The arguments ``fedrec simulate`` would parse for this run."""
    argv = ["--data", str(args.data), "--out", str(out), "--set", f"variant={variant}"]
    argv += ["--clients", str(args.clients)] if args.clients is not None else []
    argv += ["--rounds", str(args.rounds)] if args.rounds is not None else []
    argv += ["--dp", "--target-epsilon", str(epsilon)] if epsilon is not None else []
    argv += [token for item in args.overrides for token in ("--set", item)]
    argv += ["--device", args.device] if args.device else []
    argv += ["--quiet"] if args.quiet else []
    parser = argparse.ArgumentParser(prog="fedrec simulate")
    simulate.add_arguments(parser)
    return parser.parse_args(argv)


def check_settings(metrics: dict, run_args: argparse.Namespace) -> None:
    """Refuse to reuse a finished run made with other settings than this benchmark's, its data
    included (compared as resolved paths; a default delta, which the run resolves itself, and
    settings newer than the run are not compared)."""
    wanted = simulate.config_from_args(run_args).to_dict()
    stored = metrics["config"]
    common = [key for key in wanted if key in stored]
    differ = differences({k: stored[k] for k in common}, {k: wanted[k] for k in common})
    if differ:
        raise SystemExit(
            f"fedrec: {run_args.out} holds a run with other settings ({'; '.join(differ)}); "
            "use another --out or remove that run"
        )


def run_point(args: argparse.Namespace, variant: str, epsilon: float | None) -> dict:
    """One federated run (or the one already in its directory) and what the curve needs."""
    out = args.out / variant / f"eps-{epsilon_label(epsilon)}"
    run_args = simulate_args(args, variant, epsilon, out)
    metrics_path = out / "metrics.json"
    reused = metrics_path.exists()
    if not reused and simulate.run(run_args) != 0:
        return {
            "variant": variant,
            "target_epsilon": epsilon,
            "dir": str(out),
            "error": "the federation did not finish; see its log",
        }
    metrics = json.loads(metrics_path.read_text())
    if reused:
        check_settings(metrics, run_args)
    privacy = metrics.get("privacy") or {}
    federation = privacy.get("federation") or {}
    return {
        "variant": variant,
        "target_epsilon": epsilon,
        "epsilon": federation.get("epsilon", privacy.get("epsilon")),
        "delta": privacy.get("delta"),
        "test": metrics["test"],
        "rounds": metrics["timing"].get("rounds"),
        "dir": str(out),
        "reused": reused,
    }


def untrained_baseline(args: argparse.Namespace) -> dict:
    """Test metrics of the model at initialisation (the public start every run starts from,
    :meth:`Catalog.new_model`), with the private runs' model settings (``dp_max_len``,
    ``dp_dim``)."""
    config = run_config_from_args(args, variant="text", dp=True)
    experiment = Experiment.prepare(args.data, config, show_progress=not args.quiet)
    test, _ = experiment.evaluate(experiment.new_model(), "test")
    return test


def plot_curve(points: list[dict], baseline: float, path: Path) -> None:
    """Test NDCG@10 against epsilon (log scale), no-DP runs as separate markers at the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = sorted({p["target_epsilon"] for p in points if p["target_epsilon"] is not None})
    no_dp_x = (finite[-1] if finite else 1.0) * 4
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for index, variant in enumerate(dict.fromkeys(p["variant"] for p in points)):
        color = f"C{index}"
        mine = [p for p in points if p["variant"] == variant and "error" not in p]
        private = sorted(
            (p["epsilon"] or p["target_epsilon"], p["test"]["ndcg@10"])
            for p in mine
            if p["target_epsilon"] is not None
        )
        if private:
            ax.plot(*zip(*private, strict=True), marker="o", color=color, label=variant)
        for p in mine:
            if p["target_epsilon"] is None:
                ax.plot(
                    no_dp_x,
                    p["test"]["ndcg@10"],
                    marker="*",
                    markersize=12,
                    color=color,
                    linestyle="none",
                    label=None if private else variant,
                )
    ax.axhline(baseline, color="gray", linestyle="--", label="the starting model (public start)")
    ax.set_xscale("log")
    ticks = {t: f"{t:g}" for t in finite}
    if any(p["target_epsilon"] is None for p in points):
        ticks[no_dp_x] = NO_DP
    ax.set_xticks(list(ticks), list(ticks.values()))
    ax.minorticks_off()
    ax.set_xlabel("epsilon per customer (federation, reported); 'none' = no DP")
    ax.set_ylabel("test NDCG@10")
    ax.set_title("Federated privacy-utility curve")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curve(args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """Every run of the curve on ``args.data`` (made or reused), its JSON and PNG in
    ``args.out``; returns the public start's test metrics and the points."""
    args.out.mkdir(parents=True, exist_ok=True)
    baseline = untrained_baseline(args)
    plan = [(v, e) for v in args.variants for e in args.epsilons]
    points = []
    for index, (variant, epsilon) in enumerate(plan, start=1):
        print(f"[{index}/{len(plan)}] {variant}, epsilon {epsilon_label(epsilon)}", flush=True)
        point = run_point(args, variant, epsilon)
        points.append(point)
        summary = point.get("error") or (
            f"test ndcg@10 {point['test']['ndcg@10']:.4f}"
            + (" (reused)" if point["reused"] else "")
        )
        print(
            f"[{index}/{len(plan)}] {variant}, epsilon {epsilon_label(epsilon)}: {summary}",
            flush=True,
        )
    write_json(
        args.out / "privacy_curve.json",
        {
            "data": str(args.data),
            "config": run_config_from_args(
                args, clients=args.clients, rounds=args.rounds
            ).to_dict(),
            "untrained_text": baseline,
            "points": points,
        },
    )
    plot_curve(points, baseline["ndcg@10"], args.out / "privacy_curve.png")
    print(f"wrote {args.out}/privacy_curve.json, privacy_curve.png")
    return baseline, points


def sample_for(args: argparse.Namespace, customers: int | None) -> Path:
    """The dataset of ``customers`` sampled customers (seed 0) in ``OUT/customers-<N>/data``,
    written once, with the dataset it was drawn from beside it (``sample.json``), and reused
    only for that dataset; ``None``: ``args.data`` itself."""
    if customers is None:
        return args.data
    out = args.out / f"customers-{customers}" / "data"
    record = out.parent / SAMPLE_RECORD
    source = str(args.data.resolve())
    if out.exists():
        try:
            drawn = json.loads(record.read_text()).get("source")
        except (OSError, ValueError, AttributeError):  # missing, unreadable or not our record
            drawn = None
        if drawn != source:
            raise SystemExit(
                f"fedrec: {out} holds a sample of {drawn or 'a dataset it does not name'}, not "
                f"of {source}: use another --out or remove {out.parent}"
            )
        return out
    interactions = read_table(find_table(args.data, "interactions"))
    items = read_table(find_table(args.data, "items"))
    try:
        kept, kept_items = sample_customers(interactions, items, customers)
    except ValueError as error:
        raise SystemExit(f"fedrec: {args.data}: {error}") from None
    out.parent.mkdir(parents=True, exist_ok=True)  # the record first: a crash between the two
    write_json(record, {"source": source, "customers": customers, "seed": 0})  # draws again
    write_dataset(out, kept, kept_items)
    return out


def by_customers(args: argparse.Namespace) -> list[dict]:
    """The curve on each sample of ``args.customers``; one row per sample: its customers per
    node, its public start and each run's test NDCG@10 and gain over that start."""
    nodes = run_config_from_args(args, clients=args.clients).clients
    rows = []
    for customers in args.customers:
        label = ALL if customers is None else str(customers)
        print(f"== customers: {label}", flush=True)
        data = sample_for(args, customers)
        sample_args = argparse.Namespace(
            **{**vars(args), "data": data, "out": args.out / f"customers-{label}"}
        )
        baseline, points = curve(sample_args)
        count = customers or load_dataset(data).num_users
        start = baseline["ndcg@10"]
        rows.append(
            {
                "customers": count,
                "per_node": count // nodes,
                "data": str(data),
                "public_start": start,
                "points": [
                    {
                        "variant": p["variant"],
                        "target_epsilon": p["target_epsilon"],
                        "epsilon": p.get("epsilon"),
                        "ndcg@10": p["test"]["ndcg@10"],
                        "gain": p["test"]["ndcg@10"] / start - 1,
                    }
                    for p in points
                    if "error" not in p
                ],
            }
        )
    return rows


def plot_by_customers(rows: list[dict], path: Path) -> None:
    """Gain over each sample's public start (%) against customers per node, a line per
    variant and budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    lines: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for row in rows:
        for p in row["points"]:
            key = (p["variant"], epsilon_label(p["target_epsilon"]))
            lines.setdefault(key, []).append((row["per_node"], 100 * p["gain"]))
    for (variant, label), xy in sorted(lines.items()):
        name = f"{variant}, " + ("no DP" if label == NO_DP else f"epsilon {label}")
        ax.plot(*zip(*sorted(xy), strict=True), marker="o", label=name)
    ax.axhline(0, color="gray", linestyle="--", label="the sample's public start")
    ax.set_xscale("log")
    ax.set_xticks(sorted({r["per_node"] for r in rows}))
    ax.set_xticklabels([f"{x:,}" for x in sorted({r["per_node"] for r in rows})])
    ax.minorticks_off()
    ax.set_xlabel("customers per node")
    ax.set_ylabel("test NDCG@10 over the public start (%)")
    ax.set_title("What the nodes' data add, by customers per node")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    if args.customers is None:
        _, points = curve(args)
        return 1 if any("error" in p for p in points) else 0
    args.out.mkdir(parents=True, exist_ok=True)
    rows = by_customers(args)
    write_json(args.out / "privacy_by_customers.json", {"data": str(args.data), "rows": rows})
    plot_by_customers(rows, args.out / "privacy_by_customers.png")
    print(f"wrote {args.out}/privacy_by_customers.json, privacy_by_customers.png")
    wanted = len(args.variants) * len(args.epsilons)
    return 0 if all(len(r["points"]) == wanted for r in rows) else 1
