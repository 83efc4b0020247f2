"""The dataset directory: loading and its errors, the split, synth, convert and validate."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared.data.convert import write_dataset
from shared.data.dataset import (
    DataError,
    Dataset,
    leave_one_out,
    load_dataset,
    require_test_users,
)
from shared.data.synth import SynthConfig, generate, make_catalog
from simulations.cli import main

ITEMS = (
    "item_id,title,categories\na,Rose Serum,Beauty|Skin Care\nb,Pan,Home|Kitchen\nc,Mat,Sports\n"
)
INTERACTIONS = (
    "user_id,item_id,timestamp,event\n"
    "u1,a,100,view\n"
    "u1,b,200,click\n"
    "u2,a,150,purchase\n"
    "u1,c,300,cart\n"
)


def write_dir(path: Path, interactions: str = INTERACTIONS, items: str = ITEMS) -> Path:
    """A dataset directory holding the two tables as plain csv."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "interactions.csv").write_text(interactions)
    (path / "items.csv").write_text(items)
    return path


def load_error(path: Path) -> DataError:
    with pytest.raises(DataError) as caught:
        load_dataset(path)
    return caught.value


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize(
    ("table", "text", "file", "row", "problem"),
    [
        ("interactions", "user_id,item_id\nu1,a\n", "interactions.csv", None, "timestamp"),
        (
            "interactions",
            INTERACTIONS.replace("200", "yesterday"),
            "interactions.csv",
            2,
            "unparseable timestamp 'yesterday'",
        ),
        (  # a shop tracker's export (REES46): the error says what would be read
            "interactions",
            INTERACTIONS.replace("200", "2019-10-01 00:00:00 UTC"),
            "interactions.csv",
            2,
            "'2019-10-01 00:00:00 UTC': expected unix seconds or ISO 8601 (2019-10-01T00:00:00Z",
        ),
        (
            "interactions",
            INTERACTIONS.replace("u2,a", "u2,zz"),
            "interactions.csv",
            3,
            "'zz' is not in the items table",
        ),
        ("interactions", "", "interactions.csv", None, "empty"),
        ("interactions", "user_id,item_id,timestamp\n", "interactions.csv", None, "no rows"),
        (
            "interactions",
            INTERACTIONS.replace("cart", "wishlist"),
            "interactions.csv",
            4,
            "unknown event 'wishlist'",
        ),
        (
            "interactions",
            INTERACTIONS.replace("u2,a,150", "u2,,150"),
            "interactions.csv",
            3,
            "empty item_id",
        ),
        (  # milliseconds are no unix seconds (it crashed validate: year 55,840)
            "interactions",
            INTERACTIONS.replace(",200,", ",1700000000000,"),
            "interactions.csv",
            2,
            "timestamp '1700000000000' is out of range",
        ),
        ("interactions", INTERACTIONS.replace(",150,", ",inf,"), "interactions.csv", 3, "'inf'"),
        ("items", ITEMS + "b,Another Pan,Home\n", "items.csv", 4, "'b' appears twice"),
        ("items", "item_id,categories\na,Beauty\n", "items.csv", None, "title"),
        ("items", "", "items.csv", None, "empty"),
    ],
)
def test_bad_input_names_file_row_and_problem(
    tmp_path: Path, table: str, text: str, file: str, row: int | None, problem: str
) -> None:
    tables = {"interactions": INTERACTIONS, "items": ITEMS, table: text}
    error = load_error(write_dir(tmp_path, **tables))
    message = str(error)
    assert file in message and problem in message
    assert error.row == row
    if row is not None:
        assert f"row {row}" in message


@pytest.mark.parametrize("column", ["region", "user_id", "title"])
def test_a_parquet_column_of_lists_is_named_not_a_crash(tmp_path: Path, column: str) -> None:
    """A list or struct where fedrec reads a value (a region of [1], a user id {"x": 1}) was a
    TypeError (unhashable) or a title silently read as the text of the list."""
    items = pd.DataFrame({"item_id": ["a", "b"], "title": ["Pan", "Pot"]})
    events = pd.DataFrame({"user_id": ["u", "u"], "item_id": ["a", "b"], "timestamp": [1, 2]})
    events["region"] = "north"
    table, frame = ("items", items) if column == "title" else ("interactions", events)
    frame[column] = [{"x": 1}, {"x": 2}] if column == "user_id" else [[1], [2]]
    tmp_path.mkdir(exist_ok=True)
    items.to_parquet(tmp_path / "items.parquet")
    events.to_parquet(tmp_path / "interactions.parquet")
    error = load_error(tmp_path)
    assert f"{table}.parquet" in str(error) and f"['{column}'] hold lists or structs" in str(error)


