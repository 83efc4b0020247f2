"""``fedrec data synth``: the synthetic marketplace, the embedded default dataset.

Both the product text and the collaborative signal carry information:

- Items sit in a category path (``Beauty|Skin Care|Face|Serums``) and belong to a brand and
  one of the brand's product lines; titles and descriptions are built from these words.
- Every item also has a hidden unit "style" vector and a popularity that never appear in its
  text, so ID-based collaborative filtering adds signal beyond the text.
- Customers have tastes over departments, categories (shifted by their home region) and
  styles that drift slowly as a random walk, and a sequential habit: after an item they often
  take a complementary item of the same brand line next (a cleanser, then the serum), in the
  same session. A sequence-aware model can exploit that order.
- Each pick is one event on the view → click → cart → purchase funnel; it goes deeper when
  the item fits the customer better, so views are most common. Customers do not repeat items.
- Merchants own contiguous clusters of categories, with some items sold by another merchant;
  an event's region is the customer's home region.

Everything is drawn from one ``numpy`` Generator, so a seed fixes the output byte for byte.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from shared.data.convert import write_dataset
from shared.runs.config import positive
from shared.runs.progress import progress_bar


@dataclass(frozen=True)
class Department:
    """A top-level category: its leaves (path below it -> product types) and its vocabulary."""

    name: str
    leaves: dict[str, tuple[str, ...]]
    attributes: tuple[str, ...]
    benefits: tuple[str, ...]
    lines: tuple[str, ...]
    brands: tuple[str, ...]
    price: float


DEPARTMENTS = (
    Department(
        "Beauty",
        {
            "Skin Care|Face|Cleansers": ("Cleanser", "Foaming Wash", "Cleansing Balm"),
            "Skin Care|Face|Serums": ("Serum", "Face Oil", "Essence"),
            "Skin Care|Face|Moisturizers": ("Moisturizer", "Day Cream", "Night Cream"),
            "Skin Care|Sun|Sunscreen": ("Sunscreen SPF 30", "Sun Fluid SPF 50"),
            "Makeup|Face|Foundation": ("Foundation", "BB Cream", "Tinted Moisturizer"),
            "Makeup|Eyes|Mascara": ("Mascara", "Lash Primer"),
            "Makeup|Lips|Lipstick": ("Lipstick", "Lip Tint", "Lip Balm"),
            "Hair Care|Shampoo": ("Shampoo", "Clarifying Shampoo"),
            "Hair Care|Conditioner": ("Conditioner", "Hair Mask", "Leave-In Spray"),
            "Fragrance|Women": ("Eau de Parfum", "Body Mist"),
        },
        (
            "Hydrating",
            "Vitamin C",
            "Hyaluronic",
            "Matte",
            "Radiant",
            "Gentle",
            "Firming",
            "Niacinamide",
            "Rose",
            "Charcoal",
            "Oil-Free",
            "Sensitive",
        ),
        (
            "for all skin types",
            "dermatologist tested",
            "fragrance free",
            "vegan formula",
            "long lasting",
            "cruelty free",
        ),
        (
            "Hydra Boost",
            "Pure Glow",
            "Daily Calm",
            "Velvet",
            "Bright Start",
            "Night Repair",
            "Botanica",
            "Clear Skin",
        ),
        ("Lumiere", "Aurelle", "Mira", "Dermalab", "Petalia", "Kosmo", "Solene", "Verda"),
        18.0,
    ),
    Department(
        "Home & Kitchen",
        {
            "Kitchen|Cookware|Pans": ("Frying Pan", "Skillet", "Saute Pan"),
            "Kitchen|Cookware|Pots": ("Stock Pot", "Saucepan", "Dutch Oven"),
            "Kitchen|Cutlery|Knives": ("Chef Knife", "Paring Knife", "Knife Block Set"),
            "Kitchen|Coffee|Brewers": ("Pour-Over Set", "French Press", "Drip Coffee Maker"),
            "Kitchen|Coffee|Accessories": ("Coffee Grinder", "Milk Frother", "Travel Mug"),
            "Bedding|Sheets": ("Sheet Set", "Duvet Cover", "Pillowcases"),
            "Bath|Towels": ("Bath Towel Set", "Hand Towels", "Bath Mat"),
        },
        (
            "Nonstick",
            "Stainless",
            "Ceramic",
            "Cast Iron",
            "Organic Cotton",
            "Bamboo",
            "Compact",
            "Premium",
            "Matte Black",
            "Copper",
        ),
        (
            "dishwasher safe",
            "oven safe to 260 C",
            "machine washable",
            "lifetime warranty",
            "easy to clean",
            "induction ready",
        ),
        ("Chef Series", "Everyday", "Pro Line", "Heritage", "Nordic", "Artisan", "Urban"),
        ("Casa Fina", "Hearthly", "Kochwerk", "Maple & Co", "Ironleaf", "Linenhaus", "Tidy Nest"),
        45.0,
    ),
    Department(
        "Sports & Outdoors",
        {
            "Fitness|Yoga|Mats": ("Yoga Mat", "Travel Yoga Mat"),
            "Fitness|Yoga|Accessories": ("Yoga Block", "Yoga Strap", "Meditation Cushion"),
            "Fitness|Strength|Weights": ("Dumbbell Set", "Kettlebell", "Resistance Bands"),
            "Running|Shoes": ("Running Shoes", "Trail Shoes"),
            "Running|Apparel": ("Running Tee", "Running Shorts", "Running Jacket"),
            "Outdoor|Camping|Tents": ("2-Person Tent", "Backpacking Tent"),
            "Outdoor|Camping|Sleeping Bags": ("Sleeping Bag", "Sleeping Pad"),
            "Outdoor|Hydration": ("Water Bottle", "Hydration Pack"),
        },
        (
            "Lightweight",
            "Breathable",
            "Waterproof",
            "Non-Slip",
            "Recycled",
            "Insulated",
            "Reflective",
            "Ultralight",
            "Quick-Dry",
        ),
        (
            "for training and travel",
            "tested in the Alps",
            "made from recycled fibres",
            "packs small",
            "all-season",
            "sweat wicking",
        ),
        ("Summit", "Flow", "Endure", "Trail Pro", "Core", "Basecamp", "Stride"),
        ("Peakform", "Zenflex", "Stridely", "Northbound", "Aquila", "Kinetiq", "Ridgeway"),
        40.0,
    ),
    Department(
        "Electronics",
        {
            "Audio|Headphones": ("Wireless Headphones", "Earbuds", "Sport Earphones"),
            "Audio|Speakers": ("Bluetooth Speaker", "Smart Speaker"),
            "Phone Accessories|Cases": ("Phone Case", "Screen Protector"),
            "Phone Accessories|Chargers": ("USB-C Charger", "Power Bank", "Wireless Charger"),
            "Computer Accessories|Keyboards": ("Mechanical Keyboard", "Wireless Keyboard"),
            "Computer Accessories|Mice": ("Wireless Mouse", "Trackball", "Mouse Pad"),
        },
        (
            "Noise-Cancelling",
            "Fast-Charging",
            "Slim",
            "Rugged",
            "Ergonomic",
            "RGB",
            "Compact",
            "Long-Battery",
            "Low-Latency",
        ),
        (
            "with a two-year warranty",
            "30-hour battery",
            "USB-C",
            "works with iOS and Android",
            "splash resistant",
            "multi-device pairing",
        ),
        ("Pulse", "Nova", "Volt", "Aero", "Orbit", "Echo", "Flux"),
        ("Sonora", "Voltix", "Klarsound", "Bytewell", "Arcus", "Nimbus Tech", "Gridline"),
        35.0,
    ),
)
REGION_NAMES = ("north", "south", "east", "west", "central", "coastal", "alpine", "island")
EVENT_NAMES = np.array(["view", "click", "cart", "purchase"])
START = 1_672_531_200  # 2023-01-01T00:00:00Z
FUNNEL = np.array([0.7, 1.0, 1.2])  # thresholds of view->click->cart->purchase; fit lowers them
STYLE_DIM = 4
CELLS_PER_CHUNK = 2_000_000  # users x items scored at once; bounds memory for large catalogs


@dataclass(frozen=True)
class SynthConfig:
    """The knobs of the generator; the defaults are the embedded default dataset."""

    users: int = 2000
    items: int = 800
    merchants: int = 5
    regions: int = 4
    events_per_user: float = 12.0
    seed: int = 0
    style_strength: float = 4.0  # weight of the hidden style match in a customer's choice
    complement_rate: float = 0.3  # chance the next pick continues the previous item's line
    taste_drift: float = 0.08  # per-event random-walk step of tastes


@dataclass
class Catalog:
    """Items: visible text and the hidden per-item factors the customers react to."""

    items: pd.DataFrame
    leaf: np.ndarray  # leaf category index per item
    leaf_department: np.ndarray  # department index per leaf
    line: np.ndarray  # brand-line index per item
    line_members: list[np.ndarray]  # items of each line
    style: np.ndarray  # (items, STYLE_DIM) unit vectors, hidden
    popularity: np.ndarray  # hidden log-popularity


def _ids(prefix: str, count: int) -> np.ndarray:
    width = len(str(count))
    return np.array([f"{prefix}{i:0{width}d}" for i in range(1, count + 1)])


def _pick(rng: np.random.Generator, sizes: np.ndarray) -> np.ndarray:
    """One uniform index below each of ``sizes``."""
    return (rng.random(len(sizes)) * sizes).astype(np.int64)


def make_catalog(config: SynthConfig, rng: np.random.Generator) -> Catalog:
    """Draw the catalog: category, brand, line, text, price, merchant and hidden factors."""
    leaves = [
        (d, path, types)
        for d, dept in enumerate(DEPARTMENTS)
        for path, types in dept.leaves.items()
    ]
    leaf_department = np.array([d for d, _, _ in leaves])
    leaf = rng.choice(len(leaves), size=config.items, p=rng.dirichlet(np.full(len(leaves), 5.0)))
    department = leaf_department[leaf]

    # brands per department, 2-3 lines per brand; an item's line is one of its brand's lines
    brands = [(d, brand) for d, dept in enumerate(DEPARTMENTS) for brand in dept.brands]
    lines: list[tuple[int, str]] = []  # (brand index, line name)
    brand_lines: list[np.ndarray] = []
    for b, (d, _) in enumerate(brands):
        names = rng.choice(DEPARTMENTS[d].lines, size=rng.integers(2, 4), replace=False)
        brand_lines.append(np.arange(len(lines), len(lines) + len(names)))
        lines.extend((b, str(name)) for name in names)
    brand_start = np.cumsum([0] + [len(dept.brands) for dept in DEPARTMENTS])
    brand = brand_start[department] + _pick(rng, np.diff(brand_start)[department])
    line = np.array([brand_lines[b][rng.integers(len(brand_lines[b]))] for b in brand])

    texts = [
        _item_text(rng, leaves[leaf[i]], brands[brand[i]][1], lines[line[i]][1])
        for i in range(config.items)
    ]
    base_price = np.array([DEPARTMENTS[d].price for d in department])
    price = np.floor(base_price * rng.lognormal(0.0, 0.45, config.items)) + 0.99

    # merchants own contiguous clusters of leaves; 15% of items sold by someone else
    home = (np.arange(len(leaves)) * config.merchants) // len(leaves)
    merchant = np.where(
        rng.random(config.items) < 0.85, home[leaf], rng.integers(0, config.merchants, config.items)
    )
    style = rng.normal(size=(config.items, STYLE_DIM))
    style /= np.linalg.norm(style, axis=1, keepdims=True)
    items = pd.DataFrame(
        {
            "item_id": _ids("p", config.items),
            "title": [t[0] for t in texts],
            "categories": [f"{DEPARTMENTS[leaves[k][0]].name}|{leaves[k][1]}" for k in leaf],
            "brand": [brands[b][1] for b in brand],
            "description": [t[1] for t in texts],
            "price": np.round(price, 2),
            "merchant_id": _ids("m", config.merchants)[merchant],
        }
    )
    members = [np.flatnonzero(line == k) for k in range(len(lines))]
    return Catalog(
        items, leaf, leaf_department, line, members, style, rng.normal(0.0, 0.8, config.items)
    )


def _item_text(
    rng: np.random.Generator, leaf: tuple[int, str, tuple[str, ...]], brand: str, line: str
) -> tuple[str, str]:
    """(title, description) from brand, line, attribute words and the product type."""
    dept = DEPARTMENTS[leaf[0]]
    kind = leaf[2][rng.integers(len(leaf[2]))]
    first, second = rng.choice(dept.attributes, size=2, replace=False)
    benefit = dept.benefits[rng.integers(len(dept.benefits))]
    title = f"{brand} {line} {first} {kind}"
    description = (
        f"{kind} from the {brand} {line} collection. {first} and {second.lower()}, {benefit}."
    )
    return title, description


def _event_counts(config: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """Events per customer: 1 + negative binomial (heavy tail) with the requested mean."""
    extra = max(config.events_per_user - 1.0, 1e-6)
    counts = 1 + rng.negative_binomial(2, 2.0 / (2.0 + extra), size=config.users)
    return np.minimum(counts, config.items)


def _complement(rng: np.random.Generator, catalog: Catalog, previous: int, seen: np.ndarray) -> int:
    """An unseen item of the previous item's line, preferring another category; -1 if none."""
    members = catalog.line_members[catalog.line[previous]]
    members = members[~seen[members]]
    other = members[catalog.leaf[members] != catalog.leaf[previous]]
    pool = other if len(other) else members
    return int(pool[rng.integers(len(pool))]) if len(pool) else -1


