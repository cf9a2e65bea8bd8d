"""Species lists, per-species thresholds and sensitivity with the real BirdNET model on a real soundscape."""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from dawnchorus.cli import species_resolver
from dawnchorus.edge import analyze, audio
from dawnchorus.edge.pipeline import InferencePipeline
from dawnchorus.edge.recorder import Recorder, RecorderConfig
from dawnchorus.models import birdnet
from dawnchorus.models.species import (Location, SiteSpecies, SpeciesListError, SpeciesSpec, SpeciesThresholds,
                                       species_from_range_model, threshold_vector)

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
SOUNDSCAPE = DATA / "soundscapes" / "birdnet-example" / "soundscape.flac"
SEATTLE_MAY = Location(47.68, -122.29, 20)
CHICKADEE = "Poecile atricapillus_Black-capped Chickadee"
HOUSE_FINCH = "Haemorhous mexicanus_House Finch"
AMERICAN_ROBIN = "Turdus migratorius_American Robin"
BLACKBIRD = "Turdus merula_Eurasian Blackbird"

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"real recordings not found at {DATA}")


@pytest.fixture(scope="module")
def files() -> birdnet.BirdNetFiles:
    return birdnet.locate_birdnet_files()


@pytest.fixture(scope="module")
def labels(files) -> list[str]:
    return birdnet.read_labels(files.labels)


@pytest.fixture(scope="module")
def classifier():
    return analyze.load_classifier(num_threads=1)


@pytest.fixture(scope="module")
def logits(classifier) -> tuple[list[str], np.ndarray]:
    """The soundscape's logits [40, 6522] from the real model, with the labels."""
    backbone, head = classifier
    pipeline = InferencePipeline(backbone, head, batch_size=4)
    batches = list(pipeline.run(audio.FileSource([SOUNDSCAPE])))
    return head.labels, np.concatenate([batch.logits for batch in batches])


def _analyze(classifier, min_conf: float, sensitivity: float = 1.0, thresholds=None) -> list[analyze.Detection]:
    backbone, head = classifier
    pipeline = InferencePipeline(backbone, head, batch_size=4)
    return analyze.analyze_files(audio.FileSource([SOUNDSCAPE]), pipeline, min_conf, sensitivity,
                                 species_thresholds=thresholds)


def _write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.write_text(text, encoding="utf-8")
    return path


# Sensitivity ------------------------------------------------------------------


def test_sensitivity_follows_birdnet_formula(classifier):
    plain = {(d.start_s, d.label): d.confidence for d in _analyze(classifier, 0.01, 1.0)}
    sharp = {(d.start_s, d.label): d.confidence for d in _analyze(classifier, 0.01, 1.5)}
    compared = 0
    for key, confidence in plain.items():
        if not 0.05 < confidence < 0.95:
            continue
        logit = np.log(confidence / (1.0 - confidence))
        expected = 1.0 / (1.0 + np.exp(-1.5 * logit))
        if expected >= 0.01:
            assert sharp[key] == pytest.approx(expected, abs=1e-9)
            compared += 1
    assert compared >= 10


def test_sensitivity_pushes_confidences_apart(classifier):
    plain = {(d.start_s, d.label): d.confidence for d in _analyze(classifier, 0.01, 1.0)}
    soft = {(d.start_s, d.label): d.confidence for d in _analyze(classifier, 0.01, 0.5)}
    high = [key for key, value in plain.items() if value > 0.6]
    assert high
    assert all(soft[key] < plain[key] for key in high)


# Per-species thresholds -------------------------------------------------------


def test_species_threshold_suppresses_detections(classifier):
    baseline = _analyze(classifier, 0.1)
    chickadee = [d.confidence for d in baseline if d.label == CHICKADEE]
    assert chickadee
    filtered = _analyze(classifier, 0.1, thresholds={CHICKADEE: max(chickadee) + 1e-6})
    assert not [d for d in filtered if d.label == CHICKADEE]
    assert [d for d in filtered if d.label != CHICKADEE] == [d for d in baseline if d.label != CHICKADEE]


