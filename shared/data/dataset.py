"""The dataset directory: loading, validation and the leave-one-out split
(both described in docs/data-and-evaluation.md).

A dataset is a directory with ``interactions.*`` and ``items.*`` tables (``.csv``, ``.csv.gz``
or ``.parquet``). Bad input raises :class:`DataError` naming the file, the row and the problem;
recoverable issues (exact duplicate rows, untouched items) are counted in :class:`LoadReport`.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from shared.data.errors import DataError

EVENTS = ("view", "click", "cart", "purchase", "rating")  # rating: an explicit rating (MovieLens)
DEFAULT_EVENT = "purchase"
INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
ITEM_COLUMNS = ("item_id", "title")
ITEM_TEXT_FIELDS = ("title", "categories", "brand", "description")
SUFFIXES = (".parquet", ".csv.gz", ".csv")
# every column fedrec reads of either table (the others are left as they are)
READ_COLUMNS = {
    *INTERACTION_COLUMNS,
    *ITEM_TEXT_FIELDS,
    "item_id",
    "event",
    "merchant_id",
    "region",
}


@dataclass
class LoadReport:
    """What loading found and kept: counts of recoverable issues, never silently dropped."""

    interactions_file: str = ""
    items_file: str = ""
    num_rows: int = 0
    duplicate_rows: int = 0
    untouched_items: int = 0
    empty_text_items: int = 0
    events: dict[str, int] = field(default_factory=dict)


@dataclass
class Dataset:
    """A loaded dataset: ``items`` in catalog order, ``interactions`` sorted by user then time.

    ``interactions['item_idx']`` indexes rows of ``items``; within a user, rows keep the
    (timestamp, file order) order of the protocol.
    """

    interactions: pd.DataFrame
    items: pd.DataFrame
    report: LoadReport

    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def num_users(self) -> int:
        return int(self.interactions["user_id"].nunique())


def find_table(directory: Path, stem: str) -> Path:
    """Return the ``stem`` table in ``directory`` (parquet, csv.gz or csv)."""
    matches = [directory / f"{stem}{suffix}" for suffix in SUFFIXES]
    found = [p for p in matches if p.exists()]
    if not found:
        names = ", ".join(p.name for p in matches)
        raise DataError(directory, f"no {stem} table (looked for {names})")
    if len(found) > 1:
        raise DataError(directory, f"several {stem} tables: {[p.name for p in found]}")
    return found[0]


def read_table(path: Path) -> pd.DataFrame:
    """Read one table as strings (parquet keeps its types); empty files are an error, and so
    is a parquet column fedrec reads (:data:`READ_COLUMNS`) that holds lists or structs."""
    try:
        if path.name.endswith(".parquet"):
            import pyarrow.parquet as pq

            nested = [
                field.name
                for field in pq.read_schema(path)
                if field.name in READ_COLUMNS and field.type.num_fields
            ]
            if nested:
                raise DataError(path, f"column(s) {nested} hold lists or structs, not values")
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataError(path, "the file is empty") from None
    except UnicodeDecodeError:  # its position is within one of the parser's chunks
        raise not_utf8(path) from None
    except DataError:
        raise
    except Exception as error:  # parser errors carry their own line numbers
        raise DataError(path, f"cannot be parsed: {error}") from None
    if frame.empty:
        raise DataError(path, "the table has a header but no rows")
    return frame


def not_utf8(path: Path) -> DataError:
    """The error for a text table that is not UTF-8, naming its first line that is not."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                byte = line[error.start : error.start + 1].hex()
                return DataError(
                    path, f"line {number} is not UTF-8 text (byte 0x{byte}): save it as UTF-8"
                )
    return DataError(path, "is not UTF-8 text: save it as UTF-8")


def usual_event(directory: Path) -> str:
    """The most common event type of a dataset's interactions, read from that column alone;
    :data:`DEFAULT_EVENT` when there is no interactions table or no ``event`` column."""
    try:
        path = find_table(Path(directory), "interactions")
    except DataError:
        return DEFAULT_EVENT
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        if "event" not in pq.read_schema(path).names:
            return DEFAULT_EVENT
        frame = pd.read_parquet(path, columns=["event"])
    else:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, usecols=lambda c: c == "event")
    if "event" not in frame:
        return DEFAULT_EVENT
    events = frame["event"].astype(str).str.strip().str.lower().replace("", DEFAULT_EVENT)
    events = events[events.isin(EVENTS)]
    return str(events.value_counts().idxmax()) if len(events) else DEFAULT_EVENT


def _require_columns(frame: pd.DataFrame, path: Path, required: tuple[str, ...]) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(path, f"missing required column(s) {missing}; found {list(frame.columns)}")


def _require_values(frame: pd.DataFrame, path: Path, column: str) -> None:
    values = frame[column].astype(str).str.strip()
    empty = np.flatnonzero((values == "") | frame[column].isna().to_numpy())
    if len(empty):
        raise DataError(path, f"empty {column}", row=int(empty[0]) + 1)


