"""Tests of ``analyze`` against BirdNET V2.4's own scores on a real soundscape."""

from __future__ import annotations

import argparse
import csv
import json
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest
import soundfile

from dawnchorus.edge import analyze, audio
from dawnchorus.edge.pipeline import InferencePipeline
from dawnchorus.models import birdnet
from dawnchorus.models.head import LinearHead

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
EXAMPLE = DATA / "soundscapes" / "birdnet-example"
SOUNDSCAPE = EXAMPLE / "soundscape.flac"
REFERENCE = EXAMPLE / "expected_birdnet_v2.4_scores.csv"
ROBIN_22KHZ = DATA / "focal" / "birdnet-go" / "amerob.wav"

pytestmark = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"real recordings not found at {DATA} (clone shared/ beside the repo)"
)

# Confidences in the reference are float32 sigmoid outputs of BirdNET's full
# model. The split model with a float64 sigmoid agrees with them to about
# 1e-5, and the CSV rounds to 4 decimals.
TOLERANCE = 1e-3

# Reference setting id -> analyze options giving the same inference settings.
SETTINGS = {
    0: [],
    1: ["--min-conf", "0.3"],
    3: ["--overlap", "0.5"],
    4: ["--overlap", "1"],
    5: ["--overlap", "2"],
    6: ["--batch-size", "8"],
    11: ["--sensitivity", "0.5"],
    12: ["--species-file", "{species_file}"],
}


def _reference(setting_id: int) -> tuple[dict, dict[tuple[float, float, str], float]]:
    settings = None
    scores = {}
    with open(REFERENCE, newline="", encoding="utf-8") as stream:
        for row in csv.DictReader(stream):
            if int(row["setting_id"]) != setting_id:
                continue
            settings = json.loads(row["settings_json"])
            key = (float(row["start_s"]), float(row["end_s"]), row["birdnet_label"])
            scores[key] = float(row["confidence"])
    return settings, scores


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    analyze.add_arguments(parser)
    return parser.parse_args([str(arg) for arg in argv])


