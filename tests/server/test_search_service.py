"""Personalised search, recommendations with reasons, the live catalog, the ANN index, and the
HTTP service (FastAPI TestClient; the web page in headless Chromium when it is installed).

Everything runs on a 24-product catalog with a deterministic bag-of-words "text tower", so the
expected rankings follow from the product texts alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import socket
import stat
import subprocess
import threading
import time
import zlib
from functools import partial
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from server.serving import service
from server.serving.index import VectorIndex, recall_at_k, top_k
from server.serving.lexical import Lexical, tokenize
from server.serving.middleware import LOCAL_HOSTS, allowed_hosts, host_allowed, log_access
from server.serving.search import load_engine
from server.serving.service import (
    Limits,
    admin_token,
    build_app,
    create_app,
    default_token_file,
)
from shared.data.dataset import DataError
from shared.recommender.artifacts import save_model
from shared.recommender.catalog import TextToId, full_table
from shared.recommender.model import FusionRecommender, ModelConfig
from shared.recommender.text import item_texts
from shared.runs.config import positive
from simulations.cli import build_parser

TEXT_DIM = 64
PRODUCTS = [  # item_id, title, categories
    ("tent1", "Summit Dome Tent for two", "Outdoor|Camping|Tents"),
    ("tent2", "Ridgeline Backpacking Tent", "Outdoor|Camping|Tents"),
    ("tent3", "Basecamp Family Tent", "Outdoor|Camping|Tents"),
    ("tent4", "Alpine Storm Tent", "Outdoor|Camping|Tents"),
    ("campgift", "Camping Gift Set with Lantern and Mug", "Outdoor|Camping|Gear"),
    ("lip1", "Velvet Matte Red Lipstick", "Beauty|Makeup|Lips"),
    ("lip2", "Rosewood Satin Lipstick", "Beauty|Makeup|Lips"),
    ("lip3", "Coral Gloss Lipstick", "Beauty|Makeup|Lips"),
    ("lipgift", "Lipstick Gift Set with Three Shades", "Beauty|Makeup|Lips"),
    ("bell", "Zephyr Cast Iron Kettlebell", "Sports|Fitness|Weights"),
    ("dumbbell", "Iron Dumbbell Pair", "Sports|Fitness|Weights"),
    ("bench", "Adjustable Weight Bench", "Sports|Fitness|Weights"),
    ("pan1", "Copper Saute Pan", "Home|Kitchen|Cookware"),
    ("pan2", "Nonstick Frying Pan", "Home|Kitchen|Cookware"),
    ("pot", "Stainless Stock Pot", "Home|Kitchen|Cookware"),
    ("cream", "Hydrating Face Cream", "Beauty|Skin Care|Face"),
    ("serum", "Vitamin C Serum", "Beauty|Skin Care|Face"),
    ("cleanser", "Gentle Foaming Cleanser", "Beauty|Skin Care|Face"),
    ("buds", "Wireless Earbuds", "Electronics|Audio"),
    ("speaker", "Bluetooth Speaker", "Electronics|Audio"),
    ("phones", "Noise Cancelling Headphones", "Electronics|Audio"),
    ("mug", "Enamel Camp Mug", "Outdoor|Camping|Gear"),
    ("lantern", "LED Camp Lantern", "Outdoor|Camping|Gear"),
    ("brush", "Lip Liner Brush", "Beauty|Makeup|Lips"),
]


def fake_encode(texts: list[str]) -> np.ndarray:
    """A deterministic bag-of-words text tower: the normalised sum of one random vector per word."""
    out = np.zeros((len(texts), TEXT_DIM), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in tokenize(text):
            out[row] += np.random.default_rng(zlib.crc32(word.encode())).standard_normal(TEXT_DIM)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


@pytest.fixture(scope="session")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model dir, dataset dir): a tiny untrained fusion model with small random ID vectors."""
    root = tmp_path_factory.mktemp("service")
    items = pd.DataFrame(PRODUCTS, columns=["item_id", "title", "categories"])
    items["brand"], items["description"] = "", ""
    (root / "data").mkdir()
    items.to_csv(root / "data" / "items.csv", index=False)
    torch.manual_seed(0)
    config = ModelConfig(num_items=len(items), text_dim=TEXT_DIM, dim=8, layers=1, max_len=10)
    model = FusionRecommender(config, torch.from_numpy(fake_encode(item_texts(items))))
    with torch.no_grad():  # learned-looking ID parameters, small next to the text score
        model.id_in.weight[1:] = 0.01 * torch.randn(len(items), 8)
        model.id_scores.weight.copy_(0.01 * torch.randn(len(items), 8))
        model.id_scores.bias.copy_(0.01 * torch.randn(len(items)))
    save_model(root / "model", model, items["item_id"].to_numpy(), "fake", "# test model\n")
    return root / "model", root / "data"