# what a timestamp may be, in unix seconds: the span of pandas' datetimes (1677 to 2262); a
# number beyond it is no time in seconds (milliseconds, say), and inf is no time at all
EARLIEST_SECONDS, LATEST_SECONDS = pd.Timestamp.min.timestamp(), pd.Timestamp.max.timestamp()


def _unix_seconds(parsed: pd.Series) -> pd.Series:
    return (parsed - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)


def parse_timestamps(values: pd.Series, path: Path) -> np.ndarray:
    """Unix seconds or ISO 8601 to float64 unix seconds, fractions of a second kept (they order
    the events of one second); the first bad or out-of-range value is reported.

    Datetime columns (parquet) are converted directly; naive times are taken as UTC.
    """
    if pd.api.types.is_datetime64_any_dtype(values):
        return _unix_seconds(pd.to_datetime(values, utc=True)).to_numpy(dtype=np.float64)
    seconds = pd.to_numeric(values, errors="coerce").astype(np.float64)
    if seconds.isna().any():
        text = values.where(seconds.isna())
        parsed = pd.to_datetime(text, errors="coerce", utc=True, format="ISO8601")
        seconds = seconds.fillna(_unix_seconds(parsed))
    bad = seconds.isna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            path,
            f"unparseable timestamp {values.iloc[row]!r}: expected unix seconds or ISO 8601 "
            "(2019-10-01T00:00:00Z; a zone written as ' UTC' is not ISO 8601)",
            row=row + 1,
        )
    outside = ~seconds.between(EARLIEST_SECONDS, LATEST_SECONDS)
    if outside.any():
        row = int(np.flatnonzero(outside.to_numpy())[0])
        raise DataError(
            path,
            f"timestamp {str(values.iloc[row])!r} is out of range: unix seconds (not "
            "milliseconds) or ISO 8601, from 1677 to 2262",
            row=row + 1,
        )
    return seconds.to_numpy(dtype=np.float64)


def load_items(path: Path) -> pd.DataFrame:
    """The catalog table at ``path``: ids as text, each once (else DataError), every text
    field present (empty where missing)."""
    items = read_table(path)
    _require_columns(items, path, ITEM_COLUMNS)
    _require_values(items, path, "item_id")
    items = items.copy()
    items["item_id"] = items["item_id"].astype(str)
    duplicated = items["item_id"].duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise DataError(path, f"item_id {items['item_id'].iloc[row]!r} appears twice", row=row + 1)
    for column in ITEM_TEXT_FIELDS:
        items[column] = items[column].fillna("").astype(str) if column in items else ""
    return items.reset_index(drop=True)


def load_interactions(path: Path, item_index: pd.Index) -> tuple[pd.DataFrame, int]:
    """Validate and order the events; returns the frame and the count of exact duplicate rows."""
    frame = read_table(path)
    _require_columns(frame, path, INTERACTION_COLUMNS)
    for column in INTERACTION_COLUMNS:
        _require_values(frame, path, column)
    keep = [c for c in (*INTERACTION_COLUMNS, "event", "merchant_id", "region") if c in frame]
    frame = frame[keep].copy()
    frame["user_id"] = frame["user_id"].astype(str)
    frame["item_id"] = frame["item_id"].astype(str)
    frame["timestamp"] = parse_timestamps(frame["timestamp"], path)
    if "event" in frame:
        events = frame["event"].fillna("").astype(str).str.strip().str.lower()
        frame["event"] = events.replace("", DEFAULT_EVENT)
        bad = ~frame["event"].isin(EVENTS)
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            problem = f"unknown event {frame['event'].iloc[row]!r}; expected one of {EVENTS}"
            raise DataError(path, problem, row=row + 1)
    else:
        frame["event"] = DEFAULT_EVENT
    item_idx = item_index.get_indexer(frame["item_id"])
    if (item_idx < 0).any():
        row = int(np.flatnonzero(item_idx < 0)[0])
        raise DataError(
            path, f"item_id {frame['item_id'].iloc[row]!r} is not in the items table", row=row + 1
        )
    frame["item_idx"] = item_idx.astype(np.int64)
    frame["row"] = np.arange(len(frame), dtype=np.int64)
    duplicates = int(frame.duplicated(subset=[c for c in keep]).sum())
    frame = frame.sort_values(["user_id", "timestamp", "row"], kind="stable").reset_index(drop=True)
    return frame, duplicates


