"""What every run writes : ``metrics.json``, ``recs.csv`` and ``model/``.

``model/`` holds ``model.safetensors`` (the trainable weights), ``config.json`` (architecture,
text model and catalog), ``item_ids.txt`` and ``README.md``, the model card; a fine-tuned text
encoder is copied into ``model/text-encoder/`` so that the folder is complete on its own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.data.errors import DataError
from shared.recommender.finetune import federated_encoders_dir
from shared.recommender.model import FusionRecommender, ModelConfig
from shared.runs.checkpoint import non_finite
from shared.runs.durable import atomic_write, replace_dir

TEXT_ENCODER_DIR = "text-encoder"


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically and durably (temp file, fsync, rename), readable by its owner
    only: a reader never sees half a file, a crash never leaves one."""
    text = json.dumps(payload, indent=2, default=_jsonable) + "\n"
    atomic_write(Path(path), text.encode("utf-8"))


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def save_model(
    directory: Path, model: FusionRecommender, item_ids: np.ndarray, text_model: str, card: str
) -> None:
    """Save weights (safetensors), config, catalog ids and the model card; the directory is
    replaced whole (written aside, synced, swapped in), so a crash never leaves half a model.
    A federation's tuned encoder the cache no longer holds raises FileNotFoundError: the model
    would name a directory that is gone instead of shipping its copy."""
    from safetensors.torch import save_file

    tuned = Path(text_model)
    if tuned.parent == federated_encoders_dir() and not (tuned / "config.json").exists():
        raise FileNotFoundError(
            f"{text_model}: the run's tuned text encoder is no longer in the cache (pruned: "
            "shared/recommender/finetune.py); ask tuned_checkpoint for it again before saving"
        )

    def write(staging: Path) -> None:
        text = text_model
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(staging / "model.safetensors"))
        if text != "minilm" and (Path(text) / "finetune.json").exists():
            shutil.copytree(text, staging / TEXT_ENCODER_DIR)
            text = TEXT_ENCODER_DIR
        write_json(staging / "config.json", {"model": model.config.to_dict(), "text_model": text})
        (staging / "item_ids.txt").write_text("\n".join(map(str, item_ids)) + "\n")
        (staging / "README.md").write_text(card)

    replace_dir(Path(directory), write)


def load_model(directory: Path, text: torch.Tensor, device: str = "cpu") -> FusionRecommender:
    """Rebuild a saved model around the catalog's text embeddings (in item_ids.txt order);
    DataError naming the folder when its files do not make a model (damaged, edited, another
    catalog's) or a weight holds a NaN or an infinity."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / "model.safetensors").exists():
        raise FileNotFoundError(
            f"{directory}: no model.safetensors (is this a run's model/ folder?)"
        )
    settings = read_settings(directory)
    try:
        state = load_file(str(directory / "model.safetensors"), device="cpu")
        model = FusionRecommender.from_state(ModelConfig(**settings["model"]), text, state)
    except (SafetensorError, TypeError, ValueError, RuntimeError) as error:
        raise DataError(directory, f"not a model fedrec can load: {error}"[:500]) from None
    if bad := non_finite(state):
        raise DataError(directory, f"model.safetensors holds NaN or infinity in {bad[:5]}")
    return model.to(device).eval()


def read_settings(directory: Path) -> dict:
    """A saved model's ``config.json``: an object with a ``model`` object and a
    ``text_model`` string; DataError naming the file otherwise."""
    path = Path(directory) / "config.json"
    try:
        settings = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as error:  # not JSON, not UTF-8, nested too deep
        raise DataError(path, f"not valid JSON ({error})"[:300]) from None
    if not (
        isinstance(settings, dict)
        and isinstance(settings.get("model"), dict)
        and isinstance(settings.get("text_model"), str)
    ):
        raise DataError(path, "not a saved model's settings (a 'model' object, a 'text_model')")
    return settings


def read_text_model(directory: Path) -> str:
    """The text encoder a saved model was trained with (its own copy when fine-tuned)."""
    text_model = read_settings(directory)["text_model"]
    return str(Path(directory) / text_model) if text_model == TEXT_ENCODER_DIR else text_model


def read_item_ids(directory: Path) -> list[str]:
    """A saved model's products, in its rows' order; DataError naming the file and line when
    one repeats (the service would answer for one of its rows and never rank the other)."""
    path = Path(directory) / "item_ids.txt"
    item_ids = path.read_text().splitlines()
    first: dict[str, int] = {}
    for line, item in enumerate(item_ids, start=1):
        if item in first:
            raise DataError(path, f"product {item[:80]!r} repeats line {first[item]}", row=line)
        first[item] = line
    return item_ids


def model_card(*, title: str, data: dict, metrics: dict, config: dict, privacy: dict | None) -> str:
    """A model card in plain words: data, quality, and the privacy guarantee (or its absence)."""
    test = metrics.get("test", {})
    lines = [
        f"# {title}",
        "",
        "A fedrec recommender: product text from a pretrained BERT-family encoder "
        f"(`{config.get('text_model')}`) fused with collaborative filtering over item IDs. "
        "It has no per-customer parameters: a customer is represented by their purchase history, "
        "supplied with each request.",
        "",
        "## Data",
        "",
        *[f"- {key}: {value}" for key, value in data.items()],
        "",
        "## Quality (full-catalog leave-one-out test split, history items excluded)",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {name} | {value:.4f} |" for name, value in test.items() if isinstance(value, float)],
        "",
        "## Privacy",
        "",
    ]
    if privacy:
        lines += [privacy["statement"], "", "```json", json.dumps(privacy, indent=2), "```"]
    else:
        lines += [
            "This model was trained WITHOUT differential privacy. It carries no formal privacy "
            "guarantee: its weights may reveal information about the customers whose data "
            "trained it. Do not share it outside the parties allowed to see that data."
        ]
    lines += [
        "",
        "## Training configuration",
        "",
        "```json",
        json.dumps(config, indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)
