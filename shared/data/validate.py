"""``fedrec data validate``: load a dataset directory, check it, and summarise it.

Bad input raises :class:`shared.data.errors.DataError` (the CLI turns it into exit 2); recoverable
issues (exact duplicate rows, untouched items, items without text) are reported, not dropped.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from rich.table import Table

from shared.data.dataset import EVENTS, Dataset, load_dataset
from shared.runs.console import console


def _date(seconds: int) -> str:
    return datetime.fromtimestamp(int(seconds), UTC).date().isoformat()


def _distinct(dataset: Dataset, column: str) -> int | None:
    """Distinct non-empty values of ``column`` in the interactions, else in the items."""
    for frame in (dataset.interactions, dataset.items):
        if column in frame:
            values = frame[column].dropna().astype(str).str.strip()
            return int(values[values != ""].nunique())
    return None


def summarize(dataset: Dataset, directory: str | Path) -> dict:
    """The summary of a loaded dataset as a JSON-ready dict."""
    frame, report = dataset.interactions, dataset.report
    lengths = frame.groupby("user_id", sort=False).size().to_numpy()
    users, items = dataset.num_users, dataset.num_items
    pairs = len(frame[["user_id", "item_idx"]].drop_duplicates())
    timestamps = frame["timestamp"]
    return {
        "directory": str(directory),
        "interactions_file": report.interactions_file,
        "items_file": report.items_file,
        "users": users,
        "items": items,
        "interactions": report.num_rows,
        "events": {event: int(report.events.get(event, 0)) for event in EVENTS},
        "first_day": _date(timestamps.min()),
        "last_day": _date(timestamps.max()),
        "span_days": round(float(timestamps.max() - timestamps.min()) / 86400, 1),
        "merchants": _distinct(dataset, "merchant_id"),
        "regions": _distinct(dataset, "region"),
        "duplicate_rows": report.duplicate_rows,
        "untouched_items": report.untouched_items,
        "empty_text_items": report.empty_text_items,
        "history_length": {
            "min": int(lengths.min()),
            "median": float(np.median(lengths)),
            "mean": round(float(lengths.mean()), 2),
            "max": int(lengths.max()),
        },
        "test_users": int((lengths >= 3).sum()),
        "density": pairs / (users * items),
    }


def _rows(summary: dict) -> list[tuple[str, str]]:
    """(label, value) lines of the readable table."""
    total = max(summary["interactions"], 1)
    length = summary["history_length"]
    rows = [
        ("interactions file", summary["interactions_file"]),
        ("items file", summary["items_file"]),
        ("users", f"{summary['users']:,}"),
        ("items", f"{summary['items']:,}"),
        ("interactions", f"{summary['interactions']:,}"),
        *(
            (f"  {name}", f"{count:,} ({count / total:.0%})")
            for name, count in summary["events"].items()
            if count
        ),
        (
            "time span",
            f"{summary['first_day']} .. {summary['last_day']} ({summary['span_days']:,} days)",
        ),
    ]
    rows += [
        (key, f"{summary[key]:,}") for key in ("merchants", "regions") if summary[key] is not None
    ]
    rows += [
        ("exact duplicate rows", f"{summary['duplicate_rows']:,} (kept)"),
        ("untouched items", f"{summary['untouched_items']:,} (kept)"),
        ("items without text", f"{summary['empty_text_items']:,}"),
        (
            "events per user",
            f"min {length['min']}, median {length['median']:g}, "
            f"mean {length['mean']:g}, max {length['max']}",
        ),
        (
            "test users (>= 3 events)",
            f"{summary['test_users']:,}"
            + ("" if summary["test_users"] else " (train and simulate need at least one)"),
        ),
        ("density (user-item pairs)", f"{summary['density']:.3%}"),
    ]
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", type=Path, help="the dataset directory to check")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    summary = summarize(load_dataset(args.directory), args.directory)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    table = Table(title=f"dataset {args.directory}: valid", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for label, value in _rows(summary):
        table.add_row(label, value)
    console().print(table)
    return 0