LIMITS = Limits(max_k=20, max_history=5, max_query_chars=60, max_body_bytes=2000)
TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(dirs: tuple[Path, Path]) -> TestClient:
    """A fresh service per test (tests add products)."""
    return served(create_app(*dirs, limits=LIMITS, encode=fake_encode, admin_token=TOKEN))


def served(app) -> TestClient:
    """A test client that sends ``Host: localhost`` (TestClient's own ``testserver`` is not
    a served host)."""
    return TestClient(app, base_url="http://localhost")


def ids(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [r["item_id"] for r in response.json()["results"]]


# --- search ---------------------------------------------------------------------------------


def test_distinctive_query_ranks_its_product_first(client: TestClient):
    response = client.post("/search", json={"query": "zephyr kettlebell", "k": 5})
    assert ids(response)[0] == "bell"
    first = response.json()["results"][0]
    assert "'zephyr'" in first["reason"] and first["matched_terms"] == ["zephyr", "kettlebell"]


def test_no_history_falls_back_to_relevance(client: TestClient):
    response = client.post("/search", json={"query": "gift set", "k": 3})
    assert set(ids(response)[:2]) == {"campgift", "lipgift"}  # the two texts that match
    assert all(r["because"] is None for r in response.json()["results"])


def test_history_personalises_the_ranking(client: TestClient):
    camper = ids(client.post("/search", json={"query": "gift set", "history": ["tent1", "tent2"]}))
    wearer = ids(client.post("/search", json={"query": "gift set", "history": ["lip1", "lip2"]}))
    assert camper[0] == "campgift" and wearer[0] == "lipgift"
    assert not {"tent1", "tent2"} & set(camper)  # history is excluded


def _edit_config(folder: Path, change) -> None:
    settings = json.loads((folder / "config.json").read_text())
    change(settings)
    (folder / "config.json").write_text(json.dumps(settings))


def _nan_weight(folder: Path) -> None:
    state = load_file(str(folder / "model.safetensors"))
    state["id_scores.bias"] = torch.full_like(state["id_scores.bias"], float("nan"))
    save_file(state, str(folder / "model.safetensors"))


def _repeat_first_item(folder: Path) -> None:
    item_ids = (folder / "item_ids.txt").read_text().splitlines()
    (folder / "item_ids.txt").write_text("\n".join([item_ids[0], item_ids[0], *item_ids[2:]]))


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda f: (f / "config.json").write_text("{"), "config.json: not valid JSON"),
        (_repeat_first_item, "item_ids.txt, row 2: product 'tent1' repeats line 1"),
        (lambda f: _edit_config(f, lambda c: c.pop("model")), "not a saved model's settings"),
        (lambda f: _edit_config(f, lambda c: c["model"].update(evil=1)), "unexpected keyword"),
        (lambda f: _edit_config(f, lambda c: c["model"].update(num_items=10**9)), "!="),
        (lambda f: (f / "model.safetensors").write_bytes(b"\x08" + bytes(7) + b"{}"), "header"),
        (_nan_weight, "NaN or infinity in ['id_scores.bias']"),
        (lambda f: (f / "search.json").write_text('{"a": 1}'), "search.json: not an object"),
        (lambda f: (f / "search.json").write_text('{"dense": NaN}'), "finite numbers"),
        (lambda f: (f / "search.json").write_text('{"pool": 0}'), "pool an integer from 1"),
    ],
)
def test_a_damaged_or_edited_model_folder_is_a_data_error_naming_it(
    dirs: tuple[Path, Path], tmp_path: Path, damage, words: str
):
    model = tmp_path / "model"
    shutil.copytree(dirs[0], model)
    damage(model)
    with pytest.raises(DataError, match=re.escape(words)) as error:
        load_engine(model, dirs[1], encode=fake_encode)
    assert str(model) in str(error.value)


def test_query_embeddings_are_cached(dirs: tuple[Path, Path]):
    encoded: list[str] = []
    engine = load_engine(*dirs, encode=lambda texts: encoded.extend(texts) or fake_encode(texts))
    encoded.clear()  # the catalog's texts
    first = engine.search("gift set", np.array([0]), 3)
    assert engine.search("gift set", np.array([0]), 3) == first and encoded == ["gift set"]
    cached = engine.query_vector("gift set")
    np.testing.assert_array_equal(cached, fake_encode(["gift set"])[0])
    assert not cached.flags.writeable  # shared by every request for that query


