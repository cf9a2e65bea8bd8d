"""BirdNET-Analyzer CSV and Raven selection tables from ``dawnchorus analyze``, on real recordings.

The tables are read back with the csv module and checked column by column
against the CSV that the same analysis writes.
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import shutil

import pytest

from dawnchorus.edge import analyze
from dawnchorus.protocol import detection_files

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
BIRDS_10S = DATA / "soundscapes" / "opensoundscape" / "birds_10s.wav"  # 32 kHz
ROBIN_22KHZ = DATA / "focal" / "birdnet-go" / "amerob.wav"  # 22.05 kHz

pytestmark = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"real recordings not found at {DATA} (clone shared/ beside the repo)"
)

MIN_CONF = "0.3"


def _parse(argv: list) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    analyze.add_arguments(parser)
    return parser.parse_args([str(arg) for arg in argv])


def _read(path: pathlib.Path, delimiter: str) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream, delimiter=delimiter)
        rows = list(reader)
    return list(reader.fieldnames or []), rows


@pytest.fixture(scope="module")
def recordings(tmp_path_factory) -> pathlib.Path:
    """A folder with the two recordings, one in a subfolder, as a field team's card might hold them."""
    folder = tmp_path_factory.mktemp("card")
    (folder / "site-b").mkdir()
    shutil.copy(BIRDS_10S, folder / "birds_10s.wav")
    shutil.copy(ROBIN_22KHZ, folder / "site-b" / "amerob.wav")
    return folder


@pytest.fixture(scope="module")
def analysed(recordings, tmp_path_factory) -> dict[str, pathlib.Path]:
    """Run analyze on the folder twice: as a CSV and as Raven tables."""
    out = tmp_path_factory.mktemp("out")
    csv_path, tables = out / "results.csv", out / "tables"
    csv_code = analyze.run(_parse([recordings, "--out", csv_path, "--min-conf", MIN_CONF]))
    raven_code = analyze.run(_parse([recordings, "--out", tables, "--format", "raven", "--min-conf", MIN_CONF]))
    assert csv_code == 0
    assert raven_code == 0
    return {"csv": csv_path, "raven": tables}


def test_analyze_csv_has_birdnet_columns(analysed):
    columns, rows = _read(analysed["csv"], ",")

    assert columns == ["Start (s)", "End (s)", "Scientific name", "Common name", "Confidence", "File"]
    assert len(rows) > 0


def test_analyze_raven_writes_one_table_per_file(analysed, recordings):
    tables = sorted(path.relative_to(analysed["raven"]) for path in analysed["raven"].rglob("*") if path.is_file())

    assert tables == [pathlib.Path("birds_10s.BirdNET.selection.table.txt"),
                      pathlib.Path("site-b/amerob.BirdNET.selection.table.txt")]


def test_analyze_raven_columns_match_birdnet_analyzer(analysed):
    columns, _ = _read(analysed["raven"] / "birds_10s.BirdNET.selection.table.txt", "\t")

    assert columns == ["Selection", "View", "Channel", "Begin Time (s)", "End Time (s)", "Low Freq (Hz)",
                       "High Freq (Hz)", "Common Name", "Species Code", "Confidence", "Begin Path",
                       "File Offset (s)"]


@pytest.mark.parametrize("name, table, high_freq", [
    ("birds_10s.wav", "birds_10s.BirdNET.selection.table.txt", "15000"),
    ("site-b/amerob.wav", "site-b/amerob.BirdNET.selection.table.txt", "11025"),
])
def test_analyze_raven_rows_match_csv(analysed, recordings, name, table, high_freq):
    audio_path = str(recordings / name)
    _, csv_rows = _read(analysed["csv"], ",")
    expected = [row for row in csv_rows if row["File"] == audio_path]
    _, selections = _read(analysed["raven"] / table, "\t")

    assert len(expected) > 0
    assert len(selections) == len(expected)
    assert [s["Selection"] for s in selections] == [str(n) for n in range(1, len(expected) + 1)]
    assert {s["View"] for s in selections} == {"Spectrogram 1"}
    assert {s["Channel"] for s in selections} == {"1"}
    assert [s["Begin Time (s)"] for s in selections] == [r["Start (s)"] for r in expected]
    assert [s["End Time (s)"] for s in selections] == [r["End (s)"] for r in expected]
    assert {s["Low Freq (Hz)"] for s in selections} == {"0"}
    assert {s["High Freq (Hz)"] for s in selections} == {high_freq}
    assert [s["Common Name"] for s in selections] == [r["Common name"] for r in expected]
    assert [s["Species Code"] for s in selections] == [f"{r['Scientific name']}_{r['Common name']}"
                                                       for r in expected]
    assert [s["Confidence"] for s in selections] == [r["Confidence"] for r in expected]
    assert {s["Begin Path"] for s in selections} == {audio_path}
    assert [s["File Offset (s)"] for s in selections] == [r["Start (s)"] for r in expected]


def test_analyze_raven_robin_detected(analysed):
    _, selections = _read(analysed["raven"] / "site-b" / "amerob.BirdNET.selection.table.txt", "\t")

    assert "American Robin" in {s["Common Name"] for s in selections}


def test_analyze_raven_file_without_detection_gets_nocall_row(tmp_path):
    out = tmp_path / "tables"
    code = analyze.run(_parse([BIRDS_10S, "--out", out, "--format", "raven", "--min-conf", "1.0"]))
    _, selections = _read(out / "birds_10s.BirdNET.selection.table.txt", "\t")

    assert code == 0
    assert len(selections) == 1
    assert selections[0]["Common Name"] == "nocall"
    assert selections[0]["Species Code"] == "nocall"
    assert selections[0]["Begin Path"] == str(BIRDS_10S)


def test_analyze_raven_rejects_two_files_with_one_table(tmp_path, capsys):
    folder = tmp_path / "card"
    folder.mkdir()
    shutil.copy(BIRDS_10S, folder / "dawn.wav")
    shutil.copy(BIRDS_10S, folder / "dawn.WAV")

    code = analyze.run(_parse([folder, "--out", tmp_path / "tables", "--format", "raven"]))

    assert code == 2
    assert "would both write" in capsys.readouterr().err


def test_analyze_raven_rejects_file_as_out(tmp_path, capsys):
    out = tmp_path / "results.txt"
    out.write_text("")

    code = analyze.run(_parse([BIRDS_10S, "--out", out, "--format", "raven"]))

    assert code == 2
    assert "give a folder" in capsys.readouterr().err


def test_check_format_names_choices():
    with pytest.raises(ValueError, match="csv, raven"):
        detection_files.check_format("kaleidoscope")
