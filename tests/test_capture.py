"""Tests of microphone capture through PortAudio, with an ALSA device that plays a real recording.

The machine running the tests needs no sound card. An ``.asoundrc`` defines
an ALSA ``file`` device whose ``infile`` is raw s16le audio, wrapped in a
``plug`` device that PortAudio lists. PortAudio reads ``.asoundrc`` from
``HOME`` when it initialises, so each capture runs in a subprocess with
``HOME`` set to the test's temporary folder. The device returns stale data
past the end of the file, so every capture is shorter than the file.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile
import soxr

from dawnchorus.edge import audio

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
SOUNDSCAPE = DATA / "soundscapes" / "birdnet-example" / "soundscape.flac"
STEREO_44KHZ = DATA / "focal" / "microfaune" / "gobemouche_noir.flac"

pytestmark = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"real recordings not found at {DATA} (clone shared/ beside the repo)"
)

DEVICE = "dawnchorus_capture"

ASOUNDRC = """\
pcm.dawnchorus_raw_file {{
    type file
    slave.pcm "null"
    file "/dev/null"
    infile "{infile}"
    format "raw"
}}
pcm.{device} {{
    type plug
    slave {{
        pcm "dawnchorus_raw_file"
        format S16_LE
        rate {rate}
        channels {channels}
    }}
    hint {{
        show on
        description "raw s16le file played as a capture device"
    }}
}}
"""

# Runs in the subprocess: list the devices, capture int16 with a plain
# InputStream, then capture windows with MicrophoneSource, and save both.
CAPTURE_SCRIPT = textwrap.dedent("""\
    import json, sys
    import numpy as np
    import sounddevice
    from dawnchorus.edge.audio import MicrophoneSource

    device, rate, channels, frames, seconds, out = sys.argv[1:]
    rate, channels, frames, seconds = int(rate), int(channels), int(frames), float(seconds)
    names = [entry["name"] for entry in sounddevice.query_devices()]
    if not any(device in name for name in names):
        print(json.dumps(names))
        sys.exit(3)

    with sounddevice.InputStream(device=device, samplerate=rate, channels=channels, dtype="int16") as stream:
        raw, _ = stream.read(frames)

    source = MicrophoneSource(device=device, samplerate=rate, channels=channels, max_seconds=seconds)
    windows = list(source)
    np.savez(
        out,
        raw=raw,
        samples=np.stack([w.samples for w in windows]),
        offsets=np.array([w.offset_s for w in windows]),
        durations=np.array([w.duration_s for w in windows]),
        start_times=np.array([w.start_time for w in windows]),
        sources=np.array([w.source for w in windows]),
    )
""")


def _capture(
    tmp_path: pathlib.Path, pcm: np.ndarray, rate: int, frames: int, seconds: float
) -> dict[str, np.ndarray]:
    """Play ``pcm`` (int16 [frames, channels]) through the ALSA file device and capture it."""
    pytest.importorskip("sounddevice", reason="sounddevice needs the libportaudio2 system package")
    infile = tmp_path / "input.s16le"
    pcm.astype("<i2").tofile(infile)
    (tmp_path / ".asoundrc").write_text(
        ASOUNDRC.format(infile=infile, device=DEVICE, rate=rate, channels=pcm.shape[1])
    )
    out = tmp_path / "captured.npz"
    environment = {**os.environ, "HOME": str(tmp_path)}

    result = subprocess.run(
        [sys.executable, "-c", CAPTURE_SCRIPT, DEVICE, str(rate), str(pcm.shape[1]), str(frames),
         str(seconds), str(out)],
        env=environment, capture_output=True, text=True, timeout=120, check=False,
    )

    assert result.returncode != 3, f"PortAudio does not list {DEVICE}; devices: {result.stdout}"
    assert result.returncode == 0, result.stderr[-2000:]
    with np.load(out) as captured:
        return {name: captured[name] for name in captured.files}


def test_capture_raw_int16_bit_exact(tmp_path):
    pcm, rate = soundfile.read(SOUNDSCAPE, dtype="int16", frames=20 * 48000, always_2d=True)
    frames = 5 * rate

    captured = _capture(tmp_path, pcm, rate, frames=frames, seconds=7.0)

    assert captured["raw"].dtype == np.int16
    assert captured["raw"].shape == (frames, 1)
    assert np.array_equal(captured["raw"], pcm[:frames])


def test_capture_microphone_windows_bit_exact(tmp_path):
    pcm, rate = soundfile.read(SOUNDSCAPE, dtype="int16", frames=20 * 48000, always_2d=True)

    captured = _capture(tmp_path, pcm, rate, frames=rate, seconds=7.0)

    # 7 s of capture: full windows at 0 s and 3 s, and a padded one with 1 s at 6 s.
    samples = captured["samples"]
    expected = pcm[:, 0].astype(np.float32) / 32768.0
    assert captured["offsets"].tolist() == [0.0, 3.0, 6.0]
    assert captured["durations"].tolist() == [3.0, 3.0, 1.0]
    assert np.array_equal(samples[0], expected[:144000])
    assert np.array_equal(samples[1], expected[144000:288000])
    assert np.array_equal(samples[2][:48000], expected[288000:336000])
    assert not samples[2][48000:].any()
    assert set(captured["sources"].tolist()) == {f"mic:{DEVICE}"}
    assert np.all(np.diff(captured["start_times"]) > 0)


def test_capture_microphone_resamples_44khz_stereo(tmp_path):
    pcm, rate = soundfile.read(STEREO_44KHZ, dtype="int16", always_2d=True)
    assert rate == 44100
    assert pcm.shape[1] == 2

    captured = _capture(tmp_path, pcm, rate, frames=rate, seconds=6.0)

    # The reference is the same mix-down and resampler applied to the whole
    # 6 s at once: streaming in blocks must not change the result.
    mono = pcm[: 6 * rate].astype(np.float32).mean(axis=1, dtype=np.float32) / 32768.0
    reference = soxr.resample(mono, rate, 48000, quality=audio.RESAMPLE_QUALITY)
    samples = captured["samples"]
    assert captured["offsets"].tolist() == [0.0, 3.0]
    assert len(reference) == 2 * 144000
    assert np.abs(samples[0] - reference[:144000]).max() < 1e-5
    assert np.abs(samples[1] - reference[144000:]).max() < 1e-5