def _simulate_chunk(
    config: SynthConfig,
    catalog: Catalog,
    rng: np.random.Generator,
    taste: np.ndarray,
    style: np.ndarray,
    counts: np.ndarray,
) -> tuple[np.ndarray, ...]:
    """Walk a chunk of customers forward event by event; returns (user, step, item, depth, gap)."""
    users, num_items = len(counts), len(catalog.popularity)
    seen = np.zeros((users, num_items), dtype=bool)
    previous = np.full(users, -1)
    out: list[tuple[np.ndarray, ...]] = []
    for step in range(int(counts.max())):
        active = np.flatnonzero(counts > step)
        scores = (
            taste[active][:, catalog.leaf] + style[active] @ catalog.style.T + catalog.popularity
        )
        spread = (scores.mean(axis=1), scores.std(axis=1) + 1e-9)
        open_scores = np.where(seen[active], -np.inf, scores)
        weights = np.exp(open_scores - open_scores.max(axis=1, keepdims=True))
        cumulative = np.cumsum(weights, axis=1)
        draw = (1.0 - rng.random(len(active))) * cumulative[:, -1]  # in (0, total]
        chosen = np.minimum((cumulative < draw[:, None]).sum(axis=1), num_items - 1)
        habit = (previous[active] >= 0) & (rng.random(len(active)) < config.complement_rate)
        for row in np.flatnonzero(habit):
            pick = _complement(rng, catalog, previous[active[row]], seen[active[row]])
            habit[row] = pick >= 0
            chosen[row] = pick if pick >= 0 else chosen[row]
        fit = (scores[np.arange(len(active)), chosen] - spread[0]) / spread[1]
        deeper = rng.random((len(active), 3)) < 1.0 / (1.0 + np.exp(FUNNEL - 0.5 * fit[:, None]))
        depth = np.cumprod(deeper, axis=1).sum(axis=1)
        gap = np.where(
            habit | (rng.random(len(active)) < 0.4),
            20 + rng.exponential(300.0, len(active)),  # same session
            3600 + rng.exponential(3 * 86400.0, len(active)),
        )  # a later visit
        out.append((active, np.full(len(active), step), chosen, depth, gap.astype(np.int64)))
        seen[active, chosen] = True
        previous[active] = chosen
        taste[active] += rng.normal(0.0, config.taste_drift, (len(active), taste.shape[1]))
        style[active] += rng.normal(0.0, config.taste_drift, (len(active), STYLE_DIM))
    return tuple(np.concatenate(parts) for parts in zip(*out, strict=True))