def test_a_pending_query_vector_gives_the_same_pool(dirs: tuple[Path, Path]):
    engine = load_engine(*dirs, encode=fake_encode)
    history = engine.rows(["tent1", "lip1"])
    state = engine.states([history])[0]
    vector = fake_encode(["camping gift"])[0]
    pending = engine.query_encoder.submit(engine.query_vector, "camping gift")
    ready = engine.candidates("camping gift", vector, history, state)
    overlapped = engine.candidates("camping gift", pending, history, state)
    np.testing.assert_array_equal(overlapped.rows, ready.rows)
    np.testing.assert_allclose(overlapped.signals, ready.signals, rtol=1e-6)


def test_new_products_get_the_models_new_item_boost(dirs: tuple[Path, Path]):
    model = load_engine(*dirs, encode=fake_encode).catalog.model
    text = torch.from_numpy(fake_encode(["Trail Camping Stove"]))
    plain = TextToId(model)(text)
    model.config.new_item_boost = 2.0
    boosted = TextToId(model)(text)
    torch.testing.assert_close(boosted[:, -1], plain[:, -1] + 2.0)
    torch.testing.assert_close(boosted[:, :-1], plain[:, :-1])


def test_search_reason_names_the_supporting_history_product(client: TestClient):
    results = client.post("/search", json={"query": "gift set", "history": ["tent1"]}).json()
    top = results["results"][0]
    assert top["because"] == "tent1" and "you bought Summit Dome Tent for two" in top["reason"]


def test_bm25_scores_and_pre_filtered_top_equal_the_full_computation():
    rng = np.random.default_rng(4)
    words = [f"w{i}" for i in range(40)]
    lexical = Lexical([" ".join(rng.choice(words, rng.integers(3, 12))) for _ in range(3000)])
    scores = lexical.scores("w1 w7 w7 unknown")
    ids = [lexical.vocab[w] for w in ("w1", "w7", "w7")]
    np.testing.assert_array_equal(scores, lexical.bm25.get_scores_from_ids(ids))
    exclude = top_k(scores, 3)
    found = lexical.top(scores, 5, exclude)  # 3,000 documents > (5 + 3) blocks: pre-filtered
    rest = np.setdiff1d(np.flatnonzero(scores > 0), exclude)
    np.testing.assert_array_equal(scores[found], np.sort(scores[rest])[::-1][:5])
    assert not set(found) & set(exclude)


# --- recommend --------------------------------------------------------------------------------


def test_recommendations_follow_the_history_and_say_why(client: TestClient):
    results = client.post("/recommend", json={"history": ["tent1", "tent2"], "k": 3}).json()
    top = results["results"]
    assert {r["item_id"] for r in top} <= {"tent3", "tent4", "campgift", "mug", "lantern"}
    titles = {"tent1": "Summit Dome Tent for two", "tent2": "Ridgeline Backpacking Tent"}
    for result in top:
        assert result["because"] in titles
        assert result["reason"] == f"because you bought {titles[result['because']]}"


def test_a_new_event_changes_the_next_answer(client: TestClient):
    before = ids(client.post("/recommend", json={"history": ["tent1"], "k": 3}))
    after = ids(client.post("/recommend", json={"history": ["tent1", "lip1", "lip2"], "k": 3}))
    assert before != after and any(i.startswith("lip") for i in after)


def test_reasons_say_what_the_customer_did(client: TestClient):
    """A history item's own event, else the dataset's usual one (no interactions: purchase)."""
    history = [{"item_id": "tent1", "event": "view"}, {"item_id": "lip1", "event": "cart"}, "tent2"]
    results = client.post("/recommend", json={"history": history, "k": 10}).json()["results"]
    verbs = {"tent1": "viewed", "lip1": "added to cart", "tent2": "bought"}
    assert {r["because"] for r in results} == set(verbs)
    for result in results:
        assert result["reason"].startswith(f"because you {verbs[result['because']]} ")
    found = client.post("/search", json={"query": "tent", "history": history[:1], "k": 3})
    assert "you viewed Summit Dome Tent for two" in found.json()["results"][0]["reason"]
    bad = client.post("/recommend", json={"history": [{"item_id": "tent1", "event": "liked"}]})
    assert bad.status_code == 422


def test_a_rated_catalog_says_rated(dirs: tuple[Path, Path], tmp_path: Path):
    """A converted MovieLens dataset's events are ratings: its reasons say so."""
    data = tmp_path / "data"
    shutil.copytree(dirs[1], data)
    (data / "interactions.csv").write_text(
        "user_id,item_id,timestamp,event\nu,tent1,1,rating\nu,tent2,2,rating\n"
    )
    client = served(create_app(dirs[0], data, limits=LIMITS, encode=fake_encode, admin_token=TOKEN))
    results = client.post("/recommend", json={"history": ["tent1"], "k": 2}).json()["results"]
    assert all(r["reason"] == "because you rated Summit Dome Tent for two" for r in results)


