"""Fine-tuning the text tower's top layers (shared/recommender/finetune.py): pairs, loss, what
changes, the cache, and the run outputs that carry the tuned encoder."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, cli_settings
from transformers import AutoModel

from shared.data.dataset import leave_one_out, load_dataset
from shared.recommender.artifacts import read_text_model, save_model
from shared.recommender.finetune import (
    FEDERATED_ENCODER_IDLE_S,
    FEDERATED_ENCODERS_KEPT,
    FrozenPrefix,
    consecutive_pairs,
    contrastive_loss,
    federated_encoders_dir,
    finetune_encoder,
    prune_federated_encoders,
    top_layers,
    tuned_checkpoint,
)
from shared.recommender.model import FusionRecommender, ModelConfig
from shared.recommender.text import (
    EmbeddingCache,
    TextEncoder,
    embed_texts,
    item_texts,
    model_fingerprint,
)
from simulations.cli import main


def test_pairs_are_consecutive_distinct_products() -> None:
    pairs = consecutive_pairs([np.array([1, 2, 2, 3]), np.array([7]), np.array([4, 5])])
    assert pairs.tolist() == [[1, 2], [2, 3], [4, 5]]


def test_loss_rewards_matching_pairs_and_ignores_repeated_products() -> None:
    torch.manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    pairs = np.array([[0, 10], [1, 11], [2, 12], [3, 13], [4, 14], [5, 15]])
    matched = contrastive_loss(vectors, vectors, pairs)
    shuffled = contrastive_loss(vectors, vectors.roll(1, 0), pairs)
    assert matched < shuffled
    # the same positive twice: its copy must not count as a negative
    repeated = np.array([[0, 10], [1, 10], [2, 12], [3, 13], [4, 14], [5, 15]])
    twice = torch.cat([vectors[:1], vectors[:1], vectors[2:]])
    masked = contrastive_loss(twice, twice, repeated)
    unmasked = torch.nn.functional.cross_entropy(twice @ twice.T / 0.05, torch.arange(6))
    assert torch.isfinite(masked) and masked < unmasked


@pytest.mark.parametrize("layers", [1, 2])
def test_top_layers_on_stored_frozen_states_give_the_encoders_embeddings(
    tiny_bert_dir: Path, synth_dataset_dir: Path, layers: int
) -> None:
    texts = item_texts(load_dataset(synth_dataset_dir).items.head(40))
    encoder = TextEncoder(str(tiny_bert_dir))
    items = np.array([3, 17, 3, 25, 0, 39, 8])
    prefix = FrozenPrefix(encoder, texts, items, layers)
    assert sorted(prefix.states) == [0, 3, 8, 17, 25, 39]
    assert len(encoder.model.encoder.layer) == 2  # the model is whole again
    with torch.no_grad():
        expected = encoder.embed([texts[i] for i in items])
        got = prefix.embed(items)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # a text of another length in the same batch changes nothing (padding is masked)
    with torch.no_grad():
        torch.testing.assert_close(prefix.embed(items[:2]), got[:2], atol=1e-5, rtol=1e-5)
    # packed, each row's items in one sequence (rows of texts of unequal total length, so
    # the shorter row pads): the same embeddings, item by item
    rows = np.array([[3, 17, 3], [25, 0, 39], [8, 8, 8]])
    with torch.no_grad():
        packed = prefix.embed_packed(rows)
        for row, vectors in zip(rows, packed, strict=True):
            torch.testing.assert_close(vectors, prefix.embed(row), atol=1e-5, rtol=1e-5)
    encoder.model.config.model_type = "deberta-v2"  # positions inside its layers: refused
    with pytest.raises(ValueError, match="exact only for bert, roberta encoders"):
        prefix.embed_packed(rows)


def test_only_the_top_layers_change_and_the_result_is_cached(
    tiny_bert_dir: Path, synth_dataset_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path / "cache"))
    dataset = load_dataset(synth_dataset_dir)
    histories = leave_one_out(dataset).training_histories()
    tuned = finetune_encoder(
        dataset.items, histories, str(tiny_bert_dir), layers=1, steps=4, show_progress=False
    )
    report = json.loads((tuned / "finetune.json").read_text())
    assert report["layers"] == 1 and report["steps"] == 4 and report["seconds_per_step"] > 0
    before = AutoModel.from_pretrained(tiny_bert_dir).state_dict()
    after = AutoModel.from_pretrained(tuned).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("encoder.layer.1.") for k in changed)
    texts = item_texts(dataset.items.head(8))
    assert not np.allclose(
        TextEncoder(str(tiny_bert_dir)).encode(texts, show_progress=False),
        TextEncoder(str(tuned)).encode(texts, show_progress=False),
    )
    stamp = (tuned / "model.safetensors").stat().st_mtime_ns
    again = finetune_encoder(
        dataset.items, histories, str(tiny_bert_dir), layers=1, steps=4, show_progress=False
    )
    assert again == tuned and (tuned / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="between 1 and 2"):
        finetune_encoder(
            dataset.items, histories, str(tiny_bert_dir), layers=3, steps=1, show_progress=False
        )


def test_a_federations_checkpoints_are_kept_for_the_last_few_used_with_their_embeddings(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """Every federated encoder round a run ends with builds a checkpoint at each node and its
    catalog's embeddings, keyed by the weights: an operator running run after run grew a
    node's disk without bound. Only the last few used are kept, with their embeddings; one
    asked for moments ago (which another process may be reading) never goes, and neither do
    the embeddings of another model."""
    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path / "cache"))
    layers = top_layers(TextEncoder(str(tiny_bert_dir)), 1)
    texts = ["a red lipstick", "shampoo for dry hair"]
    embed_texts(texts, str(tiny_bert_dir), show_progress=False)  # the base's: never pruned
    built = []
    for shift in range(FEDERATED_ENCODERS_KEPT + 2):
        tuned = tuned_checkpoint(str(tiny_bert_dir), {k: v + shift for k, v in layers.items()}, 1)
        embed_texts(texts, str(tuned), show_progress=False)
        built.append((tuned, model_fingerprint(tuned)))
    assert all(path.exists() for path, _ in built)  # each in use moments ago: all kept
    long_ago = time.time() - FEDERATED_ENCODER_IDLE_S - 60
    for age, (path, _) in enumerate(built):  # the first built is the least recently used
        os.utime(path, (long_ago - 100 + age, long_ago - 100 + age))
    staging = federated_encoders_dir() / "0123456789abcdef.999.partial"  # a killed writer's
    staging.mkdir()
    os.utime(staging, (long_ago, long_ago))
    assert (
        tuned_checkpoint(str(tiny_bert_dir), {k: v + 1 for k, v in layers.items()}, 1)
        == (built[1][0])
    )  # asked for again: used now, kept
    removed = prune_federated_encoders()
    assert sorted(removed) == sorted([built[0][0].name, built[2][0].name, staging.name[:16]])
    kept = [built[1], *built[3:]]
    assert sorted(p.name for p in federated_encoders_dir().iterdir() if p.is_dir()) == sorted(
        path.name for path, _ in kept
    )
    cache = EmbeddingCache()
    for path, fingerprint in built:
        assert len(cache.get(fingerprint, texts)) == (2 if (path, fingerprint) in kept else 0)
    assert len(cache.get(model_fingerprint(tiny_bert_dir), texts)) == 2
    assert prune_federated_encoders() == []  # the kept are the last used
    assert (tuned_checkpoint(str(tiny_bert_dir), layers, 1) / "config.json").exists()  # rebuilt


def test_a_new_federated_encoder_beyond_the_most_recently_used_is_refused(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """A server sending new layers in every message made a node keep a checkpoint per message
    for the idle time: beyond FEDERATED_ENCODERS_MAX recently used, a new one is refused
    (nothing written) until older ones fall idle and are pruned."""
    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path / "cache"))
    most = FEDERATED_ENCODERS_KEPT + 1
    monkeypatch.setattr("shared.recommender.finetune.FEDERATED_ENCODERS_MAX", most)
    layers = top_layers(TextEncoder(str(tiny_bert_dir)), 1)

    def tuned(shift: int) -> Path:
        return tuned_checkpoint(str(tiny_bert_dir), {k: v + shift for k, v in layers.items()}, 1)

    built = [tuned(shift) for shift in range(most)]
    with pytest.raises(ValueError, match=f"at most {most}"):
        tuned(most)
    assert sorted(p.name for p in federated_encoders_dir().iterdir() if p.is_dir()) == sorted(
        path.name for path in built
    )
    assert tuned(0) == built[0]  # one held already is served
    long_ago = time.time() - FEDERATED_ENCODER_IDLE_S - 60
    for path in built:
        os.utime(path, (long_ago, long_ago))
    assert (tuned(most) / "config.json").exists()  # the idle surplus pruned first


@pytest.mark.e2e
def test_train_ships_the_tuned_encoder_with_the_model(
    tiny_bert_dir: Path, tiny_synth_dataset_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    settings = [
        *TINY,
        *cli_settings(
            {"text_model": tiny_bert_dir, "text_finetune_layers": 1, "text_finetune_steps": 3}
        ),
    ]
    assert (
        main(
            [
                "train",
                "--data",
                str(tiny_synth_dataset_dir),
                "--out",
                str(out),
                "--epochs",
                "1",
                *settings,
            ]
        )
        == 0
    )
    encoder = read_text_model(out / "model")
    assert Path(encoder) == out / "model" / "text-encoder"
    assert (Path(encoder) / "finetune.json").exists()
    assert TextEncoder(encoder).dim == 32
    with pytest.raises(SystemExit, match="fedrec train --dp does not tune it"):
        main(
            [
                "train",
                "--data",
                str(tiny_synth_dataset_dir),
                "--out",
                str(tmp_path / "dp"),
                "--dp",
                *settings,
            ]
        )


def test_a_checkpoint_another_process_finishes_removing_is_skipped_not_raised(
    tmp_path: Path, monkeypatch
) -> None:
    """Processes prune one after another under the lock, but each removes what it moved aside
    outside it: a second pruning lists the first's ``.removing`` (idle as long as the checkpoint
    was), which may be gone by the time it renames it. It raised FileNotFoundError from
    ``tuned_checkpoint`` (at a node: an error instead of an answer)."""
    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path / "cache"))
    directory = federated_encoders_dir()
    directory.mkdir(parents=True)
    aside = directory / "0123456789abcdef.4242.removing"  # process 4242 is removing it
    aside.mkdir()
    long_ago = time.time() - FEDERATED_ENCODER_IDLE_S - 60
    os.utime(aside, (long_ago, long_ago))
    rename = Path.rename

    def finished_first(path: Path, target: Path) -> Path:
        if path == aside:  # 4242's rmtree ends between the listing and the rename
            shutil.rmtree(aside)
        return rename(path, target)

    monkeypatch.setattr(Path, "rename", finished_first)
    assert prune_federated_encoders() == []
    assert [p.name for p in directory.iterdir()] == [".lock"]  # nothing else left


def test_a_model_is_never_saved_naming_a_pruned_federated_encoder(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """A server marks its run's tuned checkpoint used when its rounds start; other runs on the
    machine may prune it while they go on. Saving the model then wrote a config.json naming
    the vanished cache directory, silently: the model could never be served or audited."""
    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path / "cache"))
    layers = top_layers(TextEncoder(str(tiny_bert_dir)), 1)
    runs = tuned_checkpoint(str(tiny_bert_dir), layers, 1)
    long_ago = time.time() - FEDERATED_ENCODER_IDLE_S - 60
    os.utime(runs, (long_ago, long_ago))  # its rounds take longer than the idle time
    for shift in range(1, FEDERATED_ENCODERS_KEPT + 1):  # other runs' meanwhile
        tuned_checkpoint(str(tiny_bert_dir), {k: v + shift for k, v in layers.items()}, 1)
    assert not runs.exists()
    config = ModelConfig(num_items=40, text_dim=32, dim=8, layers=1, max_len=10)
    model = FusionRecommender(config, torch.randn(40, 32))
    with pytest.raises(FileNotFoundError, match="no longer in the cache"):
        save_model(tmp_path / "model", model, np.arange(40), str(runs), "# card\n")
    assert not (tmp_path / "model").exists()
    rebuilt = tuned_checkpoint(str(tiny_bert_dir), layers, 1)  # what the server does first
    save_model(tmp_path / "model", model, np.arange(40), str(rebuilt), "# card\n")
    assert read_text_model(tmp_path / "model") == str(tmp_path / "model" / "text-encoder")