def generate(config: SynthConfig = SynthConfig()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The (interactions, items) tables of the synthetic marketplace for ``config``."""
    rng = np.random.default_rng(config.seed)
    catalog = make_catalog(config, rng)
    num_leaves = len(catalog.leaf_department)
    region_bias = rng.normal(0.0, 0.7, (config.regions, num_leaves))
    region = rng.choice(config.regions, config.users, p=rng.dirichlet(np.full(config.regions, 4.0)))
    department_taste = rng.normal(0.0, 1.5, (config.users, len(DEPARTMENTS)))
    taste = (
        department_taste[:, catalog.leaf_department]
        + region_bias[region]
        + rng.normal(0.0, 1.0, (config.users, num_leaves))
    )
    style = rng.normal(size=(config.users, STYLE_DIM))
    style *= config.style_strength / np.linalg.norm(style, axis=1, keepdims=True)
    counts = _event_counts(config, rng)
    start = START + rng.integers(0, 300 * 86400, config.users)

    chunk = max(1, CELLS_PER_CHUNK // config.items)
    bounds = list(range(0, config.users, chunk))
    parts = []
    for lo in progress_bar(bounds, "synthesising customers", disable=len(bounds) < 2):
        span = slice(lo, lo + chunk)
        user, step, item, depth, gap = _simulate_chunk(
            config, catalog, rng, taste[span], style[span], counts[span]
        )
        parts.append((user + lo, step, item, depth, gap))
    user, step, item, depth, gap = (np.concatenate(p) for p in zip(*parts, strict=True))

    order = np.lexsort((step, user))
    user, step, item, depth, gap = user[order], step[order], item[order], depth[order], gap[order]
    gap[step == 0] = 0
    first = np.searchsorted(user, user)  # row of each user's first event (sorted by user)
    elapsed = np.cumsum(gap)
    timestamp = start[user] + elapsed - elapsed[first]
    items = catalog.items
    interactions = pd.DataFrame(
        {
            "user_id": _ids("u", config.users)[user],
            "item_id": items["item_id"].to_numpy()[item],
            "timestamp": timestamp,
            "event": EVENT_NAMES[depth],
            "merchant_id": items["merchant_id"].to_numpy()[item],
            "region": region_names(config.regions)[region[user]],
        }
    )
    return interactions, items


def region_names(count: int) -> np.ndarray:
    """Readable region names; beyond the named ones, ``region-9`` and so on."""
    return np.array(
        [REGION_NAMES[r] if r < len(REGION_NAMES) else f"region-{r + 1}" for r in range(count)]
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SynthConfig()
    parser.add_argument("out", type=Path, help="dataset directory to write")
    parser.add_argument(
        "--users",
        type=positive(int),
        default=defaults.users,
        help="number of customers (default %(default)s)",
    )
    parser.add_argument(
        "--items",
        type=positive(int),
        default=defaults.items,
        help="number of products (default %(default)s)",
    )
    parser.add_argument(
        "--merchants",
        type=positive(int),
        default=defaults.merchants,
        help="number of merchants owning the products (default %(default)s)",
    )
    parser.add_argument(
        "--regions",
        type=positive(int),
        default=defaults.regions,
        help="number of customer home regions (default %(default)s)",
    )
    parser.add_argument(
        "--events-per-user",
        type=positive(float),
        default=defaults.events_per_user,
        help="mean events per customer (default %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="random seed; the same seed writes the same files (default %(default)s)",
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT")


def run(args: argparse.Namespace) -> int:
    began = time.perf_counter()
    config = SynthConfig(
        users=args.users,
        items=args.items,
        merchants=args.merchants,
        regions=args.regions,
        events_per_user=args.events_per_user,
        seed=args.seed,
    )
    interactions, items = generate(config)
    write_dataset(args.out, interactions, items, force=args.force)
    events = interactions["event"].value_counts()
    funnel = ", ".join(f"{name} {events.get(name, 0):,}" for name in EVENT_NAMES)
    print(
        f"wrote {args.out}: {config.users:,} users, {config.items:,} items, "
        f"{len(interactions):,} events ({funnel}), {config.merchants} merchants, "
        f"{config.regions} regions, seed {config.seed}, "
        f"{time.perf_counter() - began:.1f} s"
    )
    return 0
