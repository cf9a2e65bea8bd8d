"""Tests of the audio front end: reading, resampling, windowing and file replay, on real recordings."""

from __future__ import annotations

import logging
import pathlib
import time

import numpy as np
import pytest
import scipy.signal
import soundfile
import soxr

from dawnchorus.edge import audio

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
SOUNDSCAPE = DATA / "soundscapes" / "birdnet-example" / "soundscape.flac"
MAAD_22KHZ = DATA / "soundscapes" / "maad-24h" / "S4A03895_20190522_060000.flac"
WIND_96KHZ = DATA / "backgrounds" / "wind-rain" / "20230615_022600_02.flac"
STEREO_44KHZ = DATA / "focal" / "microfaune" / "gobemouche_noir.flac"
OPUS_CLIP = DATA / "focal" / "bird-radio" / "audio" / "coal_tit" / "xc_148819_001.ogg"
MP3_STEREO_CLIP = DATA / "focal" / "phoebe" / "clips" / "137480.mp3"
MP3_IN_WAV = DATA / "focal" / "microfaune" / "mouette_rieuse.wav"

pytestmark = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"real recordings not found at {DATA} (clone shared/ beside the repo)"
)

SR = audio.SAMPLE_RATE


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1])


def _soundscape_seconds(seconds: float) -> np.ndarray:
    samples, rate = soundfile.read(SOUNDSCAPE, dtype="float32", frames=round(seconds * SR))
    assert rate == SR
    return samples


def _write_clip(path: pathlib.Path, seconds: float, offset_s: float = 0.0) -> pathlib.Path:
    """Write a piece of the real 48 kHz soundscape to ``path`` (FLAC, 16 bit)."""
    samples, _ = soundfile.read(
        SOUNDSCAPE, dtype="int16", start=round(offset_s * SR), frames=round(seconds * SR)
    )
    soundfile.write(path, samples, SR, subtype="PCM_16")
    return path


# Reading and resampling


def test_read_audio_48khz_passthrough():
    expected, _ = soundfile.read(SOUNDSCAPE, dtype="float32")
    samples = audio.read_audio(SOUNDSCAPE)
    assert samples.dtype == np.float32
    assert samples.shape == expected.shape
    assert np.array_equal(samples, expected)


def test_read_audio_22khz_stereo(tmp_path):
    # No real 22.05 kHz stereo file exists in the data set, so one is made from
    # the real soundscape: resampled to 22.05 kHz, the right channel at half gain.
    original = _soundscape_seconds(20.0)
    mono_22k = soxr.resample(original, SR, 22050, quality="VHQ")
    stereo = np.stack([mono_22k, 0.5 * mono_22k], axis=1)
    path = tmp_path / "stereo_22k.wav"
    soundfile.write(path, stereo, 22050, subtype="FLOAT")
    assert soundfile.info(path).channels == 2

    samples = audio.read_audio(path)

    assert samples.dtype == np.float32
    assert samples.ndim == 1
    assert abs(len(samples) - len(mono_22k) * SR / 22050) <= 0.5
    # Independent reference: scipy's polyphase resampler on the channel mean
    # (48000 / 22050 = 320 / 147).
    reference = scipy.signal.resample_poly(stereo.mean(axis=1), 320, 147)
    n = min(len(reference), len(samples))
    assert _correlation(samples[:n], reference[:n]) > 0.999
    # The mean of the channels is 0.75 of the original; a front end that kept
    # only one channel would give 1.0 or 0.5.
    n = min(len(original), len(samples))
    gain = float(np.dot(samples[:n], original[:n]) / np.dot(original[:n], original[:n]))
    assert gain == pytest.approx(0.75, abs=0.02)


def test_read_audio_96khz_real_file():
    raw, rate = soundfile.read(WIND_96KHZ, dtype="float32")
    assert rate == 96000
    samples = audio.read_audio(WIND_96KHZ)
    assert samples.dtype == np.float32
    assert samples.ndim == 1
    assert abs(len(samples) - len(raw) / 2) <= 0.5
    # This recording has most of its energy above 20 kHz, where the two
    # resamplers' anti-aliasing filters differ, so compare below 20 kHz.
    # Energy above 24 kHz that aliased into the band would still show here.
    reference = scipy.signal.resample_poly(raw, 1, 2)
    n = min(len(reference), len(samples))
    below_20khz = scipy.signal.butter(8, 20_000, fs=SR, output="sos")
    assert _correlation(
        scipy.signal.sosfiltfilt(below_20khz, samples[:n]),
        scipy.signal.sosfiltfilt(below_20khz, reference[:n]),
    ) > 0.999


