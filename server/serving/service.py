"""``fedrec serve``: the global recommender and personalised search over HTTP (FastAPI).

The customer's history travels with each request (the model has no per-customer state), so a
new event changes the very next answer. Endpoints: ``POST /recommend``, ``POST /search``,
``POST /items`` (add a product, or update the fields given of one), ``GET /items/{item_id}``,
``GET /health``, the OpenAPI docs at ``/docs`` (Swagger UI) and ``/redoc``, served from local
files (no CDN: they work offline), and a small web page at ``/``. Every request is logged on
the ``fedrec.access`` logger (method, path, status, duration). Writes need the admin token
(``Authorization: Bearer``, kept in an owner-only file); reads are open. Requests for a ``Host``
that is not served get 400 (DNS rebinding). A write never stalls reads: the engine builds the
next catalog beside the one in use. See docs/serving.md.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline

from server.serving.index import ANN_THRESHOLD, NPROBE, TEXT_NPROBE
from server.serving.middleware import (
    LOCAL_HOSTS,
    AccessLog,
    BodySizeLimit,
    TrustedHosts,
    allowed_hosts,
    host_list,
    log_access,
)
from server.serving.schemas import (
    Health,
    HistoryEvent,
    Product,
    ProductSaved,
    ProductUpdate,
    RecommendRequest,
    Result,
    Results,
    SearchRequest,
)
from server.serving.search import Catalog, Encode, Hit, SearchEngine, UnknownItems, load_engine
from shared import __version__
from shared.data.dataset import DataError
from shared.recommender.text import cache_dir
from shared.runs.config import positive

PAGE = Path(__file__).with_name("web.html")
ADMIN = HTTPBearer(
    auto_error=False,
    description="the admin token: `fedrec serve` prints the file that holds it",
)
TOKEN_FILE_ENV = "FEDREC_ADMIN_TOKEN_FILE"


@dataclass
class Limits:
    """Request limits; every one is a ``fedrec serve`` option."""

    max_k: int = 100
    max_history: int = 200
    max_query_chars: int = 256
    max_body_bytes: int = 64 * 1024


# --- the service functions (the HTTP handlers call these; so does the benchmark) -----------


def invalid(field: str, message: str, value: object) -> HTTPException:
    """A 422 shaped like FastAPI's own validation errors."""
    return HTTPException(
        422,
        detail=[{"loc": ["body", field], "msg": message, "type": "value_error", "input": value}],
    )


def history_rows(
    engine: SearchEngine,
    catalog: Catalog,
    limits: Limits,
    history: list[str | HistoryEvent],
    k: int,
) -> tuple[np.ndarray, list[str]]:
    """Rows in ``catalog`` and event types of a request's history (422 for a bad k or
    history)."""
    if not 1 <= k <= limits.max_k:
        raise invalid("k", f"k must be between 1 and {limits.max_k}", k)
    if len(history) > limits.max_history:
        raise invalid(
            "history",
            f"history holds {len(history)} items; the limit is "
            f"{limits.max_history} (send the most recent ones)",
            len(history),
        )
    plain = [item if isinstance(item, str) else item.item_id for item in history]
    events = [
        getattr(item, "event", None) or engine.default_event for item in history
    ]  # a plain id has no event of its own
    try:
        return catalog.rows(plain), events
    except UnknownItems as error:
        raise invalid(
            "history", f"unknown item ids: {', '.join(error.item_ids[:20])}", error.item_ids
        ) from None


def json_safe(value: object) -> object:
    """``value`` if JSON can carry it, else its ``repr``: what a 422 echoes of a request may
    be NaN, an infinity (``1e400``) or a lone surrogate (``"\\ud800"``), which no JSON
    response holds."""
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode()
    except (ValueError, TypeError):  # UnicodeEncodeError is a ValueError
        return repr(value)
    return value


