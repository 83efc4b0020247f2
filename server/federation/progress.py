"""What a federation shows as it runs: one line per round, the nodes' replies as they come in
during a long round, and ``rounds.png``."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Message
from flwr.serverapp import Grid

from server.federation.selection import MONITOR
from shared.runs.durable import make_private

log = logging.getLogger("fedrec.server")
PULL_INTERVAL_S = 0.1  # as Flower's own send_and_receive polls


def round_quality(entry: dict) -> tuple[str, float] | None:
    """The round's headline figure: the server's evaluation if it has one, else the nodes'."""
    for stage in ("test", "valid"):
        if stage in entry:
            return f"{stage} ndcg@10", entry[stage]["ndcg@10"]
    if entry.get("federated"):
        return "federated ndcg@10", entry["federated"]["ndcg@10"]
    return None


def report_round(entry: dict, rounds: int, show_progress: bool) -> None:
    """One line per round: on the terminal, or in the log when the terminal is quiet."""
    quality = round_quality(entry)
    figure = f"{quality[0]} {quality[1]:.4f}, " if quality else ""
    if entry.get("selection"):
        figure += f"validation {MONITOR} {entry['selection'][MONITOR]:.4f}, "
    line = f"round {entry['round']}/{rounds}: {figure}{entry['nodes']} nodes, {entry['round_s']} s"
    if show_progress:
        print(line, flush=True)
    else:
        log.info(line)


def plot_rounds(history: list[dict], path: Path) -> None:
    """Quality of the global model over rounds (PNG): the server's evaluation and the nodes'
    (federated), whichever the run has."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 3.5))
    sources = (
        ("test", "test"),
        ("valid", "valid"),
        ("federated", "federated"),
        ("selection", "validation customers"),
    )
    for source, label in sources:
        points = [(h["round"], h[source]) for h in history if h.get(source)]
        for metric, style in (("ndcg@10", "o-"), ("hr@10", "s--")):
            if points:
                rounds, values = zip(*((r, v[metric]) for r, v in points), strict=True)
                ax.plot(rounds, values, style, label=f"{label} {metric}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.set_xlabel("round")
    ax.set_ylabel("quality")
    ax.set_title("Global model quality over rounds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    make_private(path)


class ReplyProgress:
    """A Grid whose ``send_and_receive`` says how many nodes have replied, as they reply, once a
    round has waited ``quiet_s`` seconds (a private encoder round on a CPU takes minutes per
    node); the rest is the wrapped Grid's. Wrap the engine's own Grid, beneath any wrapper
    that alters replies, which this one then sees."""

    def __init__(self, grid: Grid, show_progress: bool, quiet_s: float = 30.0):
        self.grid, self.show_progress, self.quiet_s = grid, show_progress, quiet_s

    def __getattr__(self, name: str):
        return getattr(self.grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Flower's push-then-pull until every reply is in or ``timeout`` has passed."""
        messages = list(messages)
        kind = messages[0].metadata.message_type if messages else ""
        waiting = set(self.grid.push_messages(messages))
        total, start, replies = len(waiting), time.monotonic(), []
        while waiting and (timeout is None or time.monotonic() - start < timeout):
            arrived = list(self.grid.pull_messages(waiting))
            replies += arrived
            waiting -= {reply.metadata.reply_to_message_id for reply in arrived}
            elapsed = time.monotonic() - start
            if arrived and elapsed >= self.quiet_s:
                line = f"  {kind}: {len(replies)} of {total} nodes have replied, {elapsed:.0f} s"
                if self.show_progress:
                    print(line, flush=True)
                else:
                    log.info(line)
            if waiting:
                time.sleep(PULL_INTERVAL_S)
        return replies