def test_species_threshold_below_min_conf_keeps_more(classifier):
    baseline = _analyze(classifier, 0.5)
    lowered = _analyze(classifier, 0.5, thresholds={HOUSE_FINCH: 0.05})
    finches = [d for d in lowered if d.label == HOUSE_FINCH]
    assert len(finches) > len([d for d in baseline if d.label == HOUSE_FINCH])
    assert min(d.confidence for d in finches) < 0.5
    assert [d for d in lowered if d.label != HOUSE_FINCH] == [d for d in baseline if d.label != HOUSE_FINCH]


def test_recorder_applies_species_thresholds(classifier, tmp_path):
    backbone, head = classifier
    batch = next(InferencePipeline(backbone, head, batch_size=8).run(audio.FileSource([SOUNDSCAPE])))
    counts = {}
    for name, thresholds in (("plain", {}), ("strict", {CHICKADEE: 1.0})):
        config = RecorderConfig(device=f"rec-{name}", site="s", state_dir=tmp_path, min_conf=0.3,
                                species_thresholds=thresholds)
        recorder = Recorder(config, backbone, head, [])
        recorder._handle_batch(batch)
        counts[name] = recorder.counters["detections"]
    chickadee_windows = int((1 / (1 + np.exp(-batch.logits[:, head.labels.index(CHICKADEE)])) >= 0.3).sum())
    assert chickadee_windows >= 1
    assert counts["strict"] == counts["plain"] - chickadee_windows


def test_threshold_vector_uses_min_conf_elsewhere():
    vector = threshold_vector([CHICKADEE, HOUSE_FINCH], 0.7, {HOUSE_FINCH: 0.4})
    assert vector.tolist() == [0.7, 0.4]


def test_thresholds_file_scientific_and_full_names(tmp_path, labels):
    path = _write(tmp_path / "t.txt", f"# stricter for chickadees\n{CHICKADEE},0.9\nHaemorhous mexicanus, 0.4\n\n")
    resolved = SpeciesThresholds.from_file(path).resolve(labels)
    assert resolved == {CHICKADEE: 0.9, HOUSE_FINCH: 0.4}


def test_thresholds_file_bad_line_names_line(tmp_path):
    path = _write(tmp_path / "t.txt", "Turdus merula,0.8\nTurdus migratorius 0.8\n")
    with pytest.raises(SpeciesListError, match=r"t.txt, line 2: 'Turdus migratorius 0.8' is not NAME,THRESHOLD"):
        SpeciesThresholds.from_file(path)


def test_thresholds_file_out_of_range(tmp_path):
    path = _write(tmp_path / "t.txt", "Turdus merula,1.2\n")
    with pytest.raises(SpeciesListError, match=r"threshold 1.2 of 'Turdus merula' is invalid"):
        SpeciesThresholds.from_file(path)


def test_thresholds_unknown_species_rejected(tmp_path, labels):
    path = _write(tmp_path / "t.txt", "Turdus merula,0.8\nDodo bird,0.5\n")
    with pytest.raises(SpeciesListError, match="Dodo bird"):
        SpeciesThresholds.from_file(path).resolve(labels)


def test_thresholds_missing_file(tmp_path):
    with pytest.raises(SpeciesListError, match="cannot read species thresholds file"):
        SpeciesThresholds.from_file(tmp_path / "none.txt")