@pytest.mark.parametrize("name", ["items.csv", "items.csv.gz"])
def test_a_table_not_in_utf8_names_the_line(tmp_path: Path, name: str) -> None:
    """A catalog saved as Latin-1 (a spreadsheet's export): the message named a position in
    one of the parser's chunks ("position 2"), nowhere near the product; it names the line."""
    path = write_dir(tmp_path)
    (path / "items.csv").unlink()
    text = ITEMS + "d,Crème brûlée Lip Balm,Beauty\n"
    data = text.encode("latin-1")
    (path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    message = str(load_error(path))
    assert name in message and "line 5 is not UTF-8 text" in message, message
    assert "position" not in message


def test_missing_table_and_missing_directory(tmp_path: Path) -> None:
    (tmp_path / "items.csv").write_text(ITEMS)
    assert "no interactions table" in str(load_error(tmp_path))
    assert "not a directory" in str(load_error(tmp_path / "nowhere"))


def test_exact_duplicates_are_counted_not_dropped(tmp_path: Path) -> None:
    dataset = load_dataset(write_dir(tmp_path, INTERACTIONS + "u1,b,200,click\nu1,b,200,view\n"))
    assert dataset.report.duplicate_rows == 1  # the view at the same time is not a duplicate
    assert dataset.report.num_rows == len(dataset.interactions) == 6


def test_untouched_and_textless_items_are_reported(tmp_path: Path) -> None:
    items = ITEMS + "d,,\n"
    dataset = load_dataset(write_dir(tmp_path, items=items))
    assert dataset.report.untouched_items == 1
    assert dataset.report.empty_text_items == 1
    assert dataset.num_items == 4


def test_event_defaults_to_purchase(tmp_path: Path) -> None:
    dataset = load_dataset(write_dir(tmp_path, "user_id,item_id,timestamp\nu1,a,1\nu1,b,2\n"))
    assert dataset.report.events == {"purchase": 2}


def test_csv_csv_gz_and_parquet_load_identically(tmp_path: Path) -> None:
    source = load_dataset(write_dir(tmp_path / "csv"))
    raw = {
        name: pd.read_csv(tmp_path / "csv" / f"{name}.csv", dtype=str)
        for name in ("interactions", "items")
    }
    for suffix in ("csv.gz", "parquet"):
        directory = tmp_path / suffix.replace(".", "_")
        directory.mkdir()
        for name, frame in raw.items():
            path = directory / f"{name}.{suffix}"
            frame.to_parquet(path) if suffix == "parquet" else frame.to_csv(path, index=False)
        other = load_dataset(directory)
        pd.testing.assert_frame_equal(other.interactions, source.interactions)
        pd.testing.assert_frame_equal(other.items, source.items)


def test_iso_and_unix_timestamps_agree(tmp_path: Path) -> None:
    iso = ["2020-01-01T00:00:00Z", "2020-01-01T02:00:00+01:00", "2020-01-02", "1577836800"]
    unix = [1577836800, 1577840400, 1577923200, 1577836800]
    rows = "".join(f"u{i},a,{t}\n" for i, t in enumerate(iso))
    dataset = load_dataset(write_dir(tmp_path, "user_id,item_id,timestamp\n" + rows))
    assert dataset.interactions["timestamp"].tolist() == unix


def test_parquet_datetime_column_is_unix_seconds(tmp_path: Path) -> None:
    pd.DataFrame({"item_id": ["a"], "title": ["x"]}).to_parquet(tmp_path / "items.parquet")
    events = pd.DataFrame(
        {"user_id": ["u"], "item_id": ["a"], "timestamp": pd.to_datetime(["2020-01-01T00:00:00"])}
    )
    events.to_parquet(tmp_path / "interactions.parquet")
    assert load_dataset(tmp_path).interactions["timestamp"].tolist() == [1577836800]


def test_equal_timestamps_keep_file_order(tmp_path: Path) -> None:
    rows = "u1,c,5\nu2,a,5\nu1,a,5\nu1,b,1\nu1,b,5\n"
    dataset = load_dataset(write_dir(tmp_path, "user_id,item_id,timestamp\n" + rows))
    u1 = dataset.interactions[dataset.interactions["user_id"] == "u1"]
    assert u1["item_id"].tolist() == ["b", "c", "a", "b"]


def test_fractions_of_a_second_order_the_events(tmp_path: Path) -> None:
    """Written out of time order within one second (unix and ISO 8601): the times decide, not
    the file (they were cut to whole seconds, leaving the file order)."""
    rows = "u1,a,100.9\nu1,b,100.2\nu2,c,1970-01-01T00:01:40.7Z\nu2,a,1970-01-01T00:01:40.3Z\n"
    dataset = load_dataset(write_dir(tmp_path, "user_id,item_id,timestamp\n" + rows))
    assert dataset.interactions["item_id"].tolist() == ["b", "a", "a", "c"]
    assert dataset.interactions["timestamp"].tolist() == pytest.approx([100.2, 100.9, 100.3, 100.7])


def test_a_dataset_nobody_can_be_evaluated_on_is_refused(tmp_path: Path) -> None:
    """Customers of one or two events only: no test target, so a run has nothing to measure
    (a federation crashed choosing its rounds; train reported 0.0 for nobody)."""
    dataset = load_dataset(write_dir(tmp_path))  # u1 has 3 events, u2 one
    require_test_users(dataset, leave_one_out(dataset))
    dataset = load_dataset(write_dir(tmp_path, INTERACTIONS.replace("u1,c,300", "u2,c,300")))
    with pytest.raises(DataError, match="no customer has the 3 events") as caught:
        require_test_users(dataset, leave_one_out(dataset))
    assert "interactions.csv" in str(caught.value) and "at most 2 event(s)" in str(caught.value)


def test_leave_one_out(tmp_path: Path) -> None:
    rows = "u1,a,1\nu1,b,2\nu1,c,3\nu1,a,4\nu2,b,1\nu2,c,2\nu3,c,9\nu3,a,1\nu3,b,5\n"
    dataset = load_dataset(write_dir(tmp_path, "user_id,item_id,timestamp\n" + rows))
    split = leave_one_out(dataset)
    a, b, c = (int(dataset.items.index[dataset.items["item_id"] == x][0]) for x in "abc")
    u1, u2, u3 = (list(split.user_ids).index(u) for u in ("u1", "u2", "u3"))
    assert split.train[u1].tolist() == [a, b]
    assert (split.valid_target[u1], split.test_target[u1]) == (c, a)
    assert split.history(u1, "valid").tolist() == [a, b]
    assert split.history(u1, "test").tolist() == [a, b, c]  # includes the valid target
    assert split.train[u2].tolist() == [b, c]  # fewer than 3 events: only trains
    assert (split.valid_target[u2], split.test_target[u2]) == (-1, -1)
    assert (split.train[u3].tolist(), split.valid_target[u3], split.test_target[u3]) == (
        [a],
        b,
        c,
    )  # ordered by time, not by file
    assert sorted(split.test_users.tolist()) == sorted([u1, u3])


# ---------------------------------------------------------------- synth


def test_synth_passes_the_loader_with_every_field(synth_dataset_dir: Path) -> None:
    dataset = load_dataset(synth_dataset_dir)
    frame = dataset.interactions
    assert dataset.num_users == 600 and dataset.num_items == 300
    events = dataset.report.events
    assert set(events) == {"view", "click", "cart", "purchase"}
    assert events["view"] > events["click"] > events["cart"]  # a funnel
    assert frame["merchant_id"].nunique() == 5 and dataset.items["merchant_id"].nunique() == 5
    assert frame["region"].nunique() == 4
    assert frame.groupby("user_id")["region"].nunique().max() == 1  # the customer's region
    assert dataset.report.duplicate_rows == 0 and dataset.report.empty_text_items == 0
    assert not frame.duplicated(["user_id", "item_id"]).any()  # no repeats: all rankable
    assert (frame.groupby("user_id")["timestamp"].diff().dropna() > 0).all()
    for column in ("title", "categories", "brand", "description"):
        assert (dataset.items[column].str.len() > 0).all()
    assert dataset.items["categories"].str.count(r"\|").min() >= 2


def test_synth_is_deterministic(tmp_path: Path) -> None:
    def synth(out: str, seed: int) -> list[bytes]:
        args = [
            "data",
            "synth",
            str(tmp_path / out),
            "--users",
            "80",
            "--items",
            "60",
            "--seed",
            str(seed),
        ]
        assert main(args) == 0
        return [
            (tmp_path / out / f"{name}.csv.gz").read_bytes() for name in ("interactions", "items")
        ]

    assert synth("a", 3) == synth("b", 3)
    different = synth("c", 4)
    assert different[0] != synth("a2", 3)[0] and different[1] != synth("a3", 3)[1]


def consecutive_and_baseline(frame: pd.DataFrame, column: str) -> tuple[float, float, float]:
    """Share of equal ``column`` for consecutive events of a user, for random event pairs and
    for consecutive events after shuffling each user's order."""
    values, users = frame[column].to_numpy(), frame["user_id"].to_numpy()
    rng = np.random.default_rng(0)
    same_user = users[1:] == users[:-1]
    consecutive = (values[1:] == values[:-1])[same_user].mean()
    pairs = rng.integers(0, len(values), (2, 20_000))
    random_pairs = (values[pairs[0]] == values[pairs[1]]).mean()
    shuffled = values[np.lexsort((rng.random(len(values)), users))]
    shuffled_consecutive = (shuffled[1:] == shuffled[:-1])[same_user].mean()
    return consecutive, random_pairs, shuffled_consecutive


def test_synth_text_and_order_carry_signal(synth_dataset_dir: Path) -> None:
    dataset = load_dataset(synth_dataset_dir)
    items = dataset.items.iloc[dataset.interactions["item_idx"]]
    frame = dataset.interactions.assign(
        department=items["categories"].str.split("|").str[0].to_numpy(),
        brand=items["brand"].to_numpy(),
    )
    consecutive, random_pairs, _ = consecutive_and_baseline(frame, "department")
    assert consecutive > 1.4 * random_pairs  # tastes over categories, visible in the text
    consecutive, _, shuffled = consecutive_and_baseline(frame, "brand")
    assert consecutive > 2 * shuffled  # the brand-line habit: order matters


def test_synth_hidden_style_is_signal_beyond_text() -> None:
    config = SynthConfig(users=600, items=300, seed=0)
    interactions, items = generate(config)
    catalog = make_catalog(config, np.random.default_rng(config.seed))  # the first draws
    assert catalog.items["title"].equals(items["title"])
    index = pd.Index(items["item_id"]).get_indexer(interactions["item_id"])
    users = interactions["user_id"].to_numpy()
    same_user = users[1:] == users[:-1]
    a, b = index[:-1][same_user], index[1:][same_user]
    same_leaf = catalog.leaf[a] == catalog.leaf[b]  # same text category: style must differ
    cosine = (catalog.style[a] * catalog.style[b]).sum(axis=1)
    assert "style" not in " ".join(items.columns)
    assert cosine[same_leaf].mean() > 0.1  # random unit vectors: about 0


def test_synth_refuses_non_empty_out_unless_forced(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["data", "synth", str(out), "--users", "20", "--items", "30"]
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert main([*args, "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["interactions.csv.gz", "items.csv.gz"]
    assert "20 users, 30 items" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary leftovers


def test_failed_write_leaves_no_partial_output(tmp_path: Path, monkeypatch) -> None:
    interactions, items = generate(SynthConfig(users=20, items=30))
    calls = []

    def failing_to_csv(self, path, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        Path(path).write_bytes(b"")

    monkeypatch.setattr(pd.DataFrame, "to_csv", failing_to_csv)
    with pytest.raises(OSError, match="disk full"):
        write_dataset(tmp_path / "out", interactions, items)
    assert list(tmp_path.iterdir()) == []


def test_synth_default_size(tmp_path: Path) -> None:
    interactions, items = generate()
    assert len(items) == 800 and interactions["user_id"].nunique() == 2000
    assert 8 < len(interactions) / 2000 < 16


# ---------------------------------------------------------------- convert: Amazon


def write_lines(path: Path, records: list, literal: bool = False) -> None:
    text = "".join((repr(r) if literal else json.dumps(r)) + "\n" for r in records)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)


def review(user: str, asin: str, when: int | str, rating: float = 5.0) -> dict:
    time_field = {"unixReviewTime": when} if isinstance(when, int) else {"reviewTime": when}
    return {"reviewerID": user, "asin": asin, "overall": rating, "reviewText": "ok", **time_field}


def convert(source: str, src: Path, out: Path) -> Dataset:
    assert main(["data", "convert", source, str(src), str(out)]) == 0
    return load_dataset(out)


def convert_error(source: str, src: Path, out: Path, capsys) -> str:
    """Run a conversion that must fail with exit 2; returns what it printed on stderr."""
    capsys.readouterr()
    assert main(["data", "convert", source, str(src), str(out)]) == 2
    return capsys.readouterr().err


def test_convert_amazon_2014(tmp_path: Path, capsys) -> None:
    src = tmp_path / "raw"
    src.mkdir()
    write_lines(
        src / "reviews_Beauty_5.json.gz",
        [
            review("A1", "B01", 1391040000),
            review("A1", "B02", 1391040000),
            review("A2", "B01", 1300000000),
            review("A1", "B04", 1400000000, 3.0),
        ],
    )
    write_lines(
        src / "meta_Beauty.json.gz",
        [
            {
                "asin": "B01",
                "title": "Rose Serum",
                "categories": [["Beauty", "Skin Care"], ["Gifts"]],
                "brand": "Luma",
                "price": 12.5,
                "salesRank": {"Beauty": 10},
            },
            {
                "asin": "B02",
                "title": "Pan",
                "categories": [["Home", "Kitchen"]],
                "description": "A pan.\nNonstick.",
            },
            {"asin": "B03", "title": "Nobody bought me", "categories": [["Beauty"]]},
        ],
        literal=True,
    )
    dataset = convert("amazon", src, tmp_path / "out")
    assert (dataset.num_users, dataset.num_items, len(dataset.interactions)) == (2, 3, 4)
    items = dataset.items.set_index("item_id")
    assert items.loc["B01", "categories"] == "Beauty|Skin Care"
    assert items.loc["B01", "brand"] == "Luma" and items.loc["B01", "price"] == "12.5"
    assert items.loc["B02", "description"] == "A pan. Nonstick."
    assert items.loc["B04", "title"] == "" and "B03" not in items.index
    assert dataset.report.events == {"purchase": 4}
    printed = capsys.readouterr().out
    assert "dropped 1 items nobody rated" in printed and "1 rated items have no metadata" in printed


def test_convert_amazon_2018(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    src.mkdir()
    write_lines(
        src / "All_Beauty.json",
        [
            review("A1", "B01", "01 30, 2014"),
            review("A1", "B02", "2 1, 2014"),
            review("A2", "B02", "12 31, 2013"),
        ],
    )
    meta = {
        "asin": "B01",
        "title": "Serum",
        "category": ["Beauty", "Face"],
        "description": ["Light.", "Daily."],
        "price": "$9.99",
        "brand": "Luma",
    }
    write_lines(src / "meta_All_Beauty.json", [meta, meta, {"asin": "B02", "title": "Oil"}])
    dataset = convert("amazon", src, tmp_path / "out")
    items = dataset.items.set_index("item_id")
    assert items.loc["B01", "categories"] == "Beauty|Face"
    assert items.loc["B01", "description"] == "Light. Daily."
    frame = dataset.interactions.set_index(["user_id", "item_id"])
    assert frame.loc[("A1", "B01"), "timestamp"] == 1391040000  # 2014-01-30 UTC


def test_convert_amazon_bad_input(tmp_path: Path, capsys) -> None:
    src = tmp_path / "raw"
    src.mkdir()
    out = tmp_path / "out"
    assert "no Amazon reviews file" in convert_error("amazon", src, out, capsys)
    write_lines(src / "reviews_X.json", [review("A1", "B01", 1), review("A2", "B01", 2)])
    (src / "meta_X.json").write_text('{"asin": "B01"}\n{"asin": "B02", oops\n')
    assert "meta_X.json, row 2: neither a JSON object" in convert_error("amazon", src, out, capsys)
    write_lines(src / "reviews_X.json", [review("A1", "B01", 1), {"asin": "B01"}])
    error = convert_error("amazon", src, out, capsys)
    assert "reviews_X.json, row 2: missing field 'reviewerID'" in error
    write_lines(src / "reviews_X.json", [review("A1", "B01", "someday")])
    error = convert_error("amazon", src, out, capsys)
    assert "reviews_X.json, row 1: no usable review time ('someday')" in error
    write_lines(src / "reviews_Y.json", [review("A1", "B01", 1)])
    assert "several Amazon reviews files" in convert_error("amazon", src, out, capsys)
    assert not out.exists()


# ---------------------------------------------------------------- convert: MovieLens


def test_convert_movielens_csv(tmp_path: Path) -> None:
    src = tmp_path / "ml-latest-small"
    src.mkdir()
    (src / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,10,4.0,964982703\n1,20,5.0,964981247\n"
        "2,10,3.5,964983815\n"
    )
    (src / "movies.csv").write_text(
        'movieId,title,genres\n10,"Shawshank Redemption, The (1994)",Crime|Drama\n'
        "20,Heat (1995),Action|Crime|Thriller\n30,Unrated (2000),(no genres listed)\n"
    )
    dataset = convert("movielens", src, tmp_path / "out")
    assert (dataset.num_users, dataset.num_items, len(dataset.interactions)) == (2, 2, 3)
    items = dataset.items.set_index("item_id")
    assert items.loc["10", "title"] == "Shawshank Redemption, The (1994)"
    assert items.loc["20", "categories"] == "Action|Crime|Thriller"


def test_convert_movielens_min_rating_keeps_the_liked_ones(tmp_path: Path, capsys) -> None:
    """Every rating is a ``rating`` event (1 star included) unless --min-rating drops it."""
    src = tmp_path / "ml"
    src.mkdir()
    (src / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,10,1.0,1\n1,20,4.0,2\n2,20,5.0,3\n2,10,4.5,4\n"
    )
    (src / "movies.csv").write_text("movieId,title,genres\n10,Heat (1995),Action\n20,Up,Drama\n")
    everything = convert("movielens", src, tmp_path / "all")
    assert len(everything.interactions) == 4
    assert set(everything.interactions["event"]) == {"rating"}
    capsys.readouterr()
    argv = ["data", "convert", "movielens", str(src), str(tmp_path / "liked")]
    assert main([*argv, "--min-rating", "4"]) == 0
    assert "kept 3 of 4 ratings (>= 4)" in capsys.readouterr().out
    liked = load_dataset(tmp_path / "liked").interactions
    assert len(liked) == 3 and set(liked["event"]) == {"rating"}
    with pytest.raises(SystemExit, match="--min-rating is for movielens"):
        main(["data", "convert", "amazon", str(src), str(tmp_path / "a"), "--min-rating", "4"])


def test_convert_movielens_dat(tmp_path: Path) -> None:
    src = tmp_path / "ml-1m"
    src.mkdir()
    (src / "ratings.dat").write_text(
        "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n", encoding="latin-1"
    )
    (src / "movies.dat").write_text(
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n661::Amélie (2001)::Comedy|Romance\n",
        encoding="latin-1",
    )
    dataset = convert("movielens", src, tmp_path / "out")
    assert (dataset.num_users, dataset.num_items, len(dataset.interactions)) == (2, 2, 3)
    assert dataset.items.set_index("item_id").loc["661", "title"] == "Amélie (2001)"


def test_convert_movielens_100k(tmp_path: Path) -> None:
    src = tmp_path / "ml-100k"
    src.mkdir()
    (src / "u.data").write_text(
        "196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t302\t1\t878887116\n"
    )
    flags = ["0"] * 19
    comedy = flags.copy()
    comedy[5] = comedy[14] = "1"  # Comedy, Romance
    rows = [
        f"242|Kolya (1996)|24-Jan-1997||http://x|{'|'.join(comedy)}",
        f"302|L.A. Confidential (1997)|01-Jan-1997||http://y|{'|'.join(flags)}",
    ]
    (src / "u.item").write_text("\n".join(rows) + "\n", encoding="latin-1")
    dataset = convert("movielens", src, tmp_path / "out")
    assert (dataset.num_users, dataset.num_items, len(dataset.interactions)) == (2, 2, 3)
    items = dataset.items.set_index("item_id")
    assert items.loc["242", "categories"] == "Comedy|Romance"
    assert items.loc["302", "categories"] == ""


def test_convert_movielens_bad_input(tmp_path: Path, capsys) -> None:
    src = tmp_path / "ml"
    src.mkdir()
    out = tmp_path / "out"
    assert "no MovieLens files" in convert_error("movielens", src, out, capsys)
    (src / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,10,4,5\n1,10,4,soon\n")
    (src / "movies.csv").write_text("movieId,title,genres\n10,Heat,Action\n")
    error = convert_error("movielens", src, out, capsys)
    assert "ratings.csv, row 2: unparseable timestamp 'soon'" in error
    (src / "ratings.csv").write_text("userId,movieId\n1,10\n")
    error = convert_error("movielens", src, out, capsys)
    assert "ratings.csv: missing column(s) ['timestamp']" in error
    (src / "ratings.csv").unlink()
    (src / "ratings.dat").write_text("1::10::4::5\n1::10::4\n")
    (src / "movies.dat").write_text("10::Heat::Action\n")
    assert "ratings.dat, row 2: empty timestamp" in convert_error("movielens", src, out, capsys)
    assert not out.exists()


# ---------------------------------------------------------------- validate


def test_validate_good_data(synth_dataset_dir: Path, capsys) -> None:
    assert main(["data", "validate", str(synth_dataset_dir)]) == 0
    out = capsys.readouterr().out
    assert "600" in out and "purchase" in out and "merchants" in out
    assert main(["data", "validate", str(synth_dataset_dir), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    dataset = load_dataset(synth_dataset_dir)
    assert summary["users"] == 600 and summary["items"] == 300
    assert summary["interactions"] == len(dataset.interactions)
    assert sum(summary["events"].values()) == summary["interactions"]
    assert (summary["merchants"], summary["regions"]) == (5, 4)
    assert summary["test_users"] == len(leave_one_out(dataset).test_users)
    assert summary["first_day"] == "2023-01-01"


def test_validate_reports_without_dropping(tmp_path: Path, capsys) -> None:
    write_dir(tmp_path, INTERACTIONS + "u1,b,200,click\n", ITEMS + "d,Unused,\n")
    assert main(["data", "validate", str(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["duplicate_rows"], summary["untouched_items"]) == (1, 1)
    assert summary["interactions"] == 5 and summary["merchants"] is None
    assert summary["history_length"] == {"min": 1, "median": 2.5, "mean": 2.5, "max": 4}


def test_validate_bad_data_exits_2_naming_file_and_row(tmp_path: Path, capsys) -> None:
    write_dir(tmp_path, INTERACTIONS.replace("150", "not-a-time"))
    assert main(["data", "validate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "interactions.csv, row 3" in err and "unparseable timestamp" in err


def test_sample_keeps_whole_histories_of_the_chosen_customers(
    synth_dataset_dir: Path, tmp_path: Path, capsys
) -> None:
    from shared.data.dataset import find_table, read_table

    original = read_table(find_table(synth_dataset_dir, "interactions"))
    out = tmp_path / "sample"
    argv = [
        "data",
        "sample",
        "--data",
        str(synth_dataset_dir),
        "--out",
        str(out),
        "--customers",
        "40",
        "--seed",
        "3",
    ]
    assert main(argv) == 0 and "sampled 40 customers" in capsys.readouterr().out
    sample = read_table(find_table(out, "interactions"))
    users = set(sample["user_id"])
    assert len(users) == 40
    every_event = original[original["user_id"].isin(users)]
    pd.testing.assert_frame_equal(sample.reset_index(drop=True), every_event.reset_index(drop=True))
    items = read_table(find_table(out, "items"))
    assert set(items["item_id"]) == set(sample["item_id"])
    assert load_dataset(out).num_users == 40  # a valid dataset of its own

    again = tmp_path / "again"
    main([*argv[:4], "--out", str(again), *argv[6:]])
    assert read_table(find_table(again, "interactions")).equals(sample)  # seeded


def test_sample_refuses_more_customers_than_there_are(
    synth_dataset_dir: Path, tmp_path: Path, capsys
) -> None:
    argv = [
        "data",
        "sample",
        "--data",
        str(synth_dataset_dir),
        "--out",
        str(tmp_path / "s"),
        "--customers",
        "10000000",
    ]
    assert main(argv) != 0
    assert "--customers must be in 1..600" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
