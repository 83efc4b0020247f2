"""The BERT-plus-CF fusion recommender, readable in one file.

Items: a frozen text embedding ``t_i`` (from the text tower, see :mod:`shared.recommender.text`)
fused with a
learned item-ID embedding. Customers: no parameters of their own; a customer is their ordered
history, encoded by a small causal transformer on top of a recency-weighted mean of the history
items. So nothing customer-specific ever exists outside the node that holds the history.

Scoring is an inner product against the whole catalog::

    score(u, i) = scale * <h_u, A t_i> + id_scale * (<h_u, v_i> + b_i)

with ``A`` a trainable text projection (initialised to preserve the pretrained geometry) and
``v_i``/``b_i`` the item-ID vector and bias (initialised at zero, so an item nobody has bought is
scored by its text alone). The candidate side is written as two ``nn.Linear`` layers applied to
``h_u`` (``query_to_text`` and ``id_scores``), and the history side uses separate, untied tables:
every trainable weight is then used by exactly one standard module, so Opacus computes exact
per-customer gradient norms (no tied weights, see docs/privacy.md).

At initialisation the transformer's output projection is zero and the model *is* the text-only
baseline (recency-weighted mean of the history's text embeddings, cosine scoring): training,
private or not, starts from what public pretrained knowledge already gives.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FUSIONS = ("gated", "sum", "concat")
VARIANTS = ("fusion", "text", "id")
# the largest architecture any setting may ask for, far above a sequential recommender's (the
# defaults: dim 128, 2 layers, 50 events); beyond, a request is refused before anything is built
MAX_DIM, MAX_LAYERS, MAX_LEN = 4096, 48, 4096
STATE_CHUNK = 256  # histories :meth:`FusionRecommender.user_states` encodes at once


def architecture_problem(
    dim: int, layers: int, heads: int, max_len: int, prefix: str = ""
) -> str | None:
    """Why an architecture cannot be built (a setting out of range), or None; ``prefix``
    names the settings of ``dim`` and ``max_len`` (``dp-`` for the private model's)."""
    if not 1 <= dim <= MAX_DIM:
        return f"{prefix}dim must be in [1, {MAX_DIM}], got {dim}"
    if not 0 <= layers <= MAX_LAYERS:
        return f"layers must be in [0, {MAX_LAYERS}], got {layers}"
    if not 1 <= heads <= dim or dim % heads:
        return f"heads must divide {prefix}dim ({dim}), got {heads}"
    if not 1 <= max_len <= MAX_LEN:
        return f"{prefix}max-len must be in [1, {MAX_LEN}], got {max_len}"
    return None


@dataclass
class ModelConfig:
    """Everything that defines the architecture (saved next to the weights)."""

    num_items: int
    text_dim: int = 384
    dim: int = 128
    max_len: int = 50
    layers: int = 2
    heads: int = 2
    dropout: float = 0.3
    fusion: str = "gated"  # how a history item's text and ID embeddings are fused
    variant: str = "fusion"  # "text" or "id" for the ablations
    recency: float = 0.7  # decay of the recency-weighted mean: weight (1 - recency)^age
    logit_scale: float = 20.0  # inverse temperature of the text (cosine-like) score
    new_item_boost: float = 0.0  # logit added to products without behaviour (docs/evaluation.md)
    # multiplies the ID scores (vectors and biases): a reparametrisation, the same model at any
    # value, but it sets how far a clipped gradient step moves them (under DP: docs/privacy.md)
    id_scale: float = 1.0

    def __post_init__(self) -> None:
        if problem := architecture_problem(self.dim, self.layers, self.heads, self.max_len):
            raise ValueError(problem)
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")

    @property
    def use_text(self) -> bool:
        return self.variant in ("fusion", "text")

    @property
    def use_id(self) -> bool:
        return self.variant in ("fusion", "id")

    def weight_count(self) -> int:
        """How many weights :class:`FusionRecommender` holds for this config, counted without
        building it (what a node checks against its ``max-model-weights``)."""
        d, t, n = self.dim, self.text_dim, self.num_items
        count = self.layers * (12 * d * d + 13 * d)  # per block: two norms, qkv, out, ff in/out
        count += self.max_len * d + 2 * d + d * d  # positions, the final norm, the residual
        if self.use_text:
            count += 2 * t * d  # text_in, query_to_text
        if self.use_id:
            count += (n + 1) * d + d * n + n  # id_in (with padding), id_scores and its biases
        if self.use_text and self.use_id and self.fusion == "gated":
            count += t * d + d
        elif self.use_text and self.use_id and self.fusion == "concat":
            count += 2 * d * d
        return count

    def activation_count(self, customers: int, training: bool = True) -> int:
        """How many values the largest activations of :class:`FusionRecommender` hold for
        ``customers`` histories of ``max_len`` events at once, counted without building it
        (what a node checks against its ``max-step-activations``): their scores over the
        catalog (at every position in training, at the last one in evaluation) plus their
        attention, positions² a customer for the recency weights and heads x positions² for
        each layer (every layer's kept for the backward pass in training, one layer at a time
        in evaluation, which encodes :data:`STATE_CHUNK` customers at once). Peak memory
        measured about 12 to 18 bytes a value (docs/privacy.md)."""
        positions = self.max_len
        if training:
            scores = customers * positions * self.num_items
            attention = customers * positions**2 * (self.layers * self.heads + 1)
        else:
            scores = customers * self.num_items
            encoded = min(customers, STATE_CHUNK)
            attention = encoded * positions**2 * ((self.heads if self.layers else 0) + 1)
        return scores + attention

    def to_dict(self) -> dict:
        return asdict(self)


def text_projection(text: torch.Tensor, dim: int) -> torch.Tensor:
    """A ``dim x text_dim`` orthonormal projection onto the catalog's top principal directions.

    Computed from the item texts' embeddings only (the catalog is public), it keeps as much of
    the pretrained geometry as ``dim`` dimensions can, so the untrained model ranks like the text.
    """
    centred = text.double() - text.double().mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    basis = vh[: min(dim, vh.shape[0])]
    if basis.shape[0] < dim:  # tiny catalogs: pad with random orthogonal directions
        extra = torch.linalg.qr(torch.randn(text.shape[1], dim - basis.shape[0]).double())[0].T
        basis = torch.cat([basis, extra - (extra @ basis.T) @ basis])
    return basis.float()


class Block(nn.Module):
    """A pre-norm causal self-attention block made of plain Linear and LayerNorm modules."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_out = nn.Linear(dim, dim)
        self.ff_in, self.ff_out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(dim, dim=2)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + F.dropout(
            self.attn_out(attended.transpose(1, 2).reshape(batch, length, dim)),
            self.dropout,
            self.training,
        )
        return x + F.dropout(
            self.ff_out(F.gelu(self.ff_in(self.norm2(x)))), self.dropout, self.training
        )


class FusionRecommender(nn.Module):
    """Text + ID item representations, a sequence encoder for customers, full-catalog scores."""

    def __init__(self, config: ModelConfig, text: torch.Tensor, public_start: bool = True):
        super().__init__()
        self.config = c = config
        if text.shape != (c.num_items, c.text_dim):
            raise ValueError(
                f"text embeddings {tuple(text.shape)} != ({c.num_items}, {c.text_dim})"
            )
        self.register_buffer("text", text.float().contiguous(), persistent=False)
        # (dim, text_dim); without ``public_start`` (:meth:`from_state`) the weights come next
        projection = (
            text_projection(self.text, c.dim) if public_start else torch.zeros(c.dim, c.text_dim)
        )
        # history side (item index 0 is padding, item i is row i + 1) and candidate side:
        # text score through the projection A, ID score + bias. Ablations omit what they lack.
        if c.use_text:
            self.text_in = nn.Linear(c.text_dim, c.dim, bias=False)
            self.text_in.weight.data.copy_(projection)
            self.query_to_text = nn.Linear(c.dim, c.text_dim, bias=False)
            self.query_to_text.weight.data.copy_(projection.T)
        if c.use_id:
            self.id_in = nn.Embedding(c.num_items + 1, c.dim, padding_idx=0)
            # with text, ID embeddings start at zero (the model starts as the text baseline);
            # alone, they need a random start to break symmetry
            nn.init.normal_(self.id_in.weight, std=0.0 if c.use_text else 0.1)
            self.id_in.weight.data[0] = 0.0
            self.id_scores = nn.Linear(c.dim, c.num_items)
            nn.init.zeros_(self.id_scores.weight)
            nn.init.zeros_(self.id_scores.bias)
        if c.use_text and c.use_id and c.fusion == "gated":
            self.gate = nn.Linear(c.text_dim, c.dim)
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
        elif c.use_text and c.use_id and c.fusion == "concat":
            self.mix = nn.Linear(2 * c.dim, c.dim, bias=False)
            self.mix.weight.data.copy_(torch.cat([torch.eye(c.dim), torch.eye(c.dim)], dim=1))
        self.position = nn.Embedding(c.max_len, c.dim)
        nn.init.normal_(self.position.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(c.dim, c.heads, c.dropout) for _ in range(c.layers))
        self.norm = nn.LayerNorm(c.dim)
        self.residual = nn.Linear(c.dim, c.dim, bias=False)
        nn.init.zeros_(self.residual.weight)
        self.register_buffer("decay", self._decay_matrix(c.max_len, c.recency), persistent=False)

    @classmethod
    def from_state(
        cls, config: ModelConfig, text: torch.Tensor, state: dict[str, torch.Tensor]
    ) -> FusionRecommender:
        """A model holding ``state``, which must name every weight (strict). It skips the
        public start (the catalog's SVD, about a second for 12,101 products) that ``state``
        replaces anyway: every node builds the model each round."""
        model = cls(config, text, public_start=False)
        model.load_state_dict(state)
        return model

    @staticmethod
    def _decay_matrix(length: int, recency: float) -> torch.Tensor:
        age = torch.arange(length)[:, None] - torch.arange(length)[None, :]
        return torch.where(age >= 0, (1.0 - recency) ** age.clamp(min=0).double(), 0.0).float()

    def embed_history(self, items: torch.Tensor) -> torch.Tensor:
        """History item representations (batch, length, dim); ``items`` holds index + 1, 0 = pad."""
        c = self.config
        text = self.text[(items - 1).clamp(min=0)]
        parts_text = self.text_in(text) if c.use_text else None
        parts_id = self.id_in(items) if c.use_id else None
        if parts_text is None:
            return parts_id
        if parts_id is None:
            return parts_text
        if c.fusion == "gated":
            return parts_text + torch.sigmoid(self.gate(text)) * 2.0 * parts_id
        if c.fusion == "concat":
            return self.mix(torch.cat([parts_text, parts_id], dim=-1))
        return parts_text + parts_id

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        """Customer states after every position (batch, length, dim) of right-aligned histories."""
        batch, length = items.shape
        valid = (items > 0).float()
        x = self.embed_history(items) * valid.unsqueeze(-1)
        # recency-weighted mean of the history so far: the public-knowledge starting point
        weights = self.decay[:length, :length].unsqueeze(0) * valid.unsqueeze(1)
        base = weights @ x / weights.sum(-1, keepdim=True).clamp(min=1e-6)
        # position = distance from the most recent item, the same however the batch is padded
        positions = torch.arange(length - 1, -1, -1, device=items.device).expand(batch, length)
        positions = positions.contiguous()
        y = x + self.position(positions)
        causal = torch.ones(length, length, dtype=torch.bool, device=items.device).tril()
        mask = causal.unsqueeze(0) & (items > 0).unsqueeze(1)
        mask = (mask | torch.eye(length, dtype=torch.bool, device=items.device)).unsqueeze(1)
        y = F.dropout(y, self.config.dropout, self.training)
        for block in self.blocks:
            y = block(y, mask)
        return base + self.residual(self.norm(y))

    def scores(self, states: torch.Tensor) -> torch.Tensor:
        """Scores of every catalog item for customer states (..., dim) -> (..., num_items).

        The fast path: one matmul against the fused item table. It equals :meth:`forward`'s
        module-by-module computation, which private training uses instead.
        """
        table, bias = self.item_table()
        return states @ table.T + bias

    def item_table(self, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The candidate-side item vectors (items, dim) and biases, text and ID fused: of the
        whole catalog, or of the items ``rows`` (indices on the model's device)."""
        c = self.config
        text = self.text if rows is None else self.text[rows]
        table = torch.zeros(len(text), c.dim, device=text.device)
        if c.use_text:
            table = table + c.logit_scale * (text @ self.query_to_text.weight)
        if c.use_id:
            weight, bias = self.id_scores.weight, self.id_scores.bias
            if rows is not None:
                weight, bias = weight[rows], bias[rows]
            return table + c.id_scale * weight, c.id_scale * bias
        return table, torch.zeros(len(text), device=text.device)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """Scores after every position (batch, length, num_items), one standard module per
        weight, so that Opacus sees every per-customer gradient exactly."""
        states = self.encode(items)
        out = 0.0
        if self.config.use_text:
            out = self.config.logit_scale * (self.query_to_text(states) @ self.text.T)
        if self.config.use_id:
            out = out + self.config.id_scale * self.id_scores(states)
        return out

    def user_states(self, histories: list[np.ndarray], chunk: int = STATE_CHUNK) -> torch.Tensor:
        """The state after each customer's whole history (the customer representation).

        Histories are grouped by length so that short ones are not padded to the longest.
        """
        lengths = np.array([min(len(h), self.config.max_len) for h in histories])
        order = np.argsort(lengths, kind="stable")
        states = torch.zeros(len(histories), self.config.dim, device=self.text.device)
        for start in range(0, len(order), chunk):
            index = order[start : start + chunk]
            width = max(1, int(lengths[index].max()))
            items = pad_histories([histories[i] for i in index], width).to(self.text.device)
            states[torch.as_tensor(index, device=self.text.device)] = self.encode(items)[:, -1]
        return states


def pad_histories(histories: list[np.ndarray], max_len: int) -> torch.Tensor:
    """Right-aligned (item index + 1) tensor of the last ``max_len`` items, 0 = padding."""
    out = torch.zeros(len(histories), max_len, dtype=torch.long)
    for row, history in enumerate(histories):
        tail = np.asarray(history[-max_len:], dtype=np.int64)
        if len(tail):
            out[row, max_len - len(tail) :] = torch.from_numpy(tail + 1)
    return out


def init_seed(seed: int) -> None:
    """Seed torch's and numpy's global generators with the run's ``seed`` (DP noise never
    draws from them: :class:`shared.recommender.secure_random.SecureRandom`)."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
