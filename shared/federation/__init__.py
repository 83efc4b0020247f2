"""What crosses between server and nodes: the weights on the wire, the node's signed
privacy report, node-level clipping and the directory of nodes."""