def test_analyze_species_thresholds_option(tmp_path):
    thresholds = _write(tmp_path / "t.txt", "Poecile atricapillus,1.0\n")
    out = tmp_path / "out.csv"
    result = subprocess.run([sys.executable, "-m", "dawnchorus", "analyze", str(SOUNDSCAPE), "--out", str(out),
                             "--species-thresholds", str(thresholds)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert "House Finch" in text
    assert "Black-capped Chickadee" not in text


def test_analyze_bad_thresholds_file_exit_2(tmp_path):
    thresholds = _write(tmp_path / "t.txt", "Poecile atricapillus;0.5\n")
    result = subprocess.run([sys.executable, "-m", "dawnchorus", "analyze", str(SOUNDSCAPE), "--out",
                             str(tmp_path / "out.csv"), "--species-thresholds", str(thresholds)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "line 1" in result.stderr


# Species lists ----------------------------------------------------------------


def test_range_model_seattle_in_may_is_plausible(files, labels):
    species = species_from_range_model(files.range_model, labels, SEATTLE_MAY)
    assert 100 <= len(species) <= 400
    for expected in (AMERICAN_ROBIN, CHICKADEE, HOUSE_FINCH, "Cyanocitta stelleri_Steller's Jay"):
        assert expected in species
    for absent in (BLACKBIRD, "Aptenodytes forsteri_Emperor Penguin", "Struthio camelus_Common Ostrich"):
        assert absent not in species


def test_range_model_europe_has_blackbird_not_robin(files, labels):
    species = species_from_range_model(files.range_model, labels, Location(52.52, 13.40, 20))
    assert BLACKBIRD in species
    assert AMERICAN_ROBIN not in species


def test_include_file_adds_to_range_list(files, labels, tmp_path):
    _write(tmp_path / "extra.txt", "Turdus merula\n")
    spec = SpeciesSpec.parse(f"47.68,-122.29,20+@{tmp_path}/extra.txt")
    species = spec.resolve(labels, files.range_model)
    range_only = SpeciesSpec(SEATTLE_MAY).resolve(labels, files.range_model)
    assert set(species) == set(range_only) | {BLACKBIRD}
    assert species == [label for label in labels if label in species]


def test_exclude_file_removes_and_wins(files, labels, tmp_path):
    _write(tmp_path / "never.txt", "# confused with wind\nTurdus migratorius\nTurdus merula\n")
    _write(tmp_path / "extra.txt", "Turdus merula\n")
    spec = SpeciesSpec.parse(f"47.68,-122.29,20+@{tmp_path}/extra.txt-@{tmp_path}/never.txt")
    species = spec.resolve(labels, files.range_model)
    assert AMERICAN_ROBIN not in species
    assert BLACKBIRD not in species
    assert CHICKADEE in species


def test_file_base_is_exact_list(labels, tmp_path):
    _write(tmp_path / "site.txt", f"{HOUSE_FINCH}\nPoecile atricapillus\n")
    species = SpeciesSpec.parse(f"@{tmp_path}/site.txt").resolve(labels, None)
    assert species == sorted([CHICKADEE, HOUSE_FINCH], key=labels.index)


def test_exclude_everything_rejected(labels, tmp_path):
    _write(tmp_path / "site.txt", "Poecile atricapillus\n")
    spec = SpeciesSpec.parse(f"@{tmp_path}/site.txt-@{tmp_path}/site.txt")
    with pytest.raises(SpeciesListError, match="leaves no species"):
        spec.resolve(labels, None)


def test_missing_species_file_named(labels, tmp_path):
    with pytest.raises(SpeciesListError, match=r"cannot read species file .*none.txt"):
        SpeciesSpec.parse(f"all-@{tmp_path}/none.txt").resolve(labels, None)


def test_unknown_species_in_file_named(labels, tmp_path):
    _write(tmp_path / "site.txt", "Poecile atricapillus\nNot a bird\n")
    with pytest.raises(SpeciesListError, match="Not a bird"):
        SpeciesSpec.parse(f"@{tmp_path}/site.txt").resolve(labels, None)


def test_location_without_range_model_rejected(labels):
    with pytest.raises(SpeciesListError, match="a location needs BirdNET's range model"):
        SpeciesSpec(SEATTLE_MAY).resolve(labels, None)


@pytest.mark.parametrize("text, message", [
    ("north", "expected LAT,LON[,WEEK], @FILE or all"),
    ("47.6,east", "latitude and longitude must be numbers"),
    ("95,10", "latitude 95.0 is outside -90 to 90"),
    ("47.6,-122.3,53", "week 53 must be 1 to 48"),
    ("all-@", "-@ needs a file name"),
])
def test_invalid_spec_explains(text, message):
    with pytest.raises(SpeciesListError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SpeciesSpec.parse(text)


def test_spec_text_round_trips():
    text = "47.68,-122.29,20+@extra.txt-@never.txt"
    assert SpeciesSpec.parse(text).format() == text
    assert SpeciesSpec.parse(SpeciesSpec.parse(text).format()) == SpeciesSpec.parse(text)


def test_base_station_resolves_site_lists(files, labels, tmp_path):
    _write(tmp_path / "meadow.txt", "Turdus merula\n")
    args = argparse.Namespace(
        site_species=[SiteSpecies.parse("forest-a=47.68,-122.29,20"), SiteSpecies.parse(f"meadow=@{tmp_path}/meadow.txt"),
                      SiteSpecies.parse(f"forest-a=47.68,-122.29,20-@{tmp_path}/meadow.txt")],
        default_species=SpeciesSpec.parse(f"all-@{tmp_path}/meadow.txt"), range_threshold=None)
    species_for_site = species_resolver(args, labels, files.range_model)
    assert species_for_site("meadow") == [BLACKBIRD]
    assert AMERICAN_ROBIN in species_for_site("forest-a")
    assert len(species_for_site("elsewhere")) == len(labels) - 1


def test_recorder_and_station_agree_on_site_list(files, labels, tmp_path):
    """The recorder's --species and the base station's --site-species give the same class list."""
    from dawnchorus.cli import build_parser, recorder_species
    from dawnchorus.models.backbone import load_source_model

    _write(tmp_path / "never.txt", "Turdus migratorius\n")
    spec = f"47.68,-122.29,20-@{tmp_path}/never.txt"
    edge_args = build_parser().parse_args(["edge", "run", "--device", "r", "--site", "s", "--species", spec])
    _, recorder_labels, _ = recorder_species(edge_args, load_source_model())
    server_args = build_parser().parse_args(["server", "run", "--site-species", f"s={spec}"])
    assert recorder_labels == species_resolver(server_args, labels, files.range_model)("s")


def test_analyze_thresholds_outside_species_list_ignored(tmp_path):
    species = _write(tmp_path / "species.txt", "Poecile atricapillus\n")
    thresholds = _write(tmp_path / "t.txt", "Haemorhous mexicanus,0.2\n")
    out = tmp_path / "out.csv"
    result = subprocess.run([sys.executable, "-m", "dawnchorus", "analyze", str(SOUNDSCAPE), "--out", str(out),
                             "--species-file", str(species), "--species-thresholds", str(thresholds)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "House Finch" not in out.read_text()
    assert "Black-capped Chickadee" in out.read_text()


def test_demo_applies_species_thresholds(mosquitto, tmp_path):
    """The demo's recorders drop a species whose threshold no score reaches, and keep the others."""
    import json

    thresholds = _write(tmp_path / "t.txt", f"{CHICKADEE},1.0\n")
    summary_path = tmp_path / "summary.json"
    result = subprocess.run(
        [sys.executable, "-m", "dawnchorus", "demo", str(SOUNDSCAPE), "--broker", mosquitto.address, "--speed", "0",
         "--min-buffer", "16", "--summary", str(summary_path), "--site-species", "demo=47.68,-122.29,20",
         "--species-thresholds", str(thresholds), "--sensitivity", "1.2"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    detections = json.loads(summary_path.read_text())["detections"]
    assert CHICKADEE not in detections
    assert HOUSE_FINCH in detections