def test_numeric_item_ids_are_accepted(client: TestClient):
    assert (
        client.post(
            "/items", headers=ADMIN, json={"item_id": 1193, "title": "Heat (1995)"}
        ).status_code
        == 201
    )
    assert client.get("/items/1193").json()["title"] == "Heat (1995)"
    assert ids(client.post("/recommend", json={"history": [1193, "tent1"], "k": 3}))
    assert ids(client.post("/search", json={"query": "tent", "history": [1193], "k": 3}))


# --- the live catalog ---------------------------------------------------------------------

NEW_TENT = {
    "item_id": "nebula",
    "title": "Nebula Ultralight Backpacking Tent",
    "categories": "Outdoor|Camping|Tents",
    "brand": "Nebula",
    "description": "",
}


def test_added_product_is_searchable_and_recommendable_at_once(client: TestClient):
    response = client.post("/items", headers=ADMIN, json=NEW_TENT)
    assert response.status_code == 201 and response.json()["created"] is True
    assert client.get("/items/nebula").json()["title"] == NEW_TENT["title"]
    assert ids(client.post("/search", json={"query": "nebula ultralight", "k": 3}))[0] == "nebula"
    recommended = ids(client.post("/recommend", json={"history": ["tent1", "tent2"], "k": 5}))
    assert "nebula" in recommended
    # and it can be part of a history itself (the model's history side grew too)
    assert ids(client.post("/recommend", json={"history": ["nebula"], "k": 3}))
    assert client.get("/health").json()["products"] == len(PRODUCTS) + 1


def test_replacing_a_product_updates_text_and_keeps_one_row(client: TestClient):
    changed = {
        "item_id": "pot",
        "title": "Stainless Stock Pot with Glass Lid",
        "categories": "Home|Kitchen|Cookware",
    }
    response = client.post("/items", headers=ADMIN, json=changed)
    assert response.status_code == 200 and response.json()["created"] is False
    assert ids(client.post("/search", json={"query": "glass lid", "k": 1})) == ["pot"]
    assert client.get("/health").json()["products"] == len(PRODUCTS)


def test_updating_a_product_keeps_the_fields_not_sent(client: TestClient):
    response = client.post("/items", headers=ADMIN, json={"item_id": "pot", "brand": "Acme"})
    assert response.status_code == 200
    stored = client.get("/items/pot").json()
    assert stored == response.json()["product"]
    assert stored["title"] == "Stainless Stock Pot" and stored["brand"] == "Acme"
    assert stored["categories"] == "Home|Kitchen|Cookware"
    cleared = client.post("/items", headers=ADMIN, json={"item_id": "pot", "brand": ""}).json()[
        "product"
    ]
    assert cleared["brand"] == "" and cleared["title"] == "Stainless Stock Pot"
    new = client.post("/items", headers=ADMIN, json={"item_id": "fresh", "brand": "Acme"})
    assert new.status_code == 422
    assert new.json()["detail"][0]["msg"] == "a new product needs a title"


def test_overlong_text_fields_are_422(client: TestClient):
    response = client.post("/items", headers=ADMIN, json={"item_id": "long", "title": "x" * 501})
    assert response.status_code == 422
    error = response.json()["detail"][0]
    assert error["loc"] == ["body", "title"] and "at most 500 characters" in error["msg"]
    assert client.get("/items/long").status_code == 404


def test_every_request_is_in_the_access_log(client: TestClient, caplog):
    caplog.set_level(logging.INFO, logger="fedrec.access")
    client.get("/health")
    client.post("/recommend", content=b"x" * 3000, headers={"content-type": "application/json"})
    lines = [r.getMessage() for r in caplog.records if r.name == "fedrec.access"]
    assert re.fullmatch(r"GET /health 200 \d+\.\d ms", lines[0])
    assert lines[1].startswith("POST /recommend 413 ")


def test_access_log_switch():
    log_access(True)
    assert logging.getLogger("fedrec.access").isEnabledFor(logging.INFO)
    log_access(False)
    assert not logging.getLogger("fedrec.access").isEnabledFor(logging.INFO)