def test_read_audio_44khz_stereo_real_file():
    raw, rate = soundfile.read(STEREO_44KHZ, dtype="float32")
    assert rate == 44100
    assert raw.shape[1] == 2
    samples = audio.read_audio(STEREO_44KHZ)
    assert samples.ndim == 1
    assert abs(len(samples) - len(raw) * SR / rate) <= 0.5
    reference = scipy.signal.resample_poly(raw.mean(axis=1), 160, 147)
    n = min(len(reference), len(samples))
    assert _correlation(samples[:n], reference[:n]) > 0.999


@pytest.mark.parametrize("path", [OPUS_CLIP, MP3_STEREO_CLIP, MP3_IN_WAV], ids=["opus", "mp3", "mp3-in-wav"])
def test_read_audio_compressed_formats(path):
    samples = audio.read_audio(path)
    assert samples.dtype == np.float32
    assert samples.ndim == 1
    assert len(samples) > SR
    assert np.isfinite(samples).all()
    assert np.abs(samples).max() > 0.0


def test_stream_audio_equals_whole_resample():
    raw, rate = soundfile.read(MAAD_22KHZ, dtype="float32")
    assert rate == 22000
    whole = soxr.resample(raw, rate, SR, quality=audio.RESAMPLE_QUALITY)
    blocks = list(audio.stream_audio(MAAD_22KHZ, block_frames=1000))
    streamed = np.concatenate(blocks)
    assert len(blocks) > 100
    assert streamed.shape == whole.shape
    assert np.abs(streamed - whole).max() < 1e-5


# Rejected files


