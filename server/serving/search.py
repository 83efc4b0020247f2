"""Personalised product search and recommendation over a live catalog, with reasons.

**Recommend**: the customer state from the ordered history (the model's ``user_states``) is
scored against every product, ``[state, 1] . [item_table, bias]``, history excluded, exactly or
through an ANN index (:mod:`server.serving.index`).

**Search** fuses three signals over a pool of candidates (the top ``pool`` products of each):

- *lexical*: BM25 of the query over the product texts (:mod:`server.serving.lexical`);
- *dense*: cosine of the query's text-tower embedding with the products' (``model.text``; the
  embeddings of the :data:`QUERY_CACHE` most recent queries are kept);
- *preference*: the recommender's score for the history (only when there is one).

Each signal is z-normalised over the pool and the fused score is their weighted sum. With no
history the preference term is absent: plain relevance. The weights are tuned on the validation
split by ``fedrec bench search`` and stored next to the model as ``search.json``.

**Reasons**: a recommendation names the history product whose candidate-side vector (text and
ID fused) is most similar to it, with what the customer did with it (the event: viewed, bought,
rated, ...); a search result names the query words it matched, or its text similarity, and the
supporting history product when its preference score is above the pool's mean.

**New products** (:meth:`SearchEngine.upsert`) get a text embedding, ID parameters predicted from
it (:class:`shared.recommender.catalog.TextToId`), a row in both vector indexes and in BM25, at
once. A write
builds the next :class:`Catalog` (model tables, indexes, fields) beside the current one and swaps
it in: searches never wait for it, and each reads one consistent version.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from server.privacy.ledger import is_number
from server.serving.index import ANN_THRESHOLD, NPROBE, TEXT_NPROBE, VectorIndex, top_k
from server.serving.lexical import Lexical
from shared.data.dataset import DEFAULT_EVENT, DataError, find_table, load_items, usual_event
from shared.recommender.artifacts import load_model, read_item_ids, read_text_model
from shared.recommender.catalog import TextToId, full_table, set_items, table_rows, with_items
from shared.recommender.model import FusionRecommender
from shared.recommender.text import OnnxTextEncoder, embed_items, item_texts

PRODUCT_FIELDS = ("item_id", "title", "categories", "brand", "description")
QUERY_CACHE = 4096  # query embeddings kept, most recently used (1.5 kB each for MiniLM)
SIGNALS = ("lexical", "dense", "preference")
WEIGHTS_FILE = "search.json"
# what a reason says the customer did with a history product, by event type
EVENT_VERBS = {
    "view": "viewed",
    "click": "clicked",
    "cart": "added to cart",
    "purchase": "bought",
    "rating": "rated",
}

# Text embeddings for a batch of texts: (n, text_dim), L2-normalised, same tower as the catalog.
Encode = Callable[[list[str]], np.ndarray]


@dataclass
class FusionWeights:
    """Weights of the z-normalised search signals and the candidate pool per signal."""

    lexical: float = 1.0
    dense: float = 1.0
    preference: float = 1.0
    pool: int = 200

    def vector(self, personal: bool) -> np.ndarray:
        return np.array([self.lexical, self.dense, self.preference if personal else 0.0])

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> FusionWeights:
        """The weights in ``path``; DataError naming it unless it holds a JSON object of
        these fields, finite numbers (``pool`` an integer from 1)."""
        try:
            given = json.loads(Path(path).read_bytes())
        except (ValueError, RecursionError) as error:  # not JSON, not UTF-8, nested too deep
            raise DataError(path, f"not valid JSON ({error})"[:300]) from None
        known = {f.name for f in fields(cls)}
        if not isinstance(given, dict) or not given.keys() <= known:
            raise DataError(path, f"not an object of {', '.join(sorted(known))}")
        numbers = [v for k, v in given.items() if k != "pool"]
        pool = given.get("pool", cls.pool)
        if not all(is_number(v) for v in numbers) or not (
            isinstance(pool, int) and not isinstance(pool, bool) and pool >= 1
        ):
            raise DataError(path, "weights must be finite numbers and pool an integer from 1")
        return cls(**given)


@dataclass
class Hit:
    """One ranked product: its catalog row, score and why it is there."""

    row: int
    score: float
    reason: str
    because: int | None = None  # the history product (row) that supports it
    matched: list[str] = field(default_factory=list)


@dataclass
class Pool:
    """The candidates of one query and their raw signals, one row per :data:`SIGNALS`."""

    rows: np.ndarray
    signals: np.ndarray  # (3, len(rows)); preference is 0 without history


class UnknownItems(KeyError):
    """Item ids that are not in the catalog."""

    def __init__(self, item_ids: list[str]):
        super().__init__(item_ids)
        self.item_ids = item_ids


def zscore(values: np.ndarray) -> np.ndarray:
    """Standardise along the last axis; a constant signal becomes 0."""
    centred = values - values.mean(axis=-1, keepdims=True)
    std = values.std(axis=-1, keepdims=True)
    return np.divide(centred, std, out=np.zeros_like(centred), where=std > 0)


def unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-9)


@dataclass(frozen=True)
class Catalog:
    """One version of the catalog: everything a read uses, never changed once published. A
    write builds the next version beside it and swaps it in (:meth:`SearchEngine.upsert`), so a
    request reads one consistent version and never waits for a write."""

    model: FusionRecommender
    fields: dict[str, np.ndarray]  # product fields as object arrays: a row in microseconds
    row_of: dict[str, int]
    text_index: VectorIndex  # text embeddings (the same array as model.text)
    preference_index: VectorIndex  # [item_table | bias]
    lexical: Lexical
    predicted: np.ndarray  # per row: ID parameters predicted from text (no behaviour)

    def __len__(self) -> int:
        return len(self.fields["item_id"])

    def rows(self, item_ids: Sequence[str]) -> np.ndarray:
        """Catalog rows of ``item_ids``; raises :class:`UnknownItems` naming any unknown."""
        unknown = [i for i in dict.fromkeys(item_ids) if i not in self.row_of]
        if unknown:
            raise UnknownItems(unknown)
        return np.array([self.row_of[i] for i in item_ids], dtype=np.int64)

    def product(self, row: int) -> dict[str, str]:
        return {f: values[row] for f, values in self.fields.items()}

    def title(self, row: int) -> str:
        return self.fields["title"][row] or self.fields["item_id"][row]


class SearchEngine:
    """Recommendation and personalised search over a catalog that can change while serving.

    Reads take no lock: each uses the :class:`Catalog` current when it starts (``catalog``, or
    the one given). Writes (:meth:`upsert`) take :attr:`write_lock`, one at a time.
    """

    def __init__(
        self,
        model: FusionRecommender,
        items: pd.DataFrame,
        encode: Encode,
        weights: FusionWeights | None = None,
        ann_threshold: int = ANN_THRESHOLD,
        nprobe: int = NPROBE,
        text_nprobe: int = TEXT_NPROBE,
        default_event: str = DEFAULT_EVENT,
    ):
        if len(items) != model.config.num_items:
            raise ValueError(f"{len(items)} products for a model of {model.config.num_items}")
        model = model.cpu().eval()
        fields = {f: items[f].astype(str).to_numpy(dtype=object) for f in PRODUCT_FIELDS}
        self.encode = encode
        self.query_vector = lru_cache(maxsize=QUERY_CACHE)(self._query_vector)
        # a query is encoded on its own thread while lexical and preference scoring run
        self.query_encoder = ThreadPoolExecutor(1, thread_name_prefix="fedrec-query-encoder")
        self.weights = weights or FusionWeights()
        # ANN lists probed: customer states need more than query embeddings for the same
        # recall@10 (0.98 and 0.97 at the defaults, 1M products; docs/serving.md)
        text_index = VectorIndex(model.text.cpu().numpy(), ann_threshold, text_nprobe)
        model.text = torch.from_numpy(text_index.vectors)  # one copy, shared
        self.catalog = Catalog(
            model=model,
            fields=fields,
            row_of={item_id: row for row, item_id in enumerate(fields["item_id"])},
            text_index=text_index,
            preference_index=VectorIndex(full_table(model), ann_threshold, nprobe),
            lexical=Lexical(item_texts(pd.DataFrame(fields))),
            predicted=np.zeros(len(items), dtype=bool),
        )
        self.text_to_id = TextToId(model)
        # writes one at a time; re-entrant, so a caller can hold it around read-merge-write
        self.write_lock = threading.RLock()
        self.default_event = default_event  # a history item's event when none is given

    def __len__(self) -> int:
        return len(self.catalog)

    @property
    def retrieval(self) -> str:
        return self.catalog.preference_index.kind

    # --- catalog -------------------------------------------------------------------------

    def rows(self, item_ids: Sequence[str]) -> np.ndarray:
        """Rows of ``item_ids`` in the current catalog (:meth:`Catalog.rows`)."""
        return self.catalog.rows(item_ids)

    def upsert(self, products: pd.DataFrame) -> list[bool]:
        """Add or replace products (columns :data:`PRODUCT_FIELDS`); True where one is new.

        A replaced product keeps the ID parameters it learned from behaviour; a product with
        none (added here) gets them predicted from its new text. The next :class:`Catalog` is
        built beside the current one (copies of its per-product arrays, a new BM25 index) and
        swapped in at the end: reads meanwhile use the current one, unchanged.
        """
        products = products.reindex(columns=list(PRODUCT_FIELDS), fill_value="").astype(str)
        products = products.drop_duplicates("item_id", keep="last").reset_index(drop=True)
        with self.write_lock:
            old = self.catalog
            created = [i not in old.row_of for i in products["item_id"]]
            rows = np.array([old.row_of.get(i, -1) for i in products["item_id"]])
            rows[np.array(created, dtype=bool)] = len(old) + np.arange(sum(created))
            texts = item_texts(products)
            text = torch.from_numpy(np.asarray(self.encode(texts), dtype=np.float32))
            all_predicted = np.append(old.predicted, np.ones(sum(created), dtype=bool))
            predicted = all_predicted[rows]
            text_index = old.text_index.with_rows(rows, text.numpy())
            model = with_items(old.model, torch.from_numpy(text_index.vectors))
            set_items(model, rows[~predicted], text[~predicted], None)
            set_items(model, rows[predicted], text[predicted], self.text_to_id(text[predicted]))
            fields = {}
            for f, values in old.fields.items():
                fields[f] = np.concatenate([values, np.empty(sum(created), dtype=object)])
                fields[f][rows] = products[f].to_numpy(dtype=object)
            placed = zip(products["item_id"], rows.tolist(), strict=True)
            self.catalog = Catalog(
                model=model,
                fields=fields,
                row_of=old.row_of | dict(placed),
                text_index=text_index,
                preference_index=old.preference_index.with_rows(rows, table_rows(model, rows)),
                lexical=old.lexical.with_docs(rows, texts),
                predicted=all_predicted,
            )
        return created

    # --- scoring -------------------------------------------------------------------------

    @torch.inference_mode()
    def states(self, histories: list[np.ndarray], catalog: Catalog | None = None) -> np.ndarray:
        """``[state, 1]`` per history (n, dim + 1): the query side of the preference index."""
        model = (self.catalog if catalog is None else catalog).model
        states = model.user_states(histories).numpy()
        return np.concatenate([states, np.ones((len(states), 1), np.float32)], axis=1)

    def recommend(
        self,
        history: np.ndarray,
        k: int,
        events: Sequence[str] | None = None,
        catalog: Catalog | None = None,
    ) -> list[Hit]:
        """The ``k`` best products for a history (rows of ``catalog``, default the current one,
        oldest first; ``events``: each one's event type, default :attr:`default_event`),
        history excluded."""
        catalog = self.catalog if catalog is None else catalog
        state = self.states([history], catalog)[0]
        rows, scores = catalog.preference_index.search(state, k, exclude=history)
        because = self.because(history, rows, catalog)
        return [
            Hit(int(r), float(s), self._recommend_reason(b, history, events, catalog), b)
            for r, s, b in zip(rows, scores, because, strict=True)
        ]

    def _query_vector(self, query: str) -> np.ndarray:
        """The text tower's embedding of ``query`` (read-only: the cache shares it)."""
        vector = np.asarray(self.encode([query])[0], dtype=np.float32)
        vector.flags.writeable = False
        return vector

    def candidates(
        self,
        query: str,
        query_vector: np.ndarray | Future[np.ndarray],
        history: np.ndarray,
        state: np.ndarray | None,
        catalog: Catalog | None = None,
    ) -> Pool:
        """The pool for a query: top ``pool`` by each signal, history excluded, all signals.

        ``query_vector`` may still be on its way (a future): it is awaited only once the
        lexical and preference candidates are found.
        """
        catalog = self.catalog if catalog is None else catalog
        pool = self.weights.pool
        lexical = catalog.lexical.scores(query)
        found = [catalog.lexical.top(lexical, pool, history)]
        if state is not None:
            found.append(catalog.preference_index.search(state, pool, history)[0])
        if isinstance(query_vector, Future):
            query_vector = query_vector.result()
        found.append(catalog.text_index.search(query_vector, pool, history)[0])
        rows = np.unique(np.concatenate(found))
        preference = (
            catalog.preference_index.vectors[rows] @ state
            if state is not None
            else np.zeros(len(rows), np.float32)
        )
        dense = catalog.text_index.vectors[rows] @ query_vector
        return Pool(rows, np.stack([lexical[rows], dense, preference]))

    def search(
        self,
        query: str,
        history: np.ndarray,
        k: int,
        events: Sequence[str] | None = None,
        catalog: Catalog | None = None,
    ) -> list[Hit]:
        """The ``k`` best products for a free-text query, personalised by ``history`` (with
        ``events`` and ``catalog`` as in :meth:`recommend`)."""
        query_vector = self.query_encoder.submit(self.query_vector, query)
        catalog = self.catalog if catalog is None else catalog
        personal = len(history) > 0
        state = self.states([history], catalog)[0] if personal else None
        pool = self.candidates(query, query_vector, history, state, catalog)
        z = zscore(pool.signals)
        fused = self.weights.vector(personal) @ z
        best = top_k(fused, k)
        because = self.because(history, pool.rows[best], catalog)
        hits = []
        for index, support in zip(best, because, strict=True):
            row = int(pool.rows[index])
            matched = catalog.lexical.matched_terms(query, row)
            support = support if z[2, index] > 0 else None  # preference above pool mean
            reason = self._search_reason(
                matched, float(pool.signals[1, index]), support, history, events, catalog
            )
            hits.append(Hit(row, float(fused[index]), reason, support, matched))
        return hits

    # --- reasons -------------------------------------------------------------------------

    @staticmethod
    def because(history: np.ndarray, rows: np.ndarray, catalog: Catalog) -> list[int | None]:
        """For each of ``rows``, the history product most similar to it (cosine of the
        candidate-side vectors, which fuse text and ID), or None without history."""
        if len(history) == 0:
            return [None] * len(rows)
        history = np.unique(history)
        table = catalog.preference_index.vectors[:, :-1]
        similarity = unit(table[rows]) @ unit(table[history]).T
        return [int(history[i]) for i in similarity.argmax(1)]

    def did(self, row: int, history: np.ndarray, events: Sequence[str] | None) -> str:
        """What the customer did with history product ``row`` (its latest event), as a verb."""
        event = self.default_event
        if events is not None:
            event = events[int(np.flatnonzero(history == row)[-1])]
        return EVENT_VERBS.get(event, EVENT_VERBS[DEFAULT_EVENT])

    def _recommend_reason(
        self,
        because: int | None,
        history: np.ndarray,
        events: Sequence[str] | None,
        catalog: Catalog,
    ) -> str:
        if because is None:
            return "popular with customers (no history given)"
        return f"because you {self.did(because, history, events)} {catalog.title(because)}"

    def _search_reason(
        self,
        matched: list[str],
        similarity: float,
        because: int | None,
        history: np.ndarray,
        events: Sequence[str] | None,
        catalog: Catalog,
    ) -> str:
        if matched:
            reason = "matches " + ", ".join(f"'{w}'" for w in matched)
        else:
            reason = f"close in meaning to your query (text similarity {similarity:.2f})"
        if because is not None:
            verb = self.did(because, history, events)
            reason += f"; suits your history: you {verb} {catalog.title(because)}"
        return reason


def load_engine(
    model_dir: Path, data_dir: Path, encode: Encode | None = None, **options
) -> SearchEngine:
    """The engine for a run's ``model/`` and the dataset's product table.

    Products of the dataset the model has never seen are added from their text; a history
    item's event defaults to the dataset's most common one
    (:func:`shared.data.dataset.usual_event`). ``encode``
    defaults to the model's own text tower run by ONNX Runtime (catalog embeddings come from
    the shared cache).
    Fusion weights come from ``model_dir/search.json`` when present.
    """
    model_dir, data_dir = Path(model_dir), Path(data_dir)
    items_path = find_table(data_dir, "items")
    items = load_items(items_path).set_index("item_id", drop=False)
    item_ids = read_item_ids(model_dir)
    missing = [i for i in item_ids if i not in items.index]
    if missing:
        raise DataError(
            items_path,
            f"{len(missing)} product(s) of the model are not in this "
            f"table, e.g. {missing[:5]}: is it the model's dataset?",
        )
    catalog = items.loc[item_ids].reset_index(drop=True)
    if encode is None:
        text_model = read_text_model(model_dir)
        text = embed_items(catalog, text_model, show_progress=False)
        encode = OnnxTextEncoder(text_model).encode
    else:
        text = encode(item_texts(catalog))
    model = load_model(model_dir, torch.from_numpy(np.asarray(text, dtype=np.float32)))
    weights_path = model_dir / WEIGHTS_FILE
    weights = FusionWeights.load(weights_path) if weights_path.exists() else None
    engine = SearchEngine(
        model, catalog, encode, weights, default_event=usual_event(data_dir), **options
    )
    new = items[~items.index.isin(item_ids)]
    if len(new):
        engine.upsert(new.reset_index(drop=True))
    return engine
