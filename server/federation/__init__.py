"""The server's round loop: the Flower ServerApp, strategy, aggregation, SecAgg+,
the node registry and credentials."""