def _truncated_flac(path: pathlib.Path) -> pathlib.Path:
    content = SOUNDSCAPE.read_bytes()
    path.write_bytes(content[: len(content) // 3])
    return path


def _nan_wav(path: pathlib.Path) -> pathlib.Path:
    samples = _soundscape_seconds(2.0)
    samples[SR + 10] = np.nan
    soundfile.write(path, samples, SR, subtype="FLOAT")
    return path


def _inf_wav(path: pathlib.Path) -> pathlib.Path:
    samples = _soundscape_seconds(2.0)
    samples[100] = np.inf
    soundfile.write(path, samples, SR, subtype="FLOAT")
    return path


BAD_FILES = {
    "zero-length": (lambda p: (p.write_bytes(b""), p)[1], "empty.wav", "zero length"),
    "corrupt": (lambda p: (p.write_bytes(b"fLaC" + bytes(4096)), p)[1], "corrupt.flac", "corrupt"),
    "truncated": (_truncated_flac, "truncated.flac", "corrupt"),
    "nan": (_nan_wav, "nan.wav", "NaN"),
    "inf": (_inf_wav, "inf.wav", "infinite"),
    "no-samples": (
        lambda p: (soundfile.write(p, np.zeros(0, np.float32), SR), p)[1], "none.wav", "no samples"
    ),
    "unsupported": (lambda p: (p.write_text("field notes"), p)[1], "notes.txt", "unsupported format"),
    "missing": (lambda p: p, "missing.flac", "not found"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_read_audio_rejects_bad_file(tmp_path, case):
    make, name, reason = BAD_FILES[case]
    path = make(tmp_path / name)
    with pytest.raises(audio.AudioError) as raised:
        audio.read_audio(path)
    assert name in str(raised.value)
    assert reason in str(raised.value)
    assert raised.value.path == str(path)


def test_audio_error_is_value_error():
    assert issubclass(audio.AudioError, ValueError)


def test_read_audio_nan_message_gives_time(tmp_path):
    path = _nan_wav(tmp_path / "nan.wav")
    with pytest.raises(audio.AudioError, match=r"first at 1\.000 s"):
        audio.read_audio(path)


# Windowing


def _ramp(seconds: float) -> np.ndarray:
    """Samples whose value is their index, so every window shows where it was cut."""
    return np.arange(round(seconds * SR), dtype=np.float32)


def _windows(samples: np.ndarray, overlap_s: float = 0.0, block: int | None = None):
    windower = audio.Windower(overlap_s)
    pieces = []
    step = block or max(1, len(samples))
    for start in range(0, len(samples), step):
        pieces.extend(windower.push(samples[start:start + step]))
    pieces.extend(windower.finish())
    return pieces


def test_windower_offsets_no_overlap():
    pieces = _windows(_ramp(10.0))
    assert [p.start_sample / SR for p in pieces] == [0.0, 3.0, 6.0, 9.0]
    assert [p.valid_samples for p in pieces] == [144000, 144000, 144000, 48000]
    assert all(p.samples.shape == (audio.WINDOW_SAMPLES,) for p in pieces)
    assert all(p.samples.dtype == np.float32 for p in pieces)
    assert np.array_equal(pieces[1].samples, _ramp(10.0)[144000:288000])


def test_windower_pads_tail_with_zeros():
    pieces = _windows(_ramp(10.0))
    tail = pieces[-1].samples
    assert np.array_equal(tail[:48000], _ramp(10.0)[432000:480000])
    assert not tail[48000:].any()


def test_windower_drops_tail_under_1s():
    pieces = _windows(_ramp(9.99))
    assert [p.start_sample / SR for p in pieces] == [0.0, 3.0, 6.0]


def test_windower_keeps_tail_of_exactly_1s():
    pieces = _windows(np.ones(7 * SR, dtype=np.float32))
    assert [p.start_sample / SR for p in pieces] == [0.0, 3.0, 6.0]
    assert pieces[-1].valid_samples == SR


def test_windower_short_stream_gives_nothing():
    assert _windows(_ramp(0.9)) == []


def test_windower_short_stream_padded():
    pieces = _windows(_ramp(2.0))
    assert len(pieces) == 1
    assert pieces[0].valid_samples == 2 * SR


def test_windower_overlap_offsets():
    pieces = _windows(_ramp(10.0), overlap_s=1.0)
    # Hop 2 s: starts 0 to 6 give full windows and 8 contains 2 s of audio.
    assert [p.start_sample / SR for p in pieces] == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert [p.valid_samples for p in pieces] == [144000] * 4 + [96000]
    assert np.array_equal(pieces[2].samples, _ramp(10.0)[4 * SR:7 * SR])


def test_windower_overlap_half_second():
    pieces = _windows(_ramp(120.0), overlap_s=0.5)
    assert len(pieces) == 48
    assert pieces[-1].start_sample / SR == 117.5
    assert pieces[-1].valid_samples == round(2.5 * SR)


def test_windower_drops_tail_without_new_audio():
    # Hop 1 s over 120 s: the window at 117 s reaches the end, so windows at
    # 118 s and 119 s would repeat audio already seen.
    pieces = _windows(_ramp(120.0), overlap_s=2.0)
    assert len(pieces) == 118
    assert pieces[-1].start_sample / SR == 117.0
    assert pieces[-1].valid_samples == audio.WINDOW_SAMPLES


def test_windower_first_window_always_new():
    pieces = _windows(_ramp(1.5), overlap_s=2.0)
    assert [p.valid_samples for p in pieces] == [round(1.5 * SR)]


@pytest.mark.parametrize("overlap_s", [0.0, 0.5, 1.0, 2.0, 2.9])
def test_count_windows_matches_windower(overlap_s):
    for seconds in (0.5, 1.0, 2.0, 3.0, 4.0, 9.99, 10.0, 10.5, 120.0):
        samples = np.zeros(round(seconds * SR), dtype=np.float32)
        assert audio.count_windows(len(samples), overlap_s) == len(_windows(samples, overlap_s))


def test_windower_block_size_independent():
    samples = _ramp(20.3)
    whole = _windows(samples, overlap_s=0.7)
    for block in (1013, 48000, 144000, 144001, 500000):
        pieces = _windows(samples, overlap_s=0.7, block=block)
        assert [p.start_sample for p in pieces] == [p.start_sample for p in whole]
        assert all(np.array_equal(a.samples, b.samples) for a, b in zip(pieces, whole))


@pytest.mark.parametrize("overlap_s", [-0.5, 3.0, 4.0])
def test_windower_rejects_bad_overlap(overlap_s):
    with pytest.raises(ValueError, match="overlap"):
        audio.Windower(overlap_s)


# FileSource


def test_file_source_windows_and_offsets(tmp_path):
    path = _write_clip(tmp_path / "clip.flac", 10.0)
    windows = list(audio.FileSource([path]))
    assert [w.offset_s for w in windows] == [0.0, 3.0, 6.0, 9.0]
    assert [w.duration_s for w in windows] == [3.0, 3.0, 3.0, 1.0]
    assert all(w.source == str(path) for w in windows)
    assert all(w.samples.shape == (audio.WINDOW_SAMPLES,) for w in windows)
    assert np.array_equal(windows[1].samples, audio.read_audio(path)[3 * SR:6 * SR])


def test_file_source_overlap(tmp_path):
    path = _write_clip(tmp_path / "clip.flac", 10.0)
    windows = list(audio.FileSource([path], overlap_s=1.5))
    # A window at 9.0 would contain 1 s, all of it already in the window at 7.5.
    assert [w.offset_s for w in windows] == [0.0, 1.5, 3.0, 4.5, 6.0, 7.5]
    assert [w.duration_s for w in windows][-2:] == [3.0, 2.5]


def test_file_source_skips_bad_file(tmp_path, caplog):
    first = _write_clip(tmp_path / "a.flac", 6.0)
    bad = tmp_path / "b.flac"
    bad.write_bytes(b"fLaC" + bytes(4096))
    last = _write_clip(tmp_path / "c.flac", 6.0, offset_s=30.0)
    source = audio.FileSource([tmp_path])

    with caplog.at_level(logging.ERROR, logger="dawnchorus.edge.audio"):
        windows = list(source)

    assert [w.source for w in windows] == [str(first)] * 2 + [str(last)] * 2
    assert source.files_read == 2
    assert source.files_rejected == 1
    assert "b.flac" in str(source.errors[0])
    assert any("b.flac" in record.getMessage() for record in caplog.records)


def test_file_source_keeps_windows_before_corruption(tmp_path):
    truncated = _truncated_flac(tmp_path / "truncated.flac")
    source = audio.FileSource([truncated])
    windows = list(source)
    assert len(windows) >= 10
    assert source.files_rejected == 1
    assert source.files_read == 0


def test_file_source_folder_skips_non_audio(tmp_path):
    nested = tmp_path / "site1" / "2024-05-01"
    nested.mkdir(parents=True)
    upper = _write_clip(nested / "DAWN.FLAC", 3.0)
    wav = tmp_path / "b.wav"
    soundfile.write(wav, _soundscape_seconds(3.0), SR)
    (tmp_path / "notes.txt").write_text("wind from the north")
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff")
    (tmp_path / "._b.wav").write_bytes(b"\x00\x05\x16\x07")  # macOS metadata file
    source = audio.FileSource([tmp_path])

    windows = list(source)

    assert [w.source for w in windows] == [str(wav), str(upper)]
    assert source.files_read == 2
    assert source.files_rejected == 0


def test_file_source_missing_path_counted(tmp_path):
    source = audio.FileSource([tmp_path / "nowhere.wav"])
    assert list(source) == []
    assert source.files_rejected == 1


def test_file_source_speed_paces_replay(tmp_path):
    path = _write_clip(tmp_path / "clip.flac", 6.0)
    started = time.time()
    windows = list(audio.FileSource([path], speed=20.0))
    elapsed = time.time() - started
    # 6 s of audio at 20x takes 0.3 s, each window released once played.
    assert elapsed >= 0.29
    assert windows[1].start_time - windows[0].start_time == pytest.approx(0.15, abs=1e-6)


def test_file_source_unpaced_is_fast(tmp_path):
    path = _write_clip(tmp_path / "clip.flac", 30.0)
    started = time.time()
    windows = list(audio.FileSource([path]))
    assert len(windows) == 10
    assert time.time() - started < 2.0


def test_file_source_rejects_bad_speed(tmp_path):
    with pytest.raises(ValueError, match="speed"):
        audio.FileSource([tmp_path], speed=0.0)
