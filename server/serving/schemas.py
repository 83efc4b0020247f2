"""The bodies of ``fedrec serve``'s requests and responses (pydantic): what each endpoint
accepts, with its limits, and what it answers. See docs/serving.md."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

from shared.data.dataset import EVENTS

# longest accepted product fields, in characters (longer ones get 422)
FIELD_CHARS = {"item_id": 200, "title": 500, "categories": 500, "brand": 200, "description": 5000}


def _number_as_text(value: object) -> object:
    """Item ids are text; a JSON number (MovieLens ids are numbers) is taken as its digits."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def text_field(name: str, min_length: int = 0) -> Any:
    """A product text field, stripped and at most ``FIELD_CHARS[name]`` characters."""
    return Annotated[
        str,
        StringConstraints(
            strip_whitespace=True, min_length=min_length, max_length=FIELD_CHARS[name]
        ),
    ]


ItemId = Annotated[text_field("item_id", 1), BeforeValidator(_number_as_text)]


class Request(BaseModel):
    """A request body: a field it does not know (a typo such as ``histroy``) is a 422 naming
    it, never silently dropped (which would answer as if the field had not been sent)."""

    model_config = ConfigDict(extra="forbid")


class HistoryEvent(Request):
    """One history item with what the customer did with it."""

    item_id: ItemId
    event: Literal[EVENTS] | None = Field(
        None, description="what the customer did; default: the dataset's most common event"
    )


History = Field(
    default_factory=list,
    description="the customer's history, oldest first: item ids (text or numbers), or objects "
    "{item_id, event} where event is one of " + ", ".join(EVENTS),
    examples=[["B004756YJA", {"item_id": "B0020YLEYK", "event": "view"}]],
)


class RecommendRequest(Request):
    history: list[ItemId | HistoryEvent] = History
    k: int = Field(10, description="how many results (1 to the server's max_k)")


class SearchRequest(Request):
    query: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)] = Field(
        description="free text, e.g. 'red nail polish'", examples=["red nail polish"]
    )
    history: list[ItemId | HistoryEvent] = History
    k: int = Field(10, description="how many results (1 to the server's max_k)")


class Product(BaseModel):
    item_id: ItemId
    title: text_field("title", 1)
    categories: text_field("categories") = Field(
        "", description="'|'-joined category path", examples=["Home|Kitchen|Cookware"]
    )
    brand: text_field("brand") = ""
    description: text_field("description") = ""


class ProductUpdate(Request):
    """A new product (``title`` required), or the fields to change of an existing one."""

    item_id: ItemId
    title: text_field("title", 1) | None = None
    categories: text_field("categories") | None = Field(
        None, description="'|'-joined category path", examples=["Home|Kitchen|Cookware"]
    )
    brand: text_field("brand") | None = None
    description: text_field("description") | None = None


class ProductSaved(BaseModel):
    created: bool = Field(description="true if the product is new, false if it was updated")
    product: Product = Field(description="the product as stored now")


class Result(BaseModel):
    item_id: str
    title: str
    categories: str
    brand: str
    score: float
    reason: str = Field(description="why this product is here, in words")
    because: str | None = Field(None, description="the history product that supports it")
    matched_terms: list[str] = Field(default_factory=list)


class Results(BaseModel):
    results: list[Result]
    retrieval: str = Field(description="'exact' (one matmul) or 'ann' (faiss IVF)")
    took_ms: float


class Health(BaseModel):
    status: str
    products: int
    retrieval: str
    limits: dict
    fusion: dict
