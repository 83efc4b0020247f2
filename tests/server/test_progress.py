"""The nodes' replies reported as they come in (server/federation/progress.py:ReplyProgress)."""

from __future__ import annotations

import time

from flwr.app import Message, Metadata, RecordDict

from server.federation.progress import ReplyProgress


def _message(message_id: str, reply_to: str = "", message_type: str = "train") -> Message:
    metadata = Metadata(
        run_id=1,
        message_id=message_id,
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id=reply_to,
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type=message_type,
    )
    return Message(RecordDict({}), metadata=metadata)


class TrickleGrid:
    """Replies one message at a time, one per pull, and never to the ones in ``silent``."""

    def __init__(self, silent: tuple[str, ...] = ()):
        self.silent, self.pulls = silent, 0

    def push_messages(self, messages):
        return [f"m{k}" for k, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        self.pulls += 1
        ready = sorted(i for i in message_ids if i not in self.silent)
        return [_message(f"r-{ready[0]}", reply_to=ready[0])] if ready else []

    def get_node_ids(self):
        return [1, 2, 3]


def test_every_reply_comes_back_and_each_arrival_is_reported(capsys) -> None:
    grid = ReplyProgress(TrickleGrid(), show_progress=True, quiet_s=0.0)
    sent = [_message("", message_type="train.encoder") for _ in range(3)]
    replies = grid.send_and_receive(sent)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0].strip() for line in lines] == [
        f"train.encoder: {k} of 3 nodes have replied" for k in (1, 2, 3)
    ]
    assert grid.get_node_ids() == [1, 2, 3]  # the rest is the wrapped Grid's


def test_a_short_round_stays_quiet_and_a_silent_node_ends_at_the_timeout(capsys) -> None:
    inner = TrickleGrid(silent=("m1",))
    grid = ReplyProgress(inner, show_progress=True)  # 30 s before anything is reported
    start = time.monotonic()
    replies = grid.send_and_receive([_message("") for _ in range(3)], timeout=0.5)
    assert 0.5 <= time.monotonic() - start < 5
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m2"]
    assert inner.pulls > 2  # it kept asking for the silent node until the timeout
    assert capsys.readouterr().out == ""


def test_without_a_terminal_the_lines_go_to_the_log(caplog) -> None:
    grid = ReplyProgress(TrickleGrid(), show_progress=False, quiet_s=0.0)
    with caplog.at_level("INFO", logger="fedrec.server"):
        grid.send_and_receive([_message("")])
    assert "train: 1 of 1 nodes have replied" in caplog.text
