"""Bad audio in a replayed folder: each bad file is named with its reason, and the good ones are analysed.

The folder is made in a temporary directory from real recordings: cut,
truncated, corrupted, resampled, with duplicated channels and with NaN or
infinite samples. The same folder goes through the audio front end, the real
``dawnchorus edge run`` process against Mosquitto, and ``dawnchorus analyze``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import pathlib
import subprocess
import sys
import threading
import uuid

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import soundfile
import soxr

from dawnchorus.edge import audio
from dawnchorus.protocol import topics
from dawnchorus.protocol.embeddings import decode_embeddings

SR = audio.SAMPLE_RATE
SOUNDSCAPE = "soundscapes/birdnet-example/soundscape.flac"


def _clip(data_dir: pathlib.Path, seconds: float, offset_s: float) -> np.ndarray:
    samples, rate = soundfile.read(data_dir / SOUNDSCAPE, dtype="float32", start=round(offset_s * SR),
                                   frames=round(seconds * SR))
    assert rate == SR
    return samples


def _write_truncated_wav(path: pathlib.Path, samples: np.ndarray) -> None:
    soundfile.write(path, samples, SR, subtype="PCM_16")
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])


def _write_truncated_flac(path: pathlib.Path, samples: np.ndarray) -> None:
    soundfile.write(path, samples, SR, subtype="PCM_16")
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 3])


def _write_with_value(path: pathlib.Path, samples: np.ndarray, at_s: float, value: float) -> None:
    samples = samples.copy()
    samples[round(at_s * SR)] = value
    soundfile.write(path, samples, SR, subtype="FLOAT")


# What each file of the folder is: how it is made, the windows the front end
# gives for it, and, for a rejected file, the words of its reason.
GOOD, WARNED, REJECTED, SKIPPED = "good", "warned", "rejected", "skipped"


def make_bad_folder(data_dir: pathlib.Path, folder: pathlib.Path) -> dict[str, tuple[str, int, str]]:
    """Write the test folder; return per file name its outcome, its window count and the words of its message."""
    folder.mkdir(parents=True, exist_ok=True)
    six_seconds = _clip(data_dir, 6.0, 0.0)
    other = _clip(data_dir, 6.0, 60.0)

    soundfile.write(folder / "good.flac", six_seconds, SR, subtype="PCM_16")
    soundfile.write(folder / "silence.wav", np.zeros(6 * SR, np.float32), SR, subtype="PCM_16")
    soundfile.write(folder / "rate-8k.wav", soxr.resample(other, SR, 8_000), 8_000, subtype="PCM_16")
    soundfile.write(folder / "rate-96k.flac", soxr.resample(other, SR, 96_000), 96_000, subtype="PCM_24")
    soundfile.write(folder / "six-channels.flac", np.repeat(other[:, None], 6, axis=1), SR, subtype="PCM_16")
    soundfile.write(folder / "short.wav", six_seconds[: SR // 2], SR, subtype="PCM_16")
    _write_truncated_wav(folder / "truncated.wav", six_seconds)
    _write_truncated_flac(folder / "truncated.flac", _clip(data_dir, 30.0, 0.0))
    _write_with_value(folder / "nan.wav", _clip(data_dir, 9.0, 0.0), at_s=5.0, value=np.nan)
    _write_with_value(folder / "inf.wav", six_seconds, at_s=0.1, value=np.inf)
    (folder / "empty.wav").write_bytes(b"")
    (folder / "corrupt.flac").write_bytes(b"fLaC" + np.random.default_rng(0).bytes(8192))
    (folder / "text-named.mp3").write_text("not audio, but named like it\n")
    (folder / "notes.txt").write_text("recorder moved 20 m north\n")
    (folder / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(64))
    (folder / "._good.flac").write_bytes(b"\x00\x05\x16\x07" + bytes(64))

    # The windows before a corruption in a file's middle are kept: the first
    # blocks of 65,536 frames before the first bad one.
    return {
        "good.flac": (GOOD, 2, ""),
        "silence.wav": (GOOD, 2, ""),
        "rate-96k.flac": (GOOD, 2, ""),
        "six-channels.flac": (GOOD, 2, ""),
        "rate-8k.wav": (WARNED, 2, "low sample rate 8000 Hz"),
        "truncated.wav": (WARNED, 1, "truncated"),
        "short.wav": (WARNED, 0, "shorter than the 1 s"),
        "truncated.flac": (REJECTED, None, "unreadable or corrupt audio after"),
        "nan.wav": (REJECTED, 1, "contains NaN or infinite samples (first at 5.000 s)"),
        "inf.wav": (REJECTED, 0, "contains NaN or infinite samples (first at 0.100 s)"),
        "empty.wav": (REJECTED, 0, "zero length"),
        "corrupt.flac": (REJECTED, 0, "unreadable or corrupt audio"),
        "text-named.mp3": (REJECTED, 0, "unreadable or corrupt audio"),
        "notes.txt": (SKIPPED, 0, "not an audio file"),
        "photo.jpg": (SKIPPED, 0, "not an audio file"),
        "._good.flac": (SKIPPED, 0, "hidden file"),
    }


@pytest.fixture(scope="module")
def bad_folder(data_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad-audio") / "replay"
    expected = make_bad_folder(data_dir, folder)
    return folder, expected


@pytest.fixture(scope="module")
def replayed(bad_folder):
    """The windows that the front end gives for the folder, per file name."""
    folder, _ = bad_folder
    source = audio.FileSource([folder])
    windows: dict[str, int] = {}
    for window in source:
        name = pathlib.Path(window.source).name
        windows[name] = windows.get(name, 0) + 1
    return source, windows


def _lines_naming(log: str, name: str) -> list[str]:
    return [line for line in log.splitlines() if f"{os.sep}{name}" in line]


def test_front_end_windows_per_file(bad_folder, replayed):
    _, expected = bad_folder
    _, windows = replayed
    for name, (outcome, count, _) in expected.items():
        if count is not None:
            assert windows.get(name, 0) == count, name
    assert windows.get("truncated.flac", 0) >= 1


def test_front_end_counts_files(bad_folder, replayed):
    _, expected = bad_folder
    source, _ = replayed
    rejected = [name for name, (outcome, _, _) in expected.items() if outcome == REJECTED]
    analysed = [name for name, (outcome, _, _) in expected.items() if outcome in (GOOD, WARNED)]
    assert source.files_rejected == len(rejected)
    assert source.files_read == len(analysed)
    assert sorted(pathlib.Path(error.path).name for error in source.errors) == sorted(rejected)


def test_front_end_logs_each_file_with_reason(bad_folder, caplog):
    folder, expected = bad_folder
    with caplog.at_level(logging.INFO, logger="dawnchorus.edge.audio"):
        list(audio.FileSource([folder]))
    log = "\n".join(record.getMessage() for record in caplog.records)
    for name, (outcome, _, words) in expected.items():
        if outcome == GOOD:
            continue
        lines = _lines_naming(log, name)
        assert any(words in line for line in lines), f"{name}: {lines}"


def test_front_end_silence_is_analysed(bad_folder):
    folder, _ = bad_folder
    windows = list(audio.FileSource([folder / "silence.wav"]))
    assert len(windows) == 2
    assert not np.any(windows[0].samples)


def test_front_end_six_channels_mix_to_mono(bad_folder, data_dir):
    folder, _ = bad_folder
    mixed = audio.read_audio(folder / "six-channels.flac")
    mono, _ = soundfile.read(folder / "six-channels.flac", dtype="float32")
    assert mixed.shape == (6 * SR,)
    assert np.allclose(mixed, mono[:, 0], atol=1e-6)


def test_front_end_96khz_resampled(bad_folder):
    folder, _ = bad_folder
    samples = audio.read_audio(folder / "rate-96k.flac")
    assert samples.shape[0] == pytest.approx(6 * SR, abs=2)


class _EmbeddingCollector:
    """Subscribes to one recorder's embeddings and statuses before it starts."""

    def __init__(self, broker, site: str, device: str):
        self.sequences: list[int] = []
        self.statuses: list[dict] = []
        self._condition = threading.Condition()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-collector-{uuid.uuid4().hex[:8]}")
        self._client.on_message = self._on_message
        self._client.connect(broker.host, broker.port)
        self._client.subscribe(topics.device_topic(site, device, "embeddings"), qos=1)
        self._client.subscribe(topics.device_topic(site, device, "status"), qos=1)
        self._client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        with self._condition:
            if message.topic.endswith("/embeddings"):
                self.sequences.extend(decode_embeddings(message.payload).sequence.tolist())
            elif message.payload:
                self.statuses.append(json.loads(message.payload))
            self._condition.notify_all()

    def wait_for(self, condition, timeout: float) -> bool:
        with self._condition:
            return self._condition.wait_for(condition, timeout=timeout)

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def test_edge_run_replays_bad_folder(mosquitto, bad_folder, replayed, tmp_path):
    folder, expected = bad_folder
    source, windows = replayed
    site, device = "bad-audio-site", f"rec-bad-{uuid.uuid4().hex[:6]}"
    collector = _EmbeddingCollector(mosquitto, site, device)
    log_path = tmp_path / "recorder.log"
    try:
        with open(log_path, "w") as log_file:
            process = subprocess.run(
                [sys.executable, "-m", "dawnchorus", "edge", "run", "--device", device, "--site", site,
                 "--broker", mosquitto.address, "--input", str(folder), "--speed", "0", "--threads", "1",
                 "--state-dir", str(tmp_path / "edge")],
                stdout=log_file, stderr=subprocess.STDOUT, timeout=300,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )
        log = log_path.read_text()
        assert process.returncode == 0, log[-3000:]

        total_windows = sum(windows.values())
        assert collector.wait_for(lambda: len(collector.sequences) >= total_windows, timeout=60), log[-3000:]
        assert sorted(collector.sequences) == list(range(total_windows))
        final = collector.statuses[-1]
        assert final["counters"]["files_rejected"] == source.files_rejected
        assert final["counters"]["files_read"] == source.files_read
    finally:
        collector.close()

    for name, (outcome, _, words) in expected.items():
        if outcome == GOOD:
            continue
        lines = _lines_naming(log, name)
        assert any(words in line for line in lines), f"{name}: {lines}"


def test_analyze_bad_folder(bad_folder, replayed, tmp_path):
    folder, expected = bad_folder
    source, windows = replayed
    out = tmp_path / "results.csv"
    process = subprocess.run(
        [sys.executable, "-m", "dawnchorus", "analyze", str(folder), "--out", str(out), "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    assert f"analysed {source.files_read} file(s), {source.files_rejected} unreadable" in process.stderr
    for name, (outcome, _, words) in expected.items():
        if outcome == GOOD:
            continue
        lines = _lines_naming(process.stderr, name)
        assert any(words in line for line in lines), f"{name}: {lines}"

    with open(out, newline="") as stream:
        files = {pathlib.Path(row["File"]).name for row in csv.DictReader(stream)}
    with_windows = {name for name, count in windows.items() if count}
    assert "good.flac" in files
    assert files <= with_windows
