"""``fedrec data convert``: public raw formats into the dataset directory
(docs/data-and-evaluation.md).

Amazon reviews (2014 and 2018 releases: a reviews file and a ``meta*`` file, JSON lines or the
2014 Python-literal lines) and MovieLens (``ratings.csv``/``movies.csv``, ml-1m ``.dat``,
ml-100k ``u.data``/``u.item``). Every Amazon review becomes a ``purchase`` event, every
MovieLens rating a ``rating`` event (``--min-rating`` keeps only the ratings at or above a
threshold); the rating is kept as an extra ``rating`` column. Items nobody rated are dropped,
rated items without metadata are kept with empty text; both are counted in the printed summary.

:func:`write_dataset` is the atomic writer shared with ``fedrec data synth``.
"""

from __future__ import annotations

import argparse
import ast
import csv
import gzip
import io
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from shared.data.dataset import DataError
from shared.runs.progress import progress_bar

GZIP = {"method": "gzip", "compresslevel": 6, "mtime": 0}  # mtime 0: same input, same bytes
JSON_SUFFIXES = (".json", ".json.gz", ".jsonl", ".jsonl.gz")
REVIEW_PATTERNS = ("*review*", "*5core*", "reviews_*")
LARGE_FILE = 20 << 20  # bytes; larger raw files get a progress bar
MOVIELENS_LAYOUTS = (  # (ratings file, movies file, flavour)
    ("ratings.csv", "movies.csv", "csv"),
    ("ratings.dat", "movies.dat", "dat"),
    ("u.data", "u.item", "100k"),
)
ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
ITEM_OUTPUT_COLUMNS = ("item_id", "title", "categories", "brand", "description", "price")


def write_dataset(
    out: str | Path, interactions: pd.DataFrame, items: pd.DataFrame, force: bool = False
) -> Path:
    """Write ``interactions.csv.gz`` and ``items.csv.gz`` into ``out``, all or nothing.

    The tables are written to a temporary sibling directory that is renamed into place, so a
    failed run leaves no partial ``out``. A non-empty ``out`` is replaced only with ``force``.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(out, "exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DataError(out, "is not empty; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        interactions.to_csv(staging / "interactions.csv.gz", index=False, compression=GZIP)
        items.to_csv(staging / "items.csv.gz", index=False, compression=GZIP)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            out.rename(trash / out.name)
            staging.rename(out)
            shutil.rmtree(trash)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


@dataclass
class Conversion:
    """The converted tables and what was dropped or filled on the way."""

    interactions: pd.DataFrame
    items: pd.DataFrame
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- shared steps


def _first_bad(mask: pd.Series | np.ndarray) -> int | None:
    """Index of the first True in ``mask``, or None."""
    hits = np.flatnonzero(np.asarray(mask))
    return int(hits[0]) if len(hits) else None


def _unix_seconds(values: pd.Series, path: Path, rows: np.ndarray) -> pd.Series:
    """Numeric unix seconds as int64; the first bad value is reported with its raw row."""
    numeric = pd.to_numeric(values, errors="coerce")
    bad = _first_bad(numeric.isna())
    if bad is not None:
        raise DataError(path, f"unparseable timestamp {values.iloc[bad]!r}", row=int(rows[bad]))
    return numeric.astype(np.int64)


def _assemble(interactions: pd.DataFrame, items: pd.DataFrame, what: str) -> Conversion:
    """Keep only rated items; add empty-text rows for rated items missing from ``items``."""
    rated = interactions["item_id"].drop_duplicates()
    known = items["item_id"].isin(rated)
    missing = rated[~rated.isin(items["item_id"])]
    filler = pd.DataFrame({"item_id": missing.to_numpy()})
    items = pd.concat([items[known], filler], ignore_index=True)
    items = items.reindex(columns=list(ITEM_OUTPUT_COLUMNS), fill_value="").fillna("")
    notes = []
    if (~known).any():
        notes.append(f"dropped {int((~known).sum()):,} {what} nobody rated")
    if len(missing):
        notes.append(f"{len(missing):,} rated {what} have no metadata (kept with empty text)")
    return Conversion(interactions.reset_index(drop=True), items, notes)


def _clean_text(value: object) -> str:
    """A metadata field as one line of text: lists are joined, whitespace collapsed."""
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        value = " ".join(_clean_text(v) for v in value)
    return " ".join(str(value).split())


# ---------------------------------------------------------------- Amazon


def _json_files(src: Path) -> list[Path]:
    return sorted(p for p in src.iterdir() if p.is_file() and p.name.endswith(JSON_SUFFIXES))


def find_amazon_files(src: Path) -> tuple[Path, Path]:
    """The (reviews, metadata) files of an Amazon download directory."""
    files = _json_files(src)
    meta = [p for p in files if p.name.startswith("meta")]
    others = [p for p in files if not p.name.startswith("meta")]
    reviews = [p for p in others if any(p.match(pattern) for pattern in REVIEW_PATTERNS)]
    reviews = reviews or others  # the 2018 release names reviews after the category only
    for kind, found, hint in (
        ("reviews", reviews, "reviews_*.json[.gz], *5core*.json[.gz]"),
        ("metadata", meta, "meta*.json[.gz]"),
    ):
        if not found:
            raise DataError(src, f"no Amazon {kind} file (expected {hint})")
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise DataError(src, f"several Amazon {kind} files ({names}); keep only one")
    return reviews[0], meta[0]


def _parse_record(line: str, path: Path, row: int) -> dict:
    """One JSON object, or one Python-literal dict (the 2014 metadata style)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        try:
            record = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise DataError(path, "neither a JSON object nor a Python literal", row=row) from None
    if not isinstance(record, dict):
        raise DataError(path, f"expected one object per line, got {type(record).__name__}", row)
    return record