def test_incremental_rows_equal_the_model_item_table(dirs: tuple[Path, Path]):
    engine = load_engine(*dirs, encode=fake_encode)
    before = engine.catalog
    engine.upsert(pd.DataFrame([NEW_TENT, {"item_id": "lip1", "title": "Velvet Matte Lipstick"}]))
    catalog = engine.catalog
    np.testing.assert_allclose(
        catalog.preference_index.vectors, full_table(catalog.model), rtol=1e-5, atol=1e-5
    )
    assert catalog.predicted.tolist() == [False] * len(PRODUCTS) + [True]
    # a product added later gets ID parameters predicted from its text, not zeros
    assert catalog.model.id_scores.weight[-1].abs().sum() > 0
    # copy-on-write: the catalog that readers held is as it was
    assert len(before) == before.model.config.num_items == len(PRODUCTS)
    assert before.model.text.shape[0] == before.model.id_scores.weight.shape[0] == len(PRODUCTS)
    assert before.product(before.row_of["lip1"])["title"] == "Velvet Matte Red Lipstick"
    np.testing.assert_allclose(
        before.preference_index.vectors, full_table(before.model), rtol=1e-5, atol=1e-5
    )


# --- who may write, which hosts, reads during writes ----------------------------------------


def test_writes_need_the_admin_token(client: TestClient):
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"}):
        response = client.post("/items", headers=headers, json=NEW_TENT)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer <token>" in client.post("/items", json=NEW_TENT).json()["detail"]
    wrong = client.post("/items", headers={"Authorization": "Bearer nope"}, json=NEW_TENT)
    assert wrong.json() == {"detail": "wrong admin token"}
    assert client.get("/items/nebula").status_code == 404  # nothing was written
    assert client.post("/items", headers=ADMIN, json=NEW_TENT).status_code == 201
    assert ids(client.post("/search", json={"query": "nebula ultralight", "k": 1})) == ["nebula"]
    # reads stay open
    assert ids(client.post("/recommend", json={"history": ["nebula"], "k": 2}))
    for path in ("/", "/docs", "/health", "/items/nebula", "/openapi.json"):
        assert client.get(path).status_code == 200, path


def test_every_write_endpoint_needs_the_token(client: TestClient):
    reads = {"/recommend", "/search"}  # POST, but they change nothing
    paths = client.get("/openapi.json").json()["paths"]
    writes = [
        (method, path, operation)
        for path, operations in paths.items()
        if path not in reads
        for method, operation in operations.items()
        if method != "get"
    ]
    assert [(method, path) for method, path, _ in writes] == [("post", "/items")]
    for method, path, operation in writes:
        assert client.request(method, path, json={}).status_code == 401, (method, path)
        assert operation["security"] == [{"HTTPBearer": []}]  # Swagger UI's "Authorize"


def test_admin_token_file_is_owner_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    made = tmp_path / "new" / "admin-token"
    token = admin_token(made)
    assert len(token) >= 43 and made.read_text().strip() == token  # token_urlsafe(32)
    assert stat.S_IMODE(made.stat().st_mode) == 0o600
    assert admin_token(made) == token  # read again at the next start
    loose = tmp_path / "loose"
    loose.write_text("given-token\n")
    loose.chmod(0o644)
    assert admin_token(loose) == "given-token"
    assert stat.S_IMODE(loose.stat().st_mode) == 0o600  # narrowed
    (tmp_path / "empty").touch()
    with pytest.raises(DataError, match="holds no admin token"):
        admin_token(tmp_path / "empty")
    monkeypatch.delenv("FEDREC_ADMIN_TOKEN_FILE", raising=False)
    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path / "cache"))
    assert default_token_file() == tmp_path / "cache" / "admin-token"
    monkeypatch.setenv("FEDREC_ADMIN_TOKEN_FILE", str(loose))
    assert default_token_file() == loose


@pytest.mark.parametrize(
    "option", ["--threads", "--max-k", "--max-history", "--max-body-bytes", "--nprobe"]
)
def test_serve_refuses_a_count_below_one(option: str, capsys):
    """--threads 0 was a torch traceback at start; --max-k -5 a service answering every
    request 422."""
    argv = ["serve", "--model", "m", "--data", "d", option, "0"]
    with pytest.raises(SystemExit):
        build_parser(argv).parse_args(argv)
    assert f"argument {option}: must be positive" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-2", "nan", "inf"])
def test_a_positive_setting_refuses_what_is_no_finite_number_above_0(value: str) -> None:
    """``fedrec data synth --events-per-user nan`` passed the old ``<= 0`` test."""
    with pytest.raises(argparse.ArgumentTypeError, match="must be positive"):
        positive(float)(value)
    assert positive(float)("2.5") == 2.5 and positive(int)("3") == 3