async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 for a request that does not validate, every ``input`` it echoes
    :func:`json_safe` (FastAPI's own answered such a request 500)."""
    detail = [{**e, "input": json_safe(e.get("input"))} for e in jsonable_encoder(error.errors())]
    return JSONResponse({"detail": detail}, 422)


def results(catalog: Catalog, hits: list[Hit], started: float) -> Results:
    """The response for ``hits``: each product's fields, score, reason and the history
    product behind it, and the time since ``started``."""
    out = []
    for hit in hits:
        product = catalog.product(hit.row)
        because = None if hit.because is None else catalog.fields["item_id"][hit.because]
        out.append(
            Result(
                item_id=product["item_id"],
                title=product["title"],
                categories=product["categories"],
                brand=product["brand"],
                score=round(hit.score, 4),
                reason=hit.reason,
                because=because,
                matched_terms=hit.matched,
            )
        )
    return Results(
        results=out,
        retrieval=catalog.preference_index.kind,
        took_ms=round(1000 * (time.perf_counter() - started), 2),
    )


def recommend(engine: SearchEngine, limits: Limits, request: RecommendRequest) -> Results:
    """One request reads one version of the catalog, even while a write replaces it."""
    started, catalog = time.perf_counter(), engine.catalog
    rows, events = history_rows(engine, catalog, limits, request.history, request.k)
    return results(catalog, engine.recommend(rows, request.k, events, catalog), started)


def search(engine: SearchEngine, limits: Limits, request: SearchRequest) -> Results:
    """As :func:`recommend`: one version of the catalog per request."""
    started, catalog = time.perf_counter(), engine.catalog
    if len(request.query) > limits.max_query_chars:
        raise invalid(
            "query",
            f"the query is longer than {limits.max_query_chars} characters",
            len(request.query),
        )
    rows, events = history_rows(engine, catalog, limits, request.history, request.k)
    hits = engine.search(request.query, rows, request.k, events, catalog)
    return results(catalog, hits, started)


def save_product(engine: SearchEngine, update: ProductUpdate) -> ProductSaved:
    """Add a product, or merge the fields given into an existing one (the others are kept).
    Writes are one at a time; reads go on meanwhile (:meth:`SearchEngine.upsert`)."""
    given = update.model_dump(exclude_none=True)
    with engine.write_lock:
        catalog = engine.catalog
        row = catalog.row_of.get(update.item_id)
        if row is None and "title" not in given:
            raise invalid("title", "a new product needs a title", None)
        product = Product(**({} if row is None else catalog.product(row)) | given)
        created = engine.upsert(pd.DataFrame([product.model_dump()]))[0]
    return ProductSaved(created=created, product=product)


# --- the admin token ------------------------------------------------------------------------


def default_token_file() -> Path:
    """``$FEDREC_ADMIN_TOKEN_FILE``, else ``$FEDREC_CACHE/admin-token`` (per user, outside any
    run folder that may be copied or shared)."""
    return Path(os.environ.get(TOKEN_FILE_ENV) or cache_dir() / "admin-token")


def admin_token(path: Path) -> str:
    """The admin token stored in ``path``; a new one (``secrets.token_urlsafe(32)``) is written
    there first when the file does not exist. The file is readable by its owner only (0600):
    created so, and narrowed if it exists with a looser mode."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        fd = os.open(path, os.O_RDONLY)
        with os.fdopen(fd) as file:
            if os.fstat(fd).st_mode & 0o077:
                os.fchmod(fd, 0o600)
            token = file.read().strip()
        if not token:
            raise DataError(path, "holds no admin token (delete it to get a new one)") from None
        return token
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as file:
        file.write(token + "\n")
    return token


# --- the app -------------------------------------------------------------------------------


def build_app(
    engine: SearchEngine,
    limits: Limits | None = None,
    *,
    admin_token: str,
    hosts: Sequence[str] = LOCAL_HOSTS,
) -> FastAPI:
    """The FastAPI app around a ready engine. Writes need ``Authorization: Bearer
    <admin_token>``; requests for a ``Host`` outside ``hosts`` get 400."""
    limits = limits or Limits()
    app = FastAPIOffline(
        title="fedrec",
        version=__version__,
        description="Recommendations and personalised product search from the "
        "federated global model. The history travels with each "
        "request.",
    )
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(TrustedHosts, hosts=hosts)
    app.add_middleware(AccessLog)  # the outermost: refused hosts and bodies are logged too
    app.state.engine, app.state.limits = engine, limits
    expected = admin_token.encode()

    def require_admin(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(ADMIN)],
    ) -> None:
        """401 unless the request carries the admin token (compared in constant time)."""
        if credentials is None:
            raise HTTPException(
                401,
                "this endpoint changes the catalog: send the admin token "
                "as 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not secrets.compare_digest(credentials.credentials.encode(), expected):
            raise HTTPException(401, "wrong admin token", headers={"WWW-Authenticate": "Bearer"})

    # every endpoint that changes something goes on this router
    writes = APIRouter(
        dependencies=[Depends(require_admin)],
        responses={401: {"description": "no admin token, or a wrong one"}},
    )

    @app.post("/recommend", response_model=Results)
    def post_recommend(body: RecommendRequest) -> Results:
        """The top-k products for a purchase history, each with the history product behind it."""
        return recommend(engine, limits, body)

    @app.post("/search", response_model=Results)
    def post_search(body: SearchRequest) -> Results:
        """Free-text product search, personalised when a history is given."""
        return search(engine, limits, body)

    @writes.post(
        "/items",
        response_model=ProductSaved,
        status_code=201,
        responses={200: {"model": ProductSaved, "description": "product updated"}},
    )
    def post_item(body: ProductUpdate, response: Response) -> ProductSaved:
        """Add a product (201; ``title`` required) or update one (200): only the fields sent
        change, the others keep their values. Searchable and recommendable at once."""
        saved = save_product(engine, body)
        response.status_code = 201 if saved.created else 200
        return saved

    app.include_router(writes)

    @app.get(
        "/items/{item_id}",
        response_model=Product,
        responses={404: {"description": "no such product"}},
    )
    def get_item(item_id: str) -> Product:
        """One product of the catalog."""
        catalog = engine.catalog
        row = catalog.row_of.get(item_id)
        if row is None:
            raise HTTPException(404, f"no product {item_id!r}")
        return Product(**catalog.product(row))

    @app.get("/health", response_model=Health)
    def health() -> Health:
        """Liveness, catalog size, retrieval mode, limits and search fusion weights."""
        return Health(
            status="ok",
            products=len(engine),
            retrieval=engine.retrieval,
            limits=asdict(limits),
            fusion=asdict(engine.weights),
        )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text())

    return app


def set_threads(threads: int) -> None:
    """Threads per operation in torch, faiss and numpy's BLAS. One per request is the right
    default for serving: a team of threads spin-waits when the cores are busy (seen: 10x)."""
    import faiss
    import threadpoolctl
    import torch

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    threadpoolctl.threadpool_limits(threads)


def create_app(
    model_dir: Path,
    data_dir: Path,
    limits: Limits | None = None,
    encode: Encode | None = None,
    *,
    admin_token: str,
    hosts: Sequence[str] = LOCAL_HOSTS,
    **index_options,
) -> FastAPI:
    """The app for a run's ``model/`` and a dataset's products (``encode``: tests only;
    ``admin_token``, ``hosts``: as :func:`build_app`; ``index_options``: ``ann_threshold``,
    ``nprobe``, ``text_nprobe`` of the engine)."""
    engine = load_engine(model_dir, data_dir, encode, **index_options)
    return build_app(engine, limits, admin_token=admin_token, hosts=hosts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Limits()
    parser.add_argument("--model", required=True, type=Path, help="a run's model/ directory")
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        help="dataset directory whose items table holds the products",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface")
    parser.add_argument("--port", type=int, default=8000, help="port")
    parser.add_argument(
        "--allowed-hosts",
        type=host_list,
        default=None,
        help="comma-separated Host names served besides "
        + ", ".join(LOCAL_HOSTS)
        + " and --host (unless a wildcard such as 0.0.0.0): the public name behind a proxy, "
        "'*.example.com' for its subdomains, '*' for any (not recommended); other Hosts get "
        "400 (default: none)",
    )
    parser.add_argument(
        "--admin-token-file",
        type=Path,
        default=None,
        help="file holding the admin token that writes (POST /items) need; created with a new "
        f"token, mode 0600, when missing (default: ${TOKEN_FILE_ENV}, else "
        "$FEDREC_CACHE/admin-token, $FEDREC_CACHE defaulting to ~/.cache/fedrec)",
    )
    parser.add_argument(
        "--max-k", type=positive(int), default=defaults.max_k, help="largest k accepted"
    )
    parser.add_argument(
        "--max-history",
        type=positive(int),
        default=defaults.max_history,
        help="longest history accepted (items)",
    )
    parser.add_argument(
        "--max-query-chars",
        type=positive(int),
        default=defaults.max_query_chars,
        help="longest query accepted (characters)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=positive(int),
        default=defaults.max_body_bytes,
        help="largest request body accepted; larger ones get 413",
    )
    parser.add_argument(
        "--ann-threshold",
        type=int,
        default=ANN_THRESHOLD,
        help="catalog size from which an ANN index replaces exact scoring",
    )
    parser.add_argument(
        "--nprobe",
        type=positive(int),
        default=NPROBE,
        help="IVF lists probed per recommendation (ANN only)",
    )
    parser.add_argument(
        "--text-nprobe",
        type=positive(int),
        default=TEXT_NPROBE,
        help="IVF lists probed per dense text search (ANN only)",
    )
    parser.add_argument(
        "--no-access-log",
        action="store_true",
        help="do not print one line per request (method, path, status, duration) on stderr",
    )
    parser.add_argument(
        "--threads",
        type=positive(int),
        default=1,
        help="torch, faiss and BLAS threads per request",
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    limits = Limits(args.max_k, args.max_history, args.max_query_chars, args.max_body_bytes)
    set_threads(args.threads)
    log_access(not args.no_access_log)
    token_file = args.admin_token_file or default_token_file()
    token = admin_token(token_file)
    hosts = allowed_hosts(args.host, args.allowed_hosts or ())
    print(f"loading {args.model} with the products of {args.data} ...", flush=True)
    app = create_app(
        args.model,
        args.data,
        limits,
        admin_token=token,
        hosts=hosts,
        ann_threshold=args.ann_threshold,
        nprobe=args.nprobe,
        text_nprobe=args.text_nprobe,
    )
    engine = app.state.engine
    print(
        f"{len(engine)} products, {engine.retrieval} retrieval; "
        f"open http://{args.host}:{args.port}/ (API docs at /docs)\n"
        f"writes (POST /items) need 'Authorization: Bearer <token>', the token in {token_file}; "
        f"Host names served: {', '.join(hosts)}",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
