"""BirdNET-Analyzer CSV and Raven selection tables from ``dawnchorus analyze``, on real recordings.

The tables are read back with the csv module and checked column by column
against the CSV that the same analysis writes.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import pathlib
import shutil
import subprocess
import sys

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


def test_analyze_raven_species_codes_file(tmp_path):
    codes = tmp_path / "codes.json"
    # BirdNET-Analyzer's codes file maps both ways.
    codes.write_text(json.dumps({"amerob": "Turdus migratorius_American Robin",
                                 "Turdus migratorius_American Robin": "amerob"}))
    out = tmp_path / "tables"

    code = analyze.run(_parse([ROBIN_22KHZ, "--out", out, "--format", "raven", "--min-conf", MIN_CONF,
                               "--species-codes", codes]))
    _, selections = _read(out / "amerob.BirdNET.selection.table.txt", "\t")
    robins = [s for s in selections if s["Common Name"] == "American Robin"]
    others = [s for s in selections if s["Common Name"] != "American Robin"]

    assert code == 0
    assert len(robins) > 0
    assert {s["Species Code"] for s in robins} == {"amerob"}
    assert all(s["Species Code"].endswith("_" + s["Common Name"]) for s in others)


def test_analyze_rejects_invalid_species_codes(tmp_path, capsys):
    codes = tmp_path / "codes.json"
    codes.write_text('["amerob"]')

    code = analyze.run(_parse([BIRDS_10S, "--out", tmp_path / "tables", "--format", "raven",
                               "--species-codes", codes]))

    assert code == 2
    assert "must be one JSON object" in capsys.readouterr().err


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


# The base station's detection log ---------------------------------------------------------------

EXTRA = ["Site", "Device", "Time (UTC)", "Head version", "Sequence"]


@pytest.fixture(scope="module")
def station_state(tmp_path_factory) -> pathlib.Path:
    """Run the demo (base station and two recorders) on two real recordings against a real Mosquitto.

    The broker is the module's own: the base station's persistent session
    would otherwise queue every later test's messages on the shared broker.
    """
    from conftest import Mosquitto

    directory = tmp_path_factory.mktemp("demo")
    broker = Mosquitto(directory)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "dawnchorus", "demo", str(BIRDS_10S), str(ROBIN_22KHZ), "--broker",
             broker.address, "--speed", "0", "--min-conf", MIN_CONF, "--site", "export-test",
             "--state-dir", str(directory / "state")],
            capture_output=True, text=True, timeout=300,
        )
    finally:
        broker.stop()
    assert result.returncode == 0, result.stderr[-3000:]
    return directory / "state" / "server"


def _logged(state: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (state / "detections.jsonl").read_text().splitlines()]


def _export(state: pathlib.Path, out: pathlib.Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dawnchorus", "server", "export-detections", str(state), "--out", str(out), *options],
        capture_output=True, text=True, timeout=120,
    )


def _seconds_of_day(unix_s: float) -> float:
    moment = datetime.datetime.fromtimestamp(unix_s, tz=datetime.timezone.utc)
    return unix_s - moment.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


def _day(unix_s: float) -> str:
    return datetime.datetime.fromtimestamp(unix_s, tz=datetime.timezone.utc).date().isoformat()


def test_export_csv_matches_log(station_state, tmp_path):
    logged = sorted(_logged(station_state), key=lambda d: (d["site"], d["device"], d["start_time"],
                                                           -d["confidence"], d["label"]))

    result = _export(station_state, tmp_path, "--format", "csv")
    columns, rows = _read(tmp_path / "detections.csv", ",")

    assert result.returncode == 0, result.stderr
    assert len(logged) > 0
    assert f"wrote {len(logged)} detections to {tmp_path / 'detections.csv'}" in result.stderr
    assert columns == ["Start (s)", "End (s)", "Scientific name", "Common name", "Confidence", "File", *EXTRA]
    assert len(rows) == len(logged)
    for row, detection in zip(rows, logged):
        assert float(row["Start (s)"]) == pytest.approx(_seconds_of_day(detection["start_time"]), abs=1e-3)
        assert float(row["End (s)"]) == pytest.approx(_seconds_of_day(detection["start_time"]) + 3.0, abs=2e-3)
        assert row["Scientific name"] == detection["scientific_name"]
        assert row["Common name"] == detection["common_name"]
        assert float(row["Confidence"]) == pytest.approx(detection["confidence"], abs=5e-5)
        assert row["File"] == f"{detection['site']}/{detection['device']}/{_day(detection['start_time'])}"
        assert row["Site"] == detection["site"]
        assert row["Device"] == detection["device"]
        assert datetime.datetime.fromisoformat(row["Time (UTC)"].replace("Z", "+00:00")).timestamp() == \
            pytest.approx(detection["start_time"], abs=1e-3)
        assert int(row["Head version"]) == detection["head_version"]
        assert int(row["Sequence"]) == detection["sequence"]


def test_export_raven_one_table_per_recorder_day(station_state, tmp_path):
    logged = _logged(station_state)
    expected = {pathlib.Path(d["site"], d["device"], f"{_day(d['start_time'])}.BirdNET.selection.table.txt")
                for d in logged}

    result = _export(station_state, tmp_path, "--format", "raven")
    tables = {path.relative_to(tmp_path) for path in tmp_path.rglob("*") if path.is_file()}

    assert result.returncode == 0, result.stderr
    assert tables == expected
    for table in tables:
        site, device, name = table.parts
        count = sum(1 for d in logged if (d["site"], d["device"], _day(d["start_time"])) == (site, device, name[:10]))
        noun = "detection" if count == 1 else "detections"
        assert f"wrote {count} {noun} to {tmp_path / table}\n" in result.stderr


def test_export_raven_rows_match_log(station_state, tmp_path):
    logged = _logged(station_state)
    device = sorted({d["device"] for d in logged})[0]
    of_device = sorted((d for d in logged if d["device"] == device),
                       key=lambda d: (d["start_time"], -d["confidence"], d["label"]))
    recording = f"{of_device[0]['site']}/{device}/{_day(of_device[0]['start_time'])}"

    result = _export(station_state, tmp_path, "--format", "raven", "--device", device)
    columns, selections = _read(tmp_path / f"{recording}.BirdNET.selection.table.txt", "\t")

    assert result.returncode == 0, result.stderr
    assert columns == [*detection_files.RAVEN_COLUMNS, *EXTRA]
    assert len(selections) == len(of_device)
    for number, (selection, detection) in enumerate(zip(selections, of_device), start=1):
        assert selection["Selection"] == str(number)
        assert selection["View"] == "Spectrogram 1"
        assert selection["Channel"] == "1"
        assert float(selection["Begin Time (s)"]) == pytest.approx(_seconds_of_day(detection["start_time"]),
                                                                   abs=1e-3)
        assert float(selection["End Time (s)"]) == pytest.approx(_seconds_of_day(detection["end_time"]), abs=1e-3)
        assert selection["Low Freq (Hz)"] == "0"
        assert selection["High Freq (Hz)"] == "15000"
        assert selection["Common Name"] == detection["common_name"]
        assert selection["Species Code"] == detection["label"]
        assert float(selection["Confidence"]) == pytest.approx(detection["confidence"], abs=5e-5)
        assert selection["Begin Path"] == recording
        assert selection["File Offset (s)"] == selection["Begin Time (s)"]
        assert selection["Device"] == device
        assert int(selection["Sequence"]) == detection["sequence"]


def test_export_filters_by_time(station_state, tmp_path):
    logged = _logged(station_state)
    times = sorted({d["start_time"] for d in logged})
    middle = times[len(times) // 2]
    expected = sum(1 for d in logged if d["start_time"] >= middle)

    result = _export(station_state, tmp_path, "--since", str(middle),
                     "--until", datetime.datetime.fromtimestamp(times[-1] + 1, datetime.timezone.utc).isoformat())
    _, rows = _read(tmp_path / "detections.csv", ",")

    assert result.returncode == 0, result.stderr
    assert 0 < len(rows) < len(logged)
    assert len(rows) == expected


def test_export_filters_unknown_site_to_empty(station_state, tmp_path):
    result = _export(station_state, tmp_path, "--site", "no-such-site")
    columns, rows = _read(tmp_path / "detections.csv", ",")

    assert result.returncode == 0, result.stderr
    assert columns[:6] == list(detection_files.CSV_COLUMNS)
    assert rows == []
    assert f"wrote 0 detections to {tmp_path / 'detections.csv'}" in result.stderr
    assert "note: no detections exported, because none of the" in result.stderr
    assert "matched the filters (--site no-such-site)" in result.stderr
    assert "The CSV has only its header." in result.stderr


def test_export_raven_filter_matches_nothing(station_state, tmp_path):
    result = _export(station_state, tmp_path, "--format", "raven", "--device", "no-such-recorder",
                     "--since", "2026-05-22")

    assert result.returncode == 0, result.stderr
    assert list(tmp_path.rglob("*.txt")) == []
    assert "matched the filters (--device no-such-recorder --since 2026-05-22T00:00:00Z)" in result.stderr
    assert "No table was written." in result.stderr


def test_export_empty_log_noted(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "detections.jsonl").write_text("")

    result = _export(state, tmp_path / "out")

    assert result.returncode == 0, result.stderr
    assert "wrote 0 detections to" in result.stderr
    assert f"the detection log {state / 'detections.jsonl'} has no detections yet." in result.stderr


def test_export_skips_cut_last_line(station_state, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    text = (station_state / "detections.jsonl").read_text()
    (state / "detections.jsonl").write_text(text + '{"device":"rec-cut","si')

    result = _export(state, tmp_path / "out")
    _, rows = _read(tmp_path / "out" / "detections.csv", ",")

    assert result.returncode == 0, result.stderr
    assert len(rows) == len(text.splitlines())
    assert "line" in result.stderr


def test_export_raven_species_codes(station_state, tmp_path):
    logged = _logged(station_state)
    label = logged[0]["label"]
    codes = tmp_path / "codes.json"
    codes.write_text(json.dumps({label: "code1"}))

    result = _export(station_state, tmp_path / "out", "--format", "raven", "--species-codes", str(codes))
    selections = [row for table in (tmp_path / "out").rglob("*.txt") for row in _read(table, "\t")[1]]

    assert result.returncode == 0, result.stderr
    assert {s["Species Code"] for s in selections if s["Common Name"] == logged[0]["common_name"]} == {"code1"}


def test_export_missing_log_exit_2(tmp_path):
    result = _export(tmp_path, tmp_path / "out")

    assert result.returncode == 2
    assert "not found" in result.stderr


def test_export_rejects_invalid_time(tmp_path):
    result = _export(tmp_path, tmp_path / "out", "--since", "yesterday")

    assert result.returncode == 2
    assert "invalid time 'yesterday'" in result.stderr
