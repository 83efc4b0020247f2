"""What travels between server and nodes: the trainable weights, and nothing else.

The frozen text encoder and the text embeddings never travel (every party derives them from the
public catalog). Item tables travel row-sparse: a node sends only the rows it is responsible for
(its own catalog, and without DP only the rows that changed), as ``<name>`` values plus
``<name>@rows`` indices; floats may travel as float16.
"""

from __future__ import annotations

import numpy as np
import torch

# item tables: parameter name -> offset of item 0's row (id_in has a padding row first)
ITEM_TABLES = {"id_in.weight": 1, "id_scores.weight": 0, "id_scores.bias": 0}
ROWS = "@rows"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights that are trained and shared (the state dict has no frozen encoder in it)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def encode(
    state: dict[str, torch.Tensor],
    rows: dict[str, np.ndarray] | None = None,
    dtype: str = "float32",
) -> dict[str, np.ndarray]:
    """Arrays for an ArrayRecord; ``rows`` limits item tables to those item indices."""
    out = {}
    for name, tensor in state.items():
        array = tensor.numpy()
        if rows is not None and name in ITEM_TABLES:
            index = np.asarray(rows[name], dtype=np.int64)
            array = array[index + ITEM_TABLES[name]]
            out[name + ROWS] = index
        out[name] = array.astype(dtype) if array.dtype.kind == "f" else array
    return out


def decode(
    arrays: dict[str, np.ndarray], reference: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
    """Validate arrays against the global model; returns float32 tensors and the row indices.

    Raises ValueError naming the first array that is missing, unexpected, of the wrong shape or
    dtype, or not finite: an update from a node is never trusted blindly.
    """
    tensors, rows = {}, {}
    expected = set(reference) | {n + ROWS for n in ITEM_TABLES if n in reference}
    names = set(arrays)
    if not names <= expected or not set(reference) <= names:
        unexpected, missing = sorted(names - expected), sorted(set(reference) - names)
        raise ValueError(f"unexpected arrays {unexpected}, missing arrays {missing}")
    for name, ref in reference.items():
        array = np.asarray(arrays[name])
        shape = tuple(ref.shape)
        if name + ROWS in arrays:
            index = np.asarray(arrays[name + ROWS])
            if index.dtype.kind not in "iu" or index.ndim != 1:
                raise ValueError(f"{name}{ROWS}: expected a vector of integer row indices")
            # compared as Python ints: no unsigned wrap-around, no narrow-type overflow
            if len(index) and (
                int(index.min()) < 0 or int(index.max()) >= shape[0] - ITEM_TABLES[name]
            ):
                raise ValueError(f"{name}{ROWS}: row index out of range")
            index = index.astype(np.int64)
            if len(np.unique(index)) != len(index):
                raise ValueError(f"{name}{ROWS}: row indices repeat")
            rows[name] = index
            shape = (len(index), *shape[1:])
        if array.shape != shape:
            raise ValueError(f"{name}: shape {array.shape}, expected {shape}")
        if array.dtype.kind != "f":
            raise ValueError(f"{name}: dtype {array.dtype}, expected floating point")
        tensor = torch.from_numpy(array.astype(np.float32))
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name}: contains NaN or infinite values")
        tensors[name] = tensor
    return tensors, rows


def nbytes(arrays: dict[str, np.ndarray]) -> int:
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))