def _read_rows(path: pathlib.Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _scores(rows: list[dict[str, str]]) -> dict[tuple[float, float, str], float]:
    return {
        (float(r["Start (s)"]), float(r["End (s)"]), f"{r['Scientific name']}_{r['Common name']}"):
        float(r["Confidence"])
        for r in rows
    }


@pytest.mark.parametrize("setting_id", sorted(SETTINGS))
def test_analyze_reproduces_birdnet_reference(tmp_path, setting_id):
    settings, expected = _reference(setting_id)
    species_file = tmp_path / "species.txt"
    species_file.write_text("\n".join(settings["filter_species"] or []) + "\n")
    options = [arg.format(species_file=species_file) for arg in SETTINGS[setting_id]]
    out = tmp_path / "out.csv"

    code = analyze.run(_parse([SOUNDSCAPE, "--out", out, *options]))

    columns, rows = _read_rows(out)
    actual = _scores(rows)
    missing = sorted(key for key in expected if key not in actual)
    differences = {key: abs(actual[key] - expected[key]) for key in expected if key in actual}
    extra = sorted(
        key for key, confidence in actual.items()
        if key not in expected and confidence > settings["min_confidence"] + TOLERANCE
    )
    assert code == 0
    assert columns == list(analyze.CSV_COLUMNS)
    assert len(expected) > 0
    assert missing == []
    assert max(differences.values()) <= TOLERANCE
    assert extra == []


def test_analyze_rows_sorted(tmp_path):
    out = tmp_path / "out.csv"
    # Given in reverse order, so the sort has work to do.
    code = analyze.run(_parse([SOUNDSCAPE, ROBIN_22KHZ, "--out", out]))
    _, rows = _read_rows(out)
    keys = [(r["File"], float(r["Start (s)"]), -float(r["Confidence"])) for r in rows]
    files = {r["File"] for r in rows}
    assert code == 0
    assert files == {str(SOUNDSCAPE), str(ROBIN_22KHZ)}
    assert keys == sorted(keys)


def test_analyze_resampled_file_finds_robin(tmp_path):
    # amerob.wav is a 22.05 kHz American Robin recording, so this runs the
    # resampling path end to end.
    assert soundfile.info(ROBIN_22KHZ).samplerate == 22050
    out = tmp_path / "out.csv"
    code = analyze.run(_parse([ROBIN_22KHZ, "--out", out, "--min-conf", "0.5"]))
    _, rows = _read_rows(out)
    assert code == 0
    assert "American Robin" in {r["Common name"] for r in rows}


def test_analyze_skips_unreadable_file(tmp_path, capsys):
    bad = tmp_path / "broken.flac"
    bad.write_bytes(b"fLaC" + bytes(4096))
    out = tmp_path / "out.csv"

    code = analyze.run(_parse([bad, SOUNDSCAPE, "--out", out]))

    _, rows = _read_rows(out)
    assert code == 0
    assert {r["File"] for r in rows} == {str(SOUNDSCAPE)}
    assert "1 unreadable" in capsys.readouterr().err


def test_analyze_no_readable_file_exit_2(tmp_path):
    bad = tmp_path / "broken.flac"
    bad.write_bytes(b"fLaC" + bytes(4096))
    out = tmp_path / "out.csv"
    code = analyze.run(_parse([bad, tmp_path / "missing.wav", "--out", out]))
    assert code == 2
    assert not out.exists()


@pytest.mark.parametrize(
    "option, value",
    [("--sensitivity", "0.4"), ("--sensitivity", "1.6"), ("--min-conf", "1.5"), ("--overlap", "3")],
)
def test_analyze_parser_rejects_out_of_range(tmp_path, option, value):
    with pytest.raises(SystemExit) as raised:
        _parse([SOUNDSCAPE, "--out", tmp_path / "out.csv", option, value])
    assert raised.value.code == 2


def test_analyze_run_rejects_bad_namespace(tmp_path, capsys):
    args = _parse([SOUNDSCAPE, "--out", tmp_path / "out.csv"])
    args.sensitivity = 2.0
    code = analyze.run(args)
    assert code == 2
    assert "--sensitivity" in capsys.readouterr().err


def test_analyze_rejects_missing_out_folder(tmp_path):
    code = analyze.run(_parse([SOUNDSCAPE, "--out", tmp_path / "nowhere" / "out.csv"]))
    assert code == 2


def test_analyze_species_file_scientific_names(tmp_path):
    species_file = tmp_path / "species.txt"
    species_file.write_text("# chickadees only\nPoecile atricapillus\n\n")
    out = tmp_path / "out.csv"
    code = analyze.run(_parse([SOUNDSCAPE, "--out", out, "--species-file", species_file]))
    _, rows = _read_rows(out)
    assert code == 0
    assert len(rows) > 0
    assert {r["Scientific name"] for r in rows} == {"Poecile atricapillus"}


def test_analyze_species_file_unknown_entry(tmp_path, capsys):
    species_file = tmp_path / "species.txt"
    species_file.write_text("Poecile atricapillus\nNot a bird\n")
    code = analyze.run(_parse([SOUNDSCAPE, "--out", tmp_path / "out.csv", "--species-file", species_file]))
    assert code == 2
    assert "Not a bird" in capsys.readouterr().err


def test_analyze_rejects_non_tflite_model(tmp_path, capsys):
    model = tmp_path / "model.tflite"
    model.write_bytes(bytes(range(256)) * 20)
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("Turdus migratorius_American Robin\n")
    code = analyze.run(_parse([SOUNDSCAPE, "--out", tmp_path / "out.csv", "--model", model, "--labels", labels_file]))
    assert code == 2
    assert "model.tflite" in capsys.readouterr().err


def test_analyze_model_with_own_labels(tmp_path):
    files = birdnet.locate_birdnet_files()
    # The same model with a relabelled labels file stands for "another
    # classifier": the names in the CSV must come from --labels.
    labels = birdnet.read_labels(files.labels)
    renamed = [f"{label.split('_')[0]}_Species {i}" for i, label in enumerate(labels)]
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("\n".join(renamed) + "\n")
    out = tmp_path / "out.csv"

    code = analyze.run(_parse([SOUNDSCAPE, "--out", out, "--model", files.model, "--labels", labels_file]))

    _, rows = _read_rows(out)
    chickadee = renamed[labels.index("Poecile atricapillus_Black-capped Chickadee")].split("_")[1]
    assert code == 0
    assert rows[0]["Common name"] == chickadee
    assert all(r["Common name"].startswith("Species ") for r in rows)


def test_analyze_model_labels_mismatch(tmp_path, capsys):
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("Turdus migratorius_American Robin\n")
    model = birdnet.locate_birdnet_files().model
    code = analyze.run(_parse([SOUNDSCAPE, "--out", tmp_path / "out.csv", "--model", model, "--labels", labels_file]))
    assert code == 2
    assert "6522 classes" in capsys.readouterr().err


def test_analyze_model_needs_labels(tmp_path):
    model = birdnet.locate_birdnet_files().model
    code = analyze.run(_parse([SOUNDSCAPE, "--out", tmp_path / "out.csv", "--model", model]))
    assert code == 2


def test_analyze_module_entry_point(tmp_path):
    out = tmp_path / "out.csv"
    result = subprocess.run(
        [sys.executable, "-m", "dawnchorus.edge.analyze", str(SOUNDSCAPE), "--out", str(out)],
        capture_output=True, text=True, check=False,
    )
    _, rows = _read_rows(out)
    assert result.returncode == 0
    assert len(rows) == len(_reference(0)[1])


# InferencePipeline, which analyze runs on


@pytest.fixture(scope="module")
def classifier():
    return analyze.load_classifier()


def _soundscape_windows(count: int):
    windows = []
    for window in audio.FileSource([SOUNDSCAPE]):
        windows.append(window)
        if len(windows) == count:
            return windows
    return windows


def test_pipeline_batch_shapes(classifier):
    backbone, head = classifier
    batches = list(InferencePipeline(backbone, head, batch_size=4).run(_soundscape_windows(10)))
    assert [len(b.windows) for b in batches] == [4, 4, 2]
    assert batches[0].embeddings.shape == (4, 1024)
    assert batches[0].embeddings.dtype == np.float32
    assert batches[0].logits.shape == (4, 6522)
    assert batches[0].logits.dtype == np.float32
    assert batches[2].windows[-1].offset_s == 27.0


def test_pipeline_swap_applies_between_batches(classifier):
    backbone, source_head = classifier
    chickadee = source_head.select(["Poecile atricapillus_Black-capped Chickadee"])
    chickadee.version = 2
    swapped = threading.Event()

    class SwapInsideLogits:
        """Calls swap_head from another thread while this head scores a batch."""

        labels = source_head.labels
        version = 1
        weights = source_head.weights

        def logits(self, embeddings):
            swapper = threading.Thread(target=pipeline.swap_head, args=(chickadee,))
            swapper.start()
            swapper.join()
            swapped.set()
            return source_head.logits(embeddings)

    pipeline = InferencePipeline(backbone, SwapInsideLogits(), batch_size=2)
    batches = list(pipeline.run(_soundscape_windows(6)))

    assert swapped.is_set()
    assert [b.head.version for b in batches] == [1, 2, 2]
    assert batches[0].logits.shape == (2, 6522)
    assert batches[1].logits.shape == (2, 1)
    assert np.allclose(batches[1].logits, chickadee.logits(batches[1].embeddings))


def test_pipeline_swap_under_load_consistent(classifier):
    backbone, source_head = classifier
    heads = [source_head.select(source_head.labels[: 10 + version]) for version in range(5)]
    for version, head in enumerate(heads):
        head.version = version
    pipeline = InferencePipeline(backbone, heads[0], batch_size=3)
    stop = threading.Event()

    def keep_swapping():
        version = 0
        while not stop.is_set():
            version = (version + 1) % len(heads)
            pipeline.swap_head(heads[version])

    swapper = threading.Thread(target=keep_swapping)
    swapper.start()
    try:
        batches = list(pipeline.run(_soundscape_windows(24)))
    finally:
        stop.set()
        swapper.join()

    # Each batch's logits come from exactly the head recorded with it.
    assert sum(len(b.windows) for b in batches) == 24
    assert all(b.logits.shape[1] == len(b.head.labels) for b in batches)
    assert all(np.allclose(b.logits, b.head.logits(b.embeddings), atol=1e-5) for b in batches)
    assert len({b.head.version for b in batches}) > 1


def test_pipeline_swap_rejects_wrong_dimension(classifier):
    backbone, head = classifier
    pipeline = InferencePipeline(backbone, head)
    small = LinearHead(["A_a"], np.zeros((1, 512), np.float32), np.zeros(1, np.float32), version=3)
    with pytest.raises(ValueError, match="512-d"):
        pipeline.swap_head(small)


def test_pipeline_source_error_after_windows(classifier):
    backbone, head = classifier
    windows = _soundscape_windows(3)

    def failing_source():
        yield from windows
        raise audio.AudioError("field.wav", "unreadable or corrupt audio")

    scored = []
    with pytest.raises(audio.AudioError, match="field.wav"):
        for batch in InferencePipeline(backbone, head, batch_size=2).run(failing_source()):
            scored.extend(batch.windows)
    assert len(scored) == 3


def test_pipeline_close_stops_reader(classifier):
    backbone, head = classifier
    windows = _soundscape_windows(4)
    closed = []

    def endless_source():
        try:
            while True:
                yield from windows
        finally:
            closed.append(True)

    batches = InferencePipeline(backbone, head).run(endless_source())
    first = next(batches)
    batches.close()
    assert len(first.windows) == 1
    assert closed == [True]
