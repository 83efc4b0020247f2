"""What travels between server and nodes: the trainable weights and, only without DP where the
server adds the popularity prior, each node's item counts (:func:`load_counts`).

The frozen text encoder and the text embeddings never travel (every party derives them from the
public catalog). Item tables travel row-sparse: a node sends only the rows it is responsible for
(its own catalog, and without DP only the rows that changed), as ``<name>`` values plus
``<name>@rows`` indices; floats may travel as float16.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

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


def load_arrays(record: object, reference: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The arrays of a node's reply, each read only once it is known to be a plain numpy array
    of a name ``reference`` expects and no larger than its place there (a hostile header can
    declare any shape: it is checked against the bytes that follow before anything is
    allocated). Raises ValueError naming what is wrong."""
    if not isinstance(record, ArrayRecord):
        raise ValueError(f"the update is a {type(record).__name__}, expected an ArrayRecord")
    limits = {name: value.numel() for name, value in reference.items()} | {
        name + ROWS: reference[name].shape[0] for name in ITEM_TABLES if name in reference
    }
    arrays = {}
    for name, array in record.items():
        if name not in limits:
            raise ValueError(f"unexpected array {name[:80]!r}")
        arrays[name] = _read_npy(name, array, limits[name])
    return arrays


COUNTS = "item-counts"  # a node's reply without DP: popularity's counts of its histories


def counts_record(counts: np.ndarray) -> ArrayRecord:
    """A node's item ``counts`` (shared/recommender/popularity.py) as its reply carries them."""
    return ArrayRecord({COUNTS: Array(np.asarray(counts, dtype=np.int64))})


def load_counts(record: object, num_items: int, customers: float) -> np.ndarray:
    """A node's item counts, read as :func:`load_arrays` reads weights: one vector of
    ``num_items`` integers in [0, ``customers``] (how many of its customers' histories hold
    each item cannot exceed how many it has). Raises ValueError naming what is wrong."""
    if not isinstance(record, ArrayRecord) or list(record.keys()) != [COUNTS]:
        raise ValueError(f"{COUNTS}: expected an ArrayRecord holding {COUNTS!r} alone")
    counts = _read_npy(COUNTS, record[COUNTS], num_items)
    if counts.shape != (num_items,) or counts.dtype.kind not in "iu":
        raise ValueError(
            f"{COUNTS}: {counts.dtype} of shape {counts.shape}, expected ({num_items},) integers"
        )
    # compared as Python ints: no unsigned wrap-around, no narrow-type overflow
    if len(counts) and (int(counts.min()) < 0 or int(counts.max()) > customers):
        raise ValueError(f"{COUNTS}: a count outside [0, {customers:g}], its customers")
    return counts.astype(np.int64)


def _read_npy(name: str, array: object, limit: int) -> np.ndarray:
    """One Array's values, at most ``limit`` of them, of a numeric dtype."""
    if not isinstance(array, Array) or array.stype != "numpy.ndarray":
        raise ValueError(f"{name}: not a numpy array")
    buffer = io.BytesIO(array.data)
    try:
        version = np.lib.format.read_magic(buffer)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }.get(version)
        if read_header is None:
            raise ValueError(f"format version {version}")
        shape, fortran_order, dtype = read_header(buffer)
    except (ValueError, OSError, SyntaxError, TypeError) as error:
        raise ValueError(f"{name}: not a readable .npy array ({error})") from None
    if dtype.hasobject or dtype.kind not in "fiu":
        raise ValueError(f"{name}: dtype {dtype}, expected a number type")
    count = math.prod(shape)
    if count > limit:
        raise ValueError(f"{name}: {count} values, at most {limit} expected")
    if len(array.data) - buffer.tell() != count * dtype.itemsize:
        raise ValueError(f"{name}: the data does not match its declared shape {shape}")
    values = np.frombuffer(array.data, dtype=dtype, count=count, offset=buffer.tell())
    return values.reshape(shape, order="F" if fortran_order else "C").copy()


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


# no weight of a model the nodes are sent is anywhere near this (trained ones stay within about
# 10); beyond it a crafted weight can overflow one customer's forward pass, and a non-finite
# gradient passes DP-SGD's clipping: whether it appears would tell who bought what
MAX_WEIGHT = 1e3


def weights_problem(state: Mapping[str, torch.Tensor]) -> str | None:
    """Why a node must not compute on weights the server sent (None: it may): one that is
    not a floating-point tensor (loading casts an integer or complex one into the model
    unchecked: 10**18, or a complex NaN's real part), not finite, or larger than
    :data:`MAX_WEIGHT` in magnitude."""
    for name, value in state.items():
        if not value.is_floating_point():
            return f"the server's {name[:80]} is of dtype {value.dtype}, not floating point"
        if not torch.isfinite(value).all():
            return f"the server's {name[:80]} holds NaN or infinite values"
        if (largest := float(value.abs().max()) if value.numel() else 0.0) > MAX_WEIGHT:
            return (
                f"the server's {name[:80]} holds a weight of {largest:.3g}, beyond {MAX_WEIGHT:g}"
            )
    return None


def nbytes(arrays: dict[str, np.ndarray]) -> int:
    """The bytes ``arrays`` hold (what they weigh on the wire, headers aside)."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))
