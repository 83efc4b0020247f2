"""The nodes' public keys as the server first saw them, and the check of every signed report.

``OUT/node-keys/<node>.pem`` holds the key each node presented with its first signed privacy
report (trust on first use): a later report under another key is refused, so nobody can speak
for a node once it has spoken. These files are the operator's copy; an auditor who wants a
check the operator cannot influence runs ``fedrec audit --node-keys DIR`` with the keys the
merchants hand over themselves (docs/privacy-audit.md).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from shared.federation.reports import NodeReport
from shared.federation.signing import digest_arrays, public_key_id, verify
from shared.runs.durable import private_dir

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class NodeKeys:
    """A directory of node public keys, one PEM file per node name."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def check(self, report: NodeReport, arrays: dict[str, np.ndarray] | None) -> str | None:
        """Why ``report`` (a signed DP release) must not be trusted, or None when it verifies:
        the node's key is the one on record (recorded now if it is the first), the signature
        holds over the signed fields, and ``arrays`` (when the server sees them) are the
        update the digest names."""
        assert report.release is not None
        node = report.node
        if not SAFE_NAME.match(node):
            return f"node name {node!r} is not a safe file name"
        presented = report.public_key
        if not presented.strip():
            return "the report carries no public key"
        path = self.directory / f"{node}.pem"
        if path.exists():
            if path.read_text() != presented:
                return f"signed with a key other than the one on record ({path})"
        else:
            try:
                key_id = public_key_id(presented)
            except ValueError as error:
                return f"its public key cannot be read ({error})"
            if key_id != report.key_id:
                return "its key_id does not match its public key"
            private_dir(self.directory)
            path.write_text(presented)
        if not verify(presented, report.release.as_dict(), report.signature):
            return "its signature does not verify"
        if arrays is not None and digest_arrays(arrays) != report.release.update_digest:
            return "the update differs from the one its report signs (digest mismatch)"
        return None
