"""The server's round loop: the Flower ServerApp, strategy, aggregation, SecAgg+,
the node registry, credentials and the Fleet gateway in front of the SuperLink."""