def read_json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) for each non-blank line of a (gzipped) JSON-lines file."""
    opener = gzip.open if path.name.endswith(".gz") else open
    count = 0
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            lines = progress_bar(
                handle, f"reading {path.name}", disable=path.stat().st_size < LARGE_FILE
            )
            for row, line in enumerate(lines, start=1):
                if line.strip():
                    count += 1
                    yield row, _parse_record(line, path, row)
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise DataError(path, f"cannot be read: {error}") from None
    if not count:
        raise DataError(path, "the file is empty")


def _require_field(record: dict, name: str, path: Path, row: int) -> str:
    value = record.get(name)
    if value is None or str(value).strip() == "":
        raise DataError(path, f"missing field {name!r}", row=row)
    return str(value).strip()


def read_amazon_reviews(path: Path) -> pd.DataFrame:
    """Reviews as purchase events; time from ``unixReviewTime`` or ``reviewTime``."""
    users, items, times, ratings, rows = [], [], [], [], []
    for row, record in read_json_lines(path):
        users.append(_require_field(record, "reviewerID", path, row))
        items.append(_require_field(record, "asin", path, row))
        times.append(record.get("unixReviewTime", record.get("reviewTime")))
        ratings.append(record.get("overall", ""))
        rows.append(row)
    stamps = pd.Series(times, dtype=object)
    unix = pd.to_numeric(stamps, errors="coerce")
    dated = pd.to_datetime(stamps.where(unix.isna()), format="%m %d, %Y", errors="coerce", utc=True)
    bad = _first_bad(unix.isna() & dated.isna())
    if bad is not None:
        raise DataError(path, f"no usable review time ({stamps.iloc[bad]!r})", row=rows[bad])
    seconds = (dated - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    return pd.DataFrame(
        {
            "user_id": users,
            "item_id": items,
            "timestamp": unix.fillna(seconds).astype(np.int64),
            "event": "purchase",
            "rating": ratings,
        }
    )


def _amazon_categories(record: dict) -> str:
    """2014: ``categories`` is a list of paths (the first is kept); 2018: ``category`` a path."""
    paths = record.get("categories")
    if isinstance(paths, list) and paths:
        path = paths[0] if isinstance(paths[0], list) else paths
    else:
        path = record.get("category") or []
    if not isinstance(path, list):
        path = [path]
    return "|".join(part for part in (_clean_text(p) for p in path) if part)


def read_amazon_meta(path: Path) -> tuple[pd.DataFrame, int]:
    """Item metadata, first record per asin; returns the table and the count of repeats."""
    records: dict[str, dict[str, str]] = {}
    repeats = 0
    for row, record in read_json_lines(path):
        asin = _require_field(record, "asin", path, row)
        if asin in records:
            repeats += 1
            continue
        price = record.get("price")
        records[asin] = {
            "item_id": asin,
            "title": _clean_text(record.get("title")),
            "categories": _amazon_categories(record),
            "brand": _clean_text(record.get("brand")),
            "description": _clean_text(record.get("description")),
            "price": "" if price is None else _clean_text(price),
        }
    return pd.DataFrame(list(records.values()), columns=list(ITEM_OUTPUT_COLUMNS)), repeats


def convert_amazon(src: Path) -> Conversion:
    """Convert an Amazon reviews + metadata directory."""
    reviews_path, meta_path = find_amazon_files(src)
    interactions = read_amazon_reviews(reviews_path)
    items, repeats = read_amazon_meta(meta_path)
    result = _assemble(interactions, items, "items")
    if repeats:
        result.notes.append(f"ignored {repeats:,} repeated metadata records (first one kept)")
    return result


# ---------------------------------------------------------------- MovieLens


def find_movielens_files(src: Path) -> tuple[Path, Path, str]:
    """The (ratings, movies, flavour) files of a MovieLens directory."""
    for ratings, movies, flavour in MOVIELENS_LAYOUTS:
        if (src / ratings).is_file() and (src / movies).is_file():
            return src / ratings, src / movies, flavour
    expected = " or ".join(f"{r}+{m}" for r, m, _ in MOVIELENS_LAYOUTS)
    raise DataError(src, f"no MovieLens files (expected {expected})")


def _read_delimited(
    path: Path, sep: str, names: list[str] | None, encoding: str
) -> tuple[pd.DataFrame, np.ndarray]:
    """A raw table as strings plus each row's 1-based row number for messages.

    With ``names`` the file has no header and rows are line numbers; otherwise the header
    is read and rows count data rows, as in :class:`DataError`.
    """
    try:
        text = path.read_text(encoding=encoding)
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(path, f"cannot be read: {error}") from None
    if not text.strip():
        raise DataError(path, "the file is empty")
    if sep == "::":  # ml-1m; a one-character separator keeps pandas' fast parser
        text, sep = text.replace("::", "\t"), "\t"
    try:
        frame = pd.read_csv(
            io.StringIO(text),
            sep=sep,
            header=None if names else 0,
            names=names,
            dtype=str,
            keep_default_na=False,
            quoting=csv.QUOTE_NONE if names else csv.QUOTE_MINIMAL,
            index_col=False,
            skip_blank_lines=True,
        )
    except (pd.errors.ParserError, ValueError) as error:
        raise DataError(path, f"cannot be parsed: {str(error).strip()}") from None
    if frame.empty:
        raise DataError(path, "the table has a header but no rows")
    if names:  # blank lines are skipped: map rows back to line numbers
        lines = [n for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
        return frame, np.array(lines[: len(frame)])
    return frame, np.arange(1, len(frame) + 1)


def _check_columns(frame: pd.DataFrame, path: Path, rows: np.ndarray, columns: list[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(path, f"missing column(s) {missing}; found {list(frame.columns)}")
    for column in columns:
        bad = _first_bad(frame[column].isna() | (frame[column].str.strip() == ""))
        if bad is not None:
            raise DataError(path, f"empty {column} (too few fields?)", row=int(rows[bad]))


def _movielens_ratings(path: Path, flavour: str) -> pd.DataFrame:
    names = {
        "csv": None,
        "dat": ["userId", "movieId", "rating", "timestamp"],
        "100k": ["userId", "movieId", "rating", "timestamp"],
    }[flavour]
    sep = {"csv": ",", "dat": "::", "100k": "\t"}[flavour]
    frame, rows = _read_delimited(path, sep, names, "utf-8" if flavour == "csv" else "latin-1")
    _check_columns(frame, path, rows, ["userId", "movieId", "timestamp"])
    return pd.DataFrame(
        {
            "user_id": frame["userId"].str.strip(),
            "item_id": frame["movieId"].str.strip(),
            "timestamp": _unix_seconds(frame["timestamp"], path, rows),
            "event": "rating",
            "rating": frame.get("rating", ""),
        }
    )


def _movielens_movies(path: Path, flavour: str) -> pd.DataFrame:
    if flavour == "100k":
        names = ["movieId", "title", "release", "video_release", "url", *ML100K_GENRES]
        frame, rows = _read_delimited(path, "|", names, "latin-1")
        _check_columns(frame, path, rows, ["movieId", ML100K_GENRES[-1]])
        flags = frame[list(ML100K_GENRES[1:])].to_numpy() == "1"
        genres = ["|".join(np.array(ML100K_GENRES[1:])[row]) for row in flags]
    else:
        names = None if flavour == "csv" else ["movieId", "title", "genres"]
        encoding = "utf-8" if flavour == "csv" else "latin-1"
        frame, rows = _read_delimited(path, "," if flavour == "csv" else "::", names, encoding)
        _check_columns(frame, path, rows, ["movieId", "genres"])
        genres = frame["genres"].replace("(no genres listed)", "")
    duplicated = _first_bad(frame["movieId"].duplicated())
    if duplicated is not None:
        movie = frame["movieId"].iloc[duplicated]
        raise DataError(path, f"movieId {movie!r} appears twice", row=int(rows[duplicated]))
    return pd.DataFrame(
        {
            "item_id": frame["movieId"].str.strip(),
            "title": frame["title"].fillna("").str.strip(),
            "categories": genres,
        }
    )


def convert_movielens(src: Path, min_rating: float | None = None) -> Conversion:
    """Convert a MovieLens directory (ml-latest/20M/25M csv, ml-1m dat or ml-100k); with
    ``min_rating``, only the ratings at or above it are kept."""
    ratings_path, movies_path, flavour = find_movielens_files(src)
    interactions = _movielens_ratings(ratings_path, flavour)
    kept = None
    if min_rating is not None:
        ratings = pd.to_numeric(interactions["rating"], errors="coerce")
        kept = f"kept {int((ratings >= min_rating).sum()):,} of {len(ratings):,} ratings"
        interactions = interactions[ratings >= min_rating]
        if interactions.empty:
            raise DataError(ratings_path, f"no rating is at least {min_rating:g}")
    items = _movielens_movies(movies_path, flavour)
    conversion = _assemble(interactions, items, "movies")
    if kept:
        conversion.notes.insert(0, f"{kept} (>= {min_rating:g})")
    return conversion


# ---------------------------------------------------------------- command

CONVERTERS = {"amazon": convert_amazon, "movielens": convert_movielens}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", choices=sorted(CONVERTERS), help="the raw format")
    parser.add_argument(
        "src",
        type=Path,
        help="directory of the raw download: Amazon reviews_*.json[.gz] + meta*.json[.gz]; "
        "MovieLens ratings.csv+movies.csv, ratings.dat+movies.dat or u.data+u.item",
    )
    parser.add_argument(
        "out",
        type=Path,
        help="dataset directory to write (must not exist or be empty, unless --force)",
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    parser.add_argument(
        "--min-rating",
        type=float,
        default=None,
        metavar="R",
        help="movielens: keep only ratings >= R as events (e.g. 4: what a customer liked) "
        "(default: every rating is kept, 1 star included)",
    )


def run(args: argparse.Namespace) -> int:
    src: Path = args.src
    if not src.is_dir():
        raise DataError(src, "not a directory (give the folder holding the raw files)")
    if args.min_rating is None:
        result = CONVERTERS[args.source](src)
    elif args.source == "movielens":
        result = convert_movielens(src, args.min_rating)
    else:
        raise SystemExit("fedrec: --min-rating is for movielens (Amazon reviews are purchases)")
    write_dataset(args.out, result.interactions, result.items, force=args.force)
    frame = result.interactions
    summary = (
        f"converted {args.source} {src} -> {args.out}: {frame['user_id'].nunique():,} users, "
        f"{len(result.items):,} items, {len(frame):,} events"
    )
    print("; ".join([summary, *result.notes]))
    return 0