def test_serve_prints_where_the_token_is_never_the_token(
    dirs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    import uvicorn

    served_apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served_apps.append(app))
    monkeypatch.setattr(service, "create_app", partial(create_app, encode=fake_encode))
    monkeypatch.setattr(service, "set_threads", lambda threads: None)  # process-wide
    monkeypatch.setenv("FEDREC_ADMIN_TOKEN_FILE", str(tmp_path / "token"))
    argv = ["serve", "--model", str(dirs[0]), "--data", str(dirs[1]), "--no-access-log"]
    assert service.run(build_parser(argv).parse_args(argv)) == 0
    token = (tmp_path / "token").read_text().strip()
    printed = capsys.readouterr()
    assert str(tmp_path / "token") in printed.out and token not in printed.out + printed.err
    client = served(served_apps[0])
    auth = {"Authorization": f"Bearer {token}"}
    assert client.post("/items", headers=auth, json=NEW_TENT).status_code == 201


def test_unknown_hosts_get_400(client: TestClient):
    for host in ("localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LocalHost"):
        assert client.get("/health", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", "evil.example:8000", "localhost.evil.example", ""):
        response = client.post("/search", headers={"Host": host}, json={"query": "tent", "k": 1})
        assert response.status_code == 400, host
        assert "is not served here" in response.json()["detail"]


def test_allowed_hosts():
    assert allowed_hosts("0.0.0.0") == allowed_hosts("::") == list(LOCAL_HOSTS)
    assert allowed_hosts("192.168.1.5")[-1] == "192.168.1.5"
    assert allowed_hosts("fe80::1")[-1] == "[fe80::1]"
    hosts = allowed_hosts("0.0.0.0", ["Shop.Example.com", "*.cdn.example"])
    assert host_allowed("shop.example.com", hosts) and host_allowed("a.cdn.example", hosts)
    assert not host_allowed("cdn.example", hosts) and not host_allowed("evilcdn.example", hosts)
    assert host_allowed("anything", ["*"]) and not host_allowed("", ["*"])


def test_a_search_does_not_wait_for_a_rebuild(client: TestClient, monkeypatch):
    """A bulk upsert rebuilds BM25 (made slow here) beside the catalog in use: a search
    meanwhile answers at once, from the old catalog; afterwards the new products are found."""
    engine, build, building = client.app.state.engine, Lexical._index, threading.Event()

    def slow_build(self: Lexical) -> None:
        building.set()
        time.sleep(3.0)
        build(self)

    monkeypatch.setattr(Lexical, "_index", slow_build)
    products = pd.DataFrame(
        {
            "item_id": [f"nebula{i}" for i in range(300)],
            "title": [f"Nebula Ultralight Tent model{i}" for i in range(300)],
        }
    )
    writer = threading.Thread(target=engine.upsert, args=(products,))
    writer.start()
    assert building.wait(10)
    started = time.perf_counter()
    during = client.post("/search", json={"query": "nebula ultralight tent", "k": 3})
    took = time.perf_counter() - started
    assert writer.is_alive() and took < 1.0, took  # the rebuild takes 3 s
    assert set(ids(during)) <= {"tent1", "tent2", "tent3", "tent4"}  # the old catalog
    writer.join()
    after = ids(client.post("/search", json={"query": "nebula ultralight model7", "k": 1}))
    assert after == ["nebula7"] and len(engine) == len(PRODUCTS) + 300


def test_a_changed_lexical_index_equals_a_fresh_one_and_leaves_the_old_as_it_was():
    texts = [" ".join(p[1:]) for p in PRODUCTS]
    old = Lexical(texts)
    before = old.scores("camping gift tent")
    changed = old.with_docs(np.array([3, len(texts)]), ["Alpine Gift Box", "Gift Tent"])
    fresh = Lexical([*texts[:3], "Alpine Gift Box", *texts[4:], "Gift Tent"])
    np.testing.assert_allclose(
        changed.scores("camping gift tent"), fresh.scores("camping gift tent"), rtol=1e-6
    )
    np.testing.assert_array_equal(old.scores("camping gift tent"), before)
    assert len(old.docs) == len(texts) and "box" not in old.vocab


# --- errors and limits ----------------------------------------------------------------------


def test_health_docs_and_page(client: TestClient):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["retrieval"] == "exact"
    assert health["limits"]["max_k"] == 20
    assert client.get("/docs").status_code == 200
    assert {"/recommend", "/search", "/items", "/items/{item_id}", "/health"} <= set(
        client.get("/openapi.json").json()["paths"]
    )
    page = client.get("/")
    assert page.status_code == 200 and "<script>" in page.text and "/search" in page.text
    assert "nail polish" not in page.text  # a neutral placeholder, whatever the catalog
    assert "Popular products" in page.text  # what it shows before any search


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_api_docs_load_their_assets_from_the_service(client: TestClient, path: str):
    page = client.get(path)
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert page.status_code == 200 and any(a.endswith(".js") for a in assets)
    for asset in assets:  # no CDN: every script, style sheet and icon is served here
        assert asset.startswith("/"), asset
        assert client.get(asset).status_code == 200, asset


@pytest.mark.parametrize(
    ("path", "body", "field", "message"),
    [
        (
            "/recommend",
            {"history": ["tent1", "nope", "zilch"]},
            "history",
            "unknown item ids: nope, zilch",
        ),
        ("/search", {"query": "tent", "history": ["nope"]}, "history", "unknown item ids: nope"),
        ("/recommend", {"history": [], "k": 0}, "k", "k must be between 1 and 20"),
        ("/search", {"query": "tent", "k": 21}, "k", "k must be between 1 and 20"),
        ("/recommend", {"history": ["tent1"] * 6}, "history", "the limit is 5"),
        ("/search", {"query": "tent " * 13}, "query", "longer than 60 characters"),
        # a misspelt field is named, not dropped (which answered the popular products)
        ("/recommend", {"histroy": ["tent1"]}, "histroy", "Extra inputs are not permitted"),
        ("/search", {"query": "tent", "K": 3}, "K", "Extra inputs are not permitted"),
    ],
)
def test_bad_requests_get_422_naming_the_problem(client: TestClient, path, body, field, message):
    response = client.post(path, json=body)
    assert response.status_code == 422
    error = response.json()["detail"][0]
    assert error["loc"] == ["body", field] and message in error["msg"]


def test_a_misspelt_product_field_is_422_and_nothing_changes(client: TestClient):
    sent = {"item_id": "tent1", "descripton": "new words"}
    response = client.post("/items", headers=ADMIN, json=sent)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "descripton"]
    assert "new words" not in client.get("/items/tent1").text