def load_dataset(directory: str | Path) -> Dataset:
    """Load and validate a dataset directory (docs/data-and-evaluation.md)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(directory, "not a directory")
    items_path = find_table(directory, "items")
    interactions_path = find_table(directory, "interactions")
    items = load_items(items_path)
    interactions, duplicates = load_interactions(interactions_path, pd.Index(items["item_id"]))
    touched = np.zeros(len(items), dtype=bool)
    touched[interactions["item_idx"].to_numpy()] = True
    # column-wise (a row-wise join took 1.7 s on 12,101 products, at every node load)
    no_text = np.logical_and.reduce([items[f].str.strip().eq("") for f in ITEM_TEXT_FIELDS])
    report = LoadReport(
        interactions_file=str(interactions_path),
        items_file=str(items_path),
        num_rows=len(interactions),
        duplicate_rows=duplicates,
        untouched_items=int((~touched).sum()),
        empty_text_items=int(no_text.sum()),
        events=interactions["event"].value_counts().to_dict(),
    )
    return Dataset(interactions=interactions, items=items, report=report)


@dataclass
class Split:
    """Leave-one-out temporal split (docs/data-and-evaluation.md), per-user item-index sequences.

    ``train[u]`` is user ``u``'s training history. ``valid_target[u]``/``test_target[u]`` are
    -1 for users with fewer than 3 events (they only train). The history used to rank for the
    validation target is ``train[u]``; for the test target it is ``train[u] + [valid_target[u]]``.
    """

    user_ids: np.ndarray
    train: list[np.ndarray]
    valid_target: np.ndarray
    test_target: np.ndarray
    num_items: int

    @property
    def test_users(self) -> np.ndarray:
        return np.flatnonzero(self.test_target >= 0)

    def history(self, user: int, stage: str) -> np.ndarray:
        """The history a user is ranked from at ``stage`` ('valid' or 'test')."""
        if stage == "valid":
            return self.train[user]
        return np.append(self.train[user], self.valid_target[user]).astype(np.int64)

    def training_histories(
        self, refit: bool = False, valid_fraction: float = 0.0
    ) -> list[np.ndarray]:
        """What a model may train on: the training histories, plus (``refit``) the validation
        targets, once the validation split has served its purpose, except those of the
        validation customers (``valid_fraction``, :meth:`validation_users`), kept out to
        choose a federation's rounds. Test targets never."""
        if not refit:
            return list(self.train)
        held = np.zeros(len(self.train), dtype=bool)
        held[self.validation_users(valid_fraction)] = True
        return [
            self.history(u, "test") if self.test_target[u] >= 0 and not held[u] else self.train[u]
            for u in range(len(self.train))
        ]

    def validation_users(self, fraction: float) -> np.ndarray:
        """The evaluated users whose validation event stays out of training under ``refit``
        to choose a federation's rounds: those whose id hashes below ``fraction``
        (:func:`validation_customer`), so a node picks the same customers as the server from
        its own data, without being told who."""
        users = self.test_users
        if fraction >= 1:
            return users
        chosen = [validation_customer(str(self.user_ids[u]), fraction) for u in users]
        return users[np.asarray(chosen, dtype=bool)]

    def sequences(self) -> list[np.ndarray]:
        """Every customer's whole ordered sequence (training history and both targets)."""
        return [
            self.history(u, "test").tolist() + [self.test_target[u]]
            if self.test_target[u] >= 0
            else self.train[u]
            for u in range(len(self.train))
        ]

    def target(self, stage: str) -> np.ndarray:
        return self.valid_target if stage == "valid" else self.test_target

    def subset(self, users: np.ndarray) -> Split:
        users = np.asarray(users, dtype=np.int64)
        return Split(
            user_ids=self.user_ids[users],
            train=[self.train[u] for u in users],
            valid_target=self.valid_target[users],
            test_target=self.test_target[users],
            num_items=self.num_items,
        )


def validation_customer(user_id: str, fraction: float) -> bool:
    """Whether a customer is a validation customer at ``fraction``: the first 8 bytes of
    sha256 of the id as a number in [0, 1), below ``fraction``."""
    digest = hashlib.sha256(user_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def leave_one_out(dataset: Dataset) -> Split:
    """Split every user's ordered events: last = test, second-to-last = valid, rest = train."""
    frame = dataset.interactions
    users, starts = np.unique(frame["user_id"].to_numpy(), return_index=True)
    items = frame["item_idx"].to_numpy()
    bounds = np.append(starts, len(frame))
    train, valid, test = [], np.full(len(users), -1), np.full(len(users), -1)
    for u in range(len(users)):
        sequence = items[bounds[u] : bounds[u + 1]]
        if len(sequence) >= 3:
            train.append(sequence[:-2].copy())
            valid[u], test[u] = sequence[-2], sequence[-1]
        else:
            train.append(sequence.copy())
    return Split(users, train, valid, test, dataset.num_items)


def require_test_users(dataset: Dataset, split: Split) -> None:
    """Refuse, for a run that measures its model, a dataset where no customer has the three
    events evaluation needs: there would be nothing to measure and no epoch or round to choose."""
    if len(split.test_users) == 0:
        longest = int(dataset.interactions.groupby("user_id").size().max())
        raise DataError(
            dataset.report.interactions_file,
            f"no customer has the 3 events that evaluation needs (the last is the test target, "
            f"the one before it the validation target): {dataset.num_users:,} customer(s) with "
            f"at most {longest} event(s) each; nothing to measure a model on",
        )
