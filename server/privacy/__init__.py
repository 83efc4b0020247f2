"""The server's privacy side: the ledger (and its repair and gaps), accounting,
node-level DP, node keys and the audit."""