def test_empty_query_and_missing_fields_are_422(client: TestClient):
    assert client.post("/search", json={"query": "   "}).status_code == 422
    assert client.post("/search", json={"history": []}).status_code == 422
    assert (
        client.post("/items", headers=ADMIN, json={"item_id": "x"}).status_code == 422
    )  # no title
    assert client.post("/recommend", json={"history": "tent1"}).status_code == 422


@pytest.mark.parametrize(
    ("path", "raw", "field"),
    [
        ("/recommend", b'{"history": ["tent1"], "k": 1e400}', "k"),  # json reads infinity
        ("/search", b'{"query": "tent", "k": NaN}', "k"),
        ("/search", b'{"query": "\\ud800"}', "query"),  # a lone surrogate
        ("/recommend", b'{"history": ["\\udfff"]}', "history"),
        ("/items", b'{"item_id": "\\ud800", "title": "x"}', "item_id"),
        ("/search", b'{"history": [], "k": NaN}', "query"),  # the whole body echoed
    ],
)
def test_a_value_json_cannot_echo_is_422_not_500(
    dirs: tuple[Path, Path], path: str, raw: bytes, field: str
):
    app = create_app(*dirs, limits=LIMITS, encode=fake_encode, admin_token=TOKEN)
    client = TestClient(app, base_url="http://localhost", raise_server_exceptions=False)
    headers = {"content-type": "application/json", **ADMIN}
    response = client.post(path, content=raw, headers=headers)
    assert response.status_code == 422, response.text
    assert any(e["loc"][:2] == ["body", field] for e in response.json()["detail"])


def test_unknown_product_is_404(client: TestClient):
    response = client.get("/items/nope")
    assert response.status_code == 404 and "nope" in response.json()["detail"]


