"""Benchmark domains built from the real recordings: mixing, manifest, rebuild, labels, spec errors."""

from __future__ import annotations

import argparse
import json
import math
import pathlib

import numpy as np
import pytest

from dawnchorus.evaluation import cli, domains
from dawnchorus.evaluation.domains import DomainSpecError

_SMALL_SPEC = """
name = "small"
seed = 7

[site]
latitude = 37.88
longitude = -122.24
week = 15

[[focal]]
format = "phoebe"
path = "focal/phoebe"

[[background]]
path = "backgrounds/park-no-bird"
kind = "park"

[[background]]
path = "soundscapes/maad-24h"
night_hours = [23, 1]
kind = "night"

[mixing]
windows = 30
event_count_weights = [0.15, 0.45, 0.28, 0.12]
snr_db = [-12.0, 6.0]

[screening]
hop_seconds = 3.0
"""


def _repo_spec(name: str) -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "domains" / name


@pytest.fixture(scope="module")
def small_domain(data_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("domains")
    spec_path = cache / "small.toml"
    spec_path.write_text(_SMALL_SPEC)
    domain = domains.load_domain(spec_path, cache, data_dir)
    return domain, domains.read_manifest(cache / "small"), cache


def test_mixed_window_count(small_domain):
    domain, manifest, _ = small_domain
    assert len(manifest) == 30
    assert domain.embeddings.shape == (30, 1024)
    assert domain.labels.shape == (30, len(domain.classes))


def test_mixed_rebuild_bit_exact(small_domain, data_dir):
    _, manifest, _ = small_domain
    for entry in manifest[:4]:
        first = domains.rebuild_window(entry, data_dir)
        second = domains.rebuild_window(json.loads(json.dumps(entry)), data_dir)
        assert first.shape == (144_000,)
        assert first.dtype == np.float32
        assert np.array_equal(first, second)


def test_rebuild_matches_embeddings(small_domain, data_dir):
    domain, manifest, _ = small_domain
    from dawnchorus.models.backbone import Backbone, load_source_model

    backbone = Backbone(load_source_model().backbone)
    embedding = backbone.embed(domains.rebuild_window(manifest[0], data_dir)[None])[0]
    assert np.allclose(embedding, domain.embeddings[0], atol=1e-4)


def test_labels_match_events(small_domain):
    domain, manifest, _ = small_domain
    for i, entry in enumerate(manifest):
        expected = {event["label"] for event in entry["events"]}
        assert set(entry["labels"]) == expected
        assert {domain.classes[k] for k in np.flatnonzero(domain.labels[i])} == expected


def test_focal_species_are_classes(small_domain):
    domain, manifest, _ = small_domain
    labeled = {label for entry in manifest for label in entry["labels"]}
    assert labeled <= set(domain.classes)


def test_bird_free_share(small_domain):
    domain, _, _ = small_domain
    assert 0 < domain.bird_free.sum() <= 12


def test_snr_within_range(small_domain):
    domain, manifest, _ = small_domain
    with_events = ~domain.bird_free
    assert np.all(domain.snr_db[with_events] >= -12.0)
    assert np.all(domain.snr_db[with_events] <= 6.0)
    assert np.all(np.isnan(domain.snr_db[domain.bird_free]))


def test_snr_measured_on_audio(small_domain, data_dir):
    _, manifest, _ = small_domain
    entry = next(e for e in manifest if len(e["events"]) == 1)
    event = entry["events"][0]
    alone = dict(entry, events=[])
    background = domains.rebuild_window(alone, data_dir).astype(np.float64)
    mixed = domains.rebuild_window(entry, data_dir).astype(np.float64)
    start, stop = event["position_samples"], event["position_samples"] + event["length_samples"]
    event_rms = np.sqrt(np.mean((mixed - background)[start:stop] ** 2))
    background_rms = np.sqrt(np.mean(background ** 2))
    assert 20 * math.log10(event_rms / background_rms) == pytest.approx(event["snr_db"], abs=0.01)


def test_window_metadata(small_domain):
    domain, _, _ = small_domain
    assert set(domain.background_kind) <= {"park", "night"}
    assert all(path.startswith(("backgrounds/park-no-bird/", "soundscapes/maad-24h/"))
               for path in domain.background_recording)
    assert domain.window_seconds == 3.0


def test_night_hours_filter(data_dir):
    spec = domains.parse_spec(_SMALL_SPEC)
    files = [b.file for b in domains.list_backgrounds(spec, data_dir) if "maad" in b.file]
    hours = {name.rsplit("_", 1)[1][:2] for name in files}
    assert hours == {"23", "00"}


def test_stats_written(small_domain):
    domain, _, _ = small_domain
    assert "same_background_share" in domain.stats["neighbours"]
    assert domain.stats["screening"]["candidate_windows"] > 0


@pytest.mark.parametrize("change, key", [
    (("week = 15", "week = 60"), "site"),
    (("windows = 30", "windows = 0"), "mixing.windows"),
    (("snr_db = [-12.0, 6.0]", "snr_db = [6.0, -12.0]"), "mixing.snr_db"),
    (('format = "phoebe"', 'format = "mp3"'), "focal[0].format"),
    (("hop_seconds = 3.0", "hop_second = 3.0"), "screening.hop_second"),
    (('name = "small"', ""), "name"),
])
def test_spec_error_names_key(change, key):
    with pytest.raises(DomainSpecError) as caught:
        domains.parse_spec(_SMALL_SPEC.replace(*change))
    assert str(caught.value).startswith(key)


def test_survey_windows(data_dir, tmp_path):
    domain = domains.load_domain(_repo_spec("monitor-survey.toml"), tmp_path, data_dir)
    oven = domain.classes.index("Seiurus aurocapilla_Ovenbird")
    btnw = domain.classes.index("Setophaga virens_Black-throated Green Warbler")
    assert domain.embeddings.shape == (8, 1024)
    # BTNW 1.059-2.586 s lies in window 0 only; OVEN 4.209-7.407 s starts window 1.
    assert domain.labels[0, btnw]
    assert not domain.labels[0, oven]
    assert domain.labels[1, oven]
    assert not domain.labels[1, btnw]
    # Window 3 (9-12 s) contains OVEN 7.552-10.702 and BTNW 9.85-11.056.
    assert domain.labels[3, oven]
    assert domain.labels[3, btnw]
    # Window 6 (18-21 s) touches OVEN 20.698-23.366 by 0.3 s of 2.67 s, below a quarter.
    assert domain.bird_free[6]
    assert domain.labels[7, oven]
    assert domain.labels[7, btnw]


def test_raven_table_parsing(tmp_path):
    table = tmp_path / "selections.txt"
    table.write_text(
        "Selection\tView\tChannel\tBegin Time (s)\tEnd Time (s)\tLow Freq (Hz)\tHigh Freq (Hz)\tSpecies\n"
        "1\tSpectrogram 1\t1\t0.50\t1.70\t2000\t6000\tOVEN\n"
        "2\tSpectrogram 1\t1\t2.90\t3.40\t3000\t7000\tBTNW\n"
        "3\tSpectrogram 1\t1\t4.00\t4.50\t3000\t7000\tNOISE\n"
    )
    boxes = domains.read_annotations(table, "raven", "Begin Time (s)", "End Time (s)", "Species")
    codes = {"OVEN": "Seiurus aurocapilla_Ovenbird", "BTNW": "Setophaga virens_Black-throated Green Warbler"}
    labels = domains.label_windows(boxes, codes, 2, 0.25)
    assert len(boxes) == 3
    assert boxes[1].start == 2.9
    assert boxes[1].code == "BTNW"
    # BTNW 2.9-3.4 s: 0.1 s in window 0 (a fifth of the box), 0.4 s in window 1.
    assert labels[0] == ["Seiurus aurocapilla_Ovenbird"]
    assert labels[1] == ["Setophaga virens_Black-throated Green Warbler"]


def test_annotation_missing_column(tmp_path):
    table = tmp_path / "selections.txt"
    table.write_text("Begin Time (s)\tEnd Time (s)\n0.5\t1.0\n")
    with pytest.raises(DomainSpecError, match="Species"):
        domains.read_annotations(table, "raven", "Begin Time (s)", "End Time (s)", "Species")


def test_second_build_identical(small_domain, data_dir):
    domain, manifest, cache = small_domain
    folder = domains.build_domain(domains.parse_spec(_SMALL_SPEC), cache, data_dir)
    assert domains.read_manifest(folder) == manifest
    assert len(list(folder.glob("embeddings-*.npy"))) == 1
    assert np.array_equal(np.load(folder / domain.stats["embeddings_file"]), domain.embeddings)


def test_build_command_survey(data_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    cli.add_build_arguments(parser)
    args = parser.parse_args([str(_repo_spec("monitor-survey.toml")), "--cache", str(tmp_path),
                              "--data-root", str(data_dir)])
    assert cli.run_build(args) == 0
    assert "8 windows" in capsys.readouterr().out


def test_build_command_bad_spec(tmp_path, capsys):
    spec = tmp_path / "bad.toml"
    spec.write_text('name = "bad"\nkind = "survey"\n')
    parser = argparse.ArgumentParser()
    cli.add_build_arguments(parser)
    assert cli.run_build(parser.parse_args([str(spec), "--cache", str(tmp_path)])) == 2
    assert "kind" in capsys.readouterr().err