def test_body_over_the_limit_is_413(client: TestClient):
    big = {"query": "tent", "history": ["x" * 500] * 5}
    assert client.post("/search", json=big).status_code == 413

    def chunks():  # no Content-Length: the middleware counts what streams in
        yield b'{"query": "tent", "history": ['
        for _ in range(30):
            yield b'"' + b"y" * 100 + b'",'
        yield b'"tent1"]}'

    response = client.post(
        "/search", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413


@pytest.mark.parametrize(
    "lengths",
    [["abc"], ["-1"], ["1e9"], [" +5"], ["1_0"], ["5", "6"], ["5, 5"], ["٣".encode()]],
)
def test_a_content_length_that_is_not_one_decimal_number_is_400(
    client: TestClient, lengths: list[str | bytes]
):
    headers = [("content-type", "application/json"), *(("content-length", v) for v in lengths)]
    response = client.post("/search", content=b'{"query": "tent"}', headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["detail"] == "Content-Length must be one decimal number"


def test_a_declared_length_of_thousands_of_digits_is_413(client: TestClient):
    for digits in ("9" * 5000, "0" * 5000 + "3000"):
        response = client.post("/search", content=b"{}", headers={"content-length": digits})
        assert response.status_code == 413, response.text
    repeated = [("content-type", "application/json"), *[("content-length", "17")] * 2]
    response = client.post("/search", content=b'{"query": "tent"}', headers=repeated)
    assert response.status_code == 200, response.text


# --- the ANN index ------------------------------------------------------------------------


def variants(products: int, per_product: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors for ``per_product`` variants of random products (cosine about 0.8 to the
    product): the near-duplicate structure of real catalogs. Isotropic vectors have none."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((products, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise = 0.7 * rng.standard_normal((products * per_product, dim)) / np.sqrt(dim)
    vectors = np.repeat(centres, per_product, axis=0) + noise
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def test_ann_recall_against_exact_and_history_exclusion():
    vectors = variants(2000, 10, 64, seed=0)
    index = VectorIndex(vectors, ann_threshold=10_000, nprobe=64)  # 64 of 565 lists
    assert index.kind == "ann"
    queries = vectors[::200] + variants(100, 1, 64, seed=1) * 0.3
    recall = recall_at_k(index, queries, k=10, nprobes=(8, 64))
    assert recall[64] >= 0.95 and recall[8] < recall[64]
    exact = top_k(vectors @ queries[0], 10)
    found, scores = index.search(queries[0], 10, exclude=exact[:5])
    assert not set(exact[:5]) & set(found) and len(found) == 10
    np.testing.assert_allclose(scores, vectors[found] @ queries[0], rtol=1e-5)  # exact scores
    before = index.search(queries[0], 10)
    changed = index.with_rows(np.array([3, len(vectors)]), np.stack([queries[0], queries[0]]))
    assert set(changed.search(queries[0], 2)[0]) == {3, len(vectors)}  # updated and appended
    for found, expected in zip(index.search(queries[0], 10), before, strict=True):
        np.testing.assert_array_equal(found, expected)  # the old index is unchanged


def test_ann_probing_every_list_equals_exact():
    vectors = variants(500, 10, 33, seed=3)  # an odd dimension: the codes pad it
    index = VectorIndex(vectors, ann_threshold=1000)
    exact = VectorIndex(vectors)
    index.nprobe = faiss.extract_index_ivf(index.ann).nlist
    for query in vectors[::500] + 0.1:
        history = top_k(vectors @ query, 3)
        for found, expected in zip(
            index.search(query, 10, history), exact.search(query, 10, history), strict=True
        ):
            np.testing.assert_array_equal(found, expected)


def test_exact_index_excludes_and_orders():
    vectors = variants(100, 5, 8, seed=2)
    index = VectorIndex(vectors)
    assert index.kind == "exact"
    found, scores = index.search(vectors[7], 5, exclude=np.array([7]))
    assert 7 not in found and np.all(np.diff(scores) <= 0)


# --- the web page in a real browser -------------------------------------------------------

CHROMIUM = shutil.which("chromium") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]  # offline: no other host
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (apt-get install chromium)"
)


def rendered(app, path: str, tmp_path: Path) -> str:
    """The DOM of ``path`` after headless Chromium ran its scripts, ``app`` served by uvicorn."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 10
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        return subprocess.run(
            [
                CHROMIUM,
                *FLAGS,
                f"--user-data-dir={tmp_path / 'profile'}",
                "--virtual-time-budget=10000",
                "--dump-dom",
                f"http://127.0.0.1:{port}{path}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@needs_chromium
def test_web_page_shows_ranked_results_in_chromium(dirs: tuple[Path, Path], tmp_path: Path):
    app = build_app(load_engine(*dirs, encode=fake_encode), LIMITS, admin_token=TOKEN)
    dom = rendered(app, "/?q=gift+set&history=tent1", tmp_path)
    assert 'class="result"' in dom, dom[-2000:]
    first = dom.split('class="result"')[1]
    assert "Camping Gift Set with Lantern and Mug" in first  # personalised: camper first
    assert "you bought Summit Dome Tent for two" in first  # the reason is shown
    assert "Summit Dome Tent for two (tent1)" in dom  # the history chip, with its title


@needs_chromium
def test_swagger_ui_renders_offline_in_chromium(dirs: tuple[Path, Path], tmp_path: Path):
    dom = rendered(
        build_app(load_engine(*dirs, encode=fake_encode), LIMITS, admin_token=TOKEN),
        "/docs",
        tmp_path,
    )
    paths = re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', dom)
    assert {"/recommend", "/search", "/items"} <= set(paths), dom[-2000:]
