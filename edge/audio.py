"""The recorder's audio front end: files and microphones to 3 s windows of 48 kHz mono.

Every source goes through the same steps: decode in blocks, mix down to mono
(mean over channels), resample to 48 kHz with soxr, and cut into windows of
144,000 samples with BirdNET's rules for the last, partial window. Files are
read block by block, so a recorder never holds a whole 1-hour file in memory.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import pathlib
import struct
import threading
import time
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import soundfile
import soxr

from dawnchorus.models import birdnet

_LOGGER = logging.getLogger(__name__)

SAMPLE_RATE = birdnet.SAMPLE_RATE
WINDOW_SAMPLES = birdnet.WINDOW_SAMPLES
WINDOW_SECONDS = birdnet.WINDOW_SECONDS

# BirdNET-Analyzer's rule for the end of a recording: a last window that
# contains at least 1 s of audio is padded with zeros, a shorter one is dropped.
# Changing it changes the number of windows, so reference scores would no
# longer line up.
MIN_TAIL_SAMPLES = SAMPLE_RATE

AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".mp3", ".opus"})

# Below 8 kHz nothing of most bird song is left (the Nyquist limit is 4 kHz).
# 384 kHz is the highest rate of common ultrasonic recorders (AudioMoth).
# Resampling to 48 kHz removes everything above 24 kHz anyway.
MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 384_000

# BirdNET V2.4's spectrograms reach 15 kHz, and most songbirds sing between
# 1 and 8 kHz. Below 16 kHz (Nyquist limit 8 kHz) a large part of that band is
# missing, and resampling cannot restore it. Such files are still analysed,
# because owls, doves and other low singers remain detectable, but with a
# warning that names the file.
LOW_SAMPLE_RATE = 16_000

# soxr's default quality. tests/test_audio.py checks it against scipy's
# polyphase resampler (correlation above 0.999 at 22.05, 44.1 and 96 kHz).
RESAMPLE_QUALITY = "HQ"

# Frames decoded per read: about 1.4 s at 48 kHz, so memory stays bounded
# whatever the file's length.
_READ_BLOCK_FRAMES = 1 << 16


class AudioError(ValueError):
    """An audio file cannot be used: the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclasses.dataclass
class Window:
    """One 3 s window of 48 kHz mono audio.

    Attributes:
        samples: [144000] float32, zero-padded at the end of a recording.
        source: the file path, or ``mic:<device>`` for a microphone.
        offset_s: start of the window within its source, in seconds.
        start_time: unix time of the first sample: the capture time for a
            microphone, the wall time at which replay of the window started
            for a file.
        duration_s: seconds of audio in the window; less than 3 only for the
            zero-padded last window of a recording.
    """

    samples: np.ndarray
    source: str
    offset_s: float
    start_time: float
    duration_s: float = WINDOW_SECONDS


class _WindowSlice(NamedTuple):
    start_sample: int
    samples: np.ndarray
    valid_samples: int


def _check_overlap(overlap_s: float) -> float:
    overlap_s = float(overlap_s)
    if not 0.0 <= overlap_s < WINDOW_SECONDS:
        raise ValueError(
            f"overlap of {overlap_s} s is invalid: it must be at least 0 and less than "
            f"the window length of {WINDOW_SECONDS} s"
        )
    return overlap_s


class Windower:
    """Cuts a stream of 48 kHz mono samples, pushed in blocks of any size, into windows.

    Windows start every ``3 - overlap_s`` seconds. At the end of the stream,
    ``finish`` gives one zero-padded window if the audio left contains at
    least 1 s (BirdNET-Analyzer's rule) and reaches past the end of the
    previous window. The second condition only matters with overlap: the birdnet
    package (V2.4 reference scores) stops at the first window that reaches
    the end of the stream, instead of adding windows that hold only audio
    already seen.
    """

    def __init__(self, overlap_s: float = 0.0):
        self.overlap_s = _check_overlap(overlap_s)
        self.hop_samples = round((WINDOW_SECONDS - self.overlap_s) * SAMPLE_RATE)
        self._pending = np.zeros(0, dtype=np.float32)
        self._pending_start = 0
        self._covered_until = 0  # stream sample index after the last windowed sample

    def push(self, samples: np.ndarray) -> Iterator[_WindowSlice]:
        """Append samples [n] float32 and yield every window that is now complete."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        self._pending = np.concatenate([self._pending, samples])
        while len(self._pending) >= WINDOW_SAMPLES:
            yield self._take(WINDOW_SAMPLES)

    def finish(self) -> Iterator[_WindowSlice]:
        """Yield the zero-padded window at the end of the stream, if any, then reset."""
        while len(self._pending) >= WINDOW_SAMPLES:
            yield self._take(WINDOW_SAMPLES)
        stream_end = self._pending_start + len(self._pending)
        if len(self._pending) >= MIN_TAIL_SAMPLES and stream_end > self._covered_until:
            yield self._take(len(self._pending))
        self._pending = np.zeros(0, dtype=np.float32)
        self._pending_start = 0
        self._covered_until = 0

    def _take(self, valid_samples: int) -> _WindowSlice:
        window = np.zeros(WINDOW_SAMPLES, dtype=np.float32)
        window[:valid_samples] = self._pending[:valid_samples]
        window_slice = _WindowSlice(self._pending_start, window, valid_samples)
        self._covered_until = self._pending_start + valid_samples

        # The state moves before the caller sees the window, so a caller that
        # stops iterating early leaves the windower consistent.
        self._pending = self._pending[self.hop_samples:]
        self._pending_start += self.hop_samples
        return window_slice


def count_windows(stream_samples: int, overlap_s: float = 0.0) -> int:
    """Return how many windows ``Windower`` cuts from a stream of ``stream_samples`` 48 kHz samples."""
    hop_samples = Windower(overlap_s).hop_samples
    full = (stream_samples - WINDOW_SAMPLES) // hop_samples + 1 if stream_samples >= WINDOW_SAMPLES else 0
    tail_start = full * hop_samples
    tail_samples = stream_samples - tail_start
    covered_until = (full - 1) * hop_samples + WINDOW_SAMPLES if full else 0
    has_tail = tail_samples >= MIN_TAIL_SAMPLES and stream_samples > covered_until
    return full + int(has_tail)


class _Resampler:
    """Streaming soxr resampler to 48 kHz; a pass-through when the rate is already 48 kHz."""

    def __init__(self, input_rate: int):
        self.input_rate = input_rate
        self._stream = None
        if input_rate != SAMPLE_RATE:
            self._stream = soxr.ResampleStream(
                input_rate, SAMPLE_RATE, 1, dtype="float32", quality=RESAMPLE_QUALITY
            )

    def process(self, mono: np.ndarray) -> np.ndarray:
        if self._stream is None:
            return mono
        return self._stream.resample_chunk(mono, last=False)

    def flush(self) -> np.ndarray:
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        return self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)


def _open_sound_file(path: pathlib.Path) -> soundfile.SoundFile:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise AudioError(path, "file not found") from None
    except OSError as error:
        raise AudioError(path, f"cannot be opened ({error.strerror})") from error
    if path.is_dir():
        raise AudioError(path, "is a folder, not an audio file")
    if size == 0:
        raise AudioError(path, "zero length (0 bytes)")

    try:
        sound = soundfile.SoundFile(path)
    except (RuntimeError, OSError) as error:
        if path.suffix.lower() not in AUDIO_EXTENSIONS:
            raise AudioError(
                path,
                f"unsupported format: libsndfile cannot read it ({error}); supported "
                f"extensions are {', '.join(sorted(AUDIO_EXTENSIONS))}",
            ) from error
        raise AudioError(path, f"unreadable or corrupt audio ({error})") from error

    if not MIN_SAMPLE_RATE <= sound.samplerate <= MAX_SAMPLE_RATE:
        sound.close()
        raise AudioError(
            path,
            f"unsupported sample rate {sound.samplerate} Hz: it must be between "
            f"{MIN_SAMPLE_RATE} and {MAX_SAMPLE_RATE} Hz",
        )
    if sound.samplerate < LOW_SAMPLE_RATE:
        _LOGGER.warning(
            "%s: low sample rate %d Hz, so the audio contains nothing above %.1f kHz while BirdNET "
            "listens up to 15 kHz; analysing it, but species that sing higher will be missed",
            path, sound.samplerate, sound.samplerate / 2000,
        )
    if sound.channels > 2:
        _LOGGER.info("%s: mixing %d channels down to mono", path, sound.channels)
    return sound


def _declared_wav_bytes(path: pathlib.Path) -> tuple[int, int] | None:
    """Return the data size that a RIFF/WAVE header declares and the bytes present after it.

    libsndfile reads a truncated WAV file without an error and reports only the
    frames present, so this header check is what detects the truncation. Returns
    None for other formats and for RIFF files without a data chunk.
    """
    with open(path, "rb") as stream:
        if stream.read(12)[:4] != b"RIFF":
            return None
        file_size = path.stat().st_size
        while True:
            chunk_header = stream.read(8)
            if len(chunk_header) < 8:
                return None
            chunk_id, chunk_size = struct.unpack("<4sI", chunk_header)
            if chunk_id == b"data":
                return chunk_size, file_size - stream.tell()
            # Chunks are padded to an even size.
            stream.seek(chunk_size + (chunk_size & 1), os.SEEK_CUR)


def stream_audio(
    path: str | os.PathLike, block_frames: int = _READ_BLOCK_FRAMES
) -> Iterator[np.ndarray]:
    """Decode a file block by block into float32 mono 48 kHz blocks [n].

    The blocks put together equal ``read_audio(path)``. Errors surface as
    ``AudioError`` while iterating, possibly after some blocks were yielded
    (a file corrupt in its middle, NaN samples late in the file).
    """
    path = pathlib.Path(path)
    with _open_sound_file(path) as sound:
        resampler = _Resampler(sound.samplerate)
        frames_read = 0
        while True:
            try:
                block = sound.read(block_frames, dtype="float32", always_2d=True)
            except RuntimeError as error:
                raise AudioError(
                    path,
                    f"unreadable or corrupt audio after {frames_read / sound.samplerate:.1f} s "
                    f"({error})",
                ) from error
            if len(block) == 0:
                break

            finite = np.isfinite(block).all(axis=1)
            if not finite.all():
                first = frames_read + int(np.flatnonzero(~finite)[0])
                raise AudioError(
                    path,
                    f"contains NaN or infinite samples (first at {first / sound.samplerate:.3f} s)",
                )
            frames_read += len(block)

            mono = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0]
            resampled = resampler.process(np.ascontiguousarray(mono))
            if resampled.size:
                yield resampled

        if frames_read == 0:
            raise AudioError(path, "contains no samples")
        _warn_if_truncated(path, sound, frames_read)
        tail = resampler.flush()
        if tail.size:
            yield tail


def _warn_if_truncated(path: pathlib.Path, sound: soundfile.SoundFile, frames_read: int) -> None:
    """Log a warning when the file contains less audio than its header declares."""
    declared_frames = sound.frames
    if sound.format == "WAV":
        declared = _declared_wav_bytes(path)
        if declared is not None:
            declared_bytes, present_bytes = declared
            if declared_bytes > present_bytes > 0:
                declared_frames = round(frames_read * declared_bytes / present_bytes)
    if declared_frames > frames_read:
        _LOGGER.warning(
            "%s: truncated: the header declares %.1f s of audio, the file contains %.1f s; analysing what is there",
            path, declared_frames / sound.samplerate, frames_read / sound.samplerate,
        )


def read_audio(path: str | os.PathLike) -> np.ndarray:
    """Read a whole audio file as float32 mono 48 kHz samples [n].

    Any sample rate from 8 to 384 kHz and any number of channels (mixed down
    by their mean) is accepted, in every format libsndfile reads (wav, flac,
    ogg vorbis and opus, mp3). Files with NaN or infinite samples are rejected
    rather than cleaned, because such values mean a broken recorder or writer.

    Raises:
        AudioError: the file is missing, empty, unreadable or corrupt, in an
            unsupported format or sample rate, without samples, or contains
            NaN or infinite samples.
    """
    blocks = list(stream_audio(path))
    return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)


def audio_duration(path: str | os.PathLike) -> float | None:
    """Return the duration in seconds from the file header, or None if it cannot be read."""
    try:
        info = soundfile.info(str(path))
    except (RuntimeError, OSError):
        return None
    return info.frames / info.samplerate if info.samplerate else None


def find_audio_files(paths: Iterable[str | os.PathLike]) -> list[pathlib.Path]:
    """Expand folders into their audio files (recursive, sorted by path).

    Inside a folder, files whose extension is not one of ``AUDIO_EXTENSIONS``
    (in any case) and hidden files, such as the ``._name.wav`` files macOS
    writes to SD cards, are skipped with an info log line each. Files named explicitly
    are kept whatever their extension, and missing paths are kept so that
    reading them reports the error.
    """
    files: list[pathlib.Path] = []
    for path in map(pathlib.Path, paths):
        if not path.is_dir():
            files.append(path)
            continue
        for candidate in sorted(path.rglob("*")):
            if not candidate.is_file():
                continue
            if candidate.name.startswith("."):
                _LOGGER.info("skipping %s: hidden file", candidate)
            elif candidate.suffix.lower() not in AUDIO_EXTENSIONS:
                _LOGGER.info("skipping %s: not an audio file (extension %r; audio files end in %s)",
                             candidate, candidate.suffix, ", ".join(sorted(AUDIO_EXTENSIONS)))
            else:
                files.append(candidate)
    return files


class FileSource:
    """Replays audio files and folders as windows.

    A file that cannot be read is logged and counted in ``files_rejected``
    (with its error in ``errors``), and replay goes on with the next file.
    Windows yielded before a file turned out to be corrupt in its middle are
    kept.

    Args:
        paths: files and folders; folders are searched recursively.
        overlap_s: overlap of consecutive windows, 0 <= overlap_s < 3.
        speed: None replays as fast as possible, and ``start_time`` is the
            time the window was released. 1.0 replays in real time, 10.0 at
            ten times real time. A paced window is released once the replay
            clock has played all of it, as a microphone would deliver it.
            Its ``start_time`` is on that clock even when the consumer falls
            behind.
    """

    def __init__(
        self,
        paths: Iterable[str | os.PathLike],
        overlap_s: float = 0.0,
        speed: float | None = None,
    ):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [pathlib.Path(path) for path in paths]
        self.overlap_s = _check_overlap(overlap_s)
        if speed is not None and not speed > 0:
            raise ValueError(f"replay speed {speed} is invalid: use a factor above 0, or None")
        self.speed = speed
        self.files_read = 0
        self.files_rejected = 0
        self.errors: list[AudioError] = []

    def __iter__(self) -> Iterator[Window]:
        # The replay clock: the source position 0 s plays at replay_start.
        replay_start = time.time()
        seconds_before_file = 0.0

        for path in find_audio_files(self.paths):
            windower = Windower(self.overlap_s)
            samples_in_file = 0
            try:
                for block in stream_audio(path):
                    samples_in_file += len(block)
                    for piece in windower.push(block):
                        yield self._release(path, piece, replay_start, seconds_before_file)
            except AudioError as error:
                _LOGGER.error("skipping audio file: %s", error)
                self.files_rejected += 1
                self.errors.append(error)
            else:
                for piece in windower.finish():
                    yield self._release(path, piece, replay_start, seconds_before_file)
                if samples_in_file < MIN_TAIL_SAMPLES:
                    _LOGGER.warning("%s: only %.2f s of audio, shorter than the 1 s a window needs, so "
                                    "it gives no window", path, samples_in_file / SAMPLE_RATE)
                self.files_read += 1

            # A file rejected halfway still advances the replay clock, so
            # start times never run backwards.
            seconds_before_file += samples_in_file / SAMPLE_RATE

    def _release(
        self, path: pathlib.Path, piece: _WindowSlice, replay_start: float, seconds_before_file: float
    ) -> Window:
        """Build the window and, when paced, sleep until the replay clock has played all of it."""
        offset_s = piece.start_sample / SAMPLE_RATE
        duration_s = piece.valid_samples / SAMPLE_RATE
        if self.speed is None:
            start_time = time.time()
        else:
            start_time = replay_start + (seconds_before_file + offset_s) / self.speed
            delay = start_time + duration_s / self.speed - time.time()
            if delay > 0:
                time.sleep(delay)
        return Window(
            samples=piece.samples,
            source=str(path),
            offset_s=offset_s,
            start_time=start_time,
            duration_s=duration_s,
        )


# A device that overflows keeps overflowing; one warning a minute keeps the log readable.
_OVERFLOW_LOG_INTERVAL_S = 60.0


class _CaptureClock:
    """Maps a sample index of a capture stream to the unix time it was captured.

    Each block read from the device is anchored at the wall time the read
    returned minus the block's duration. Anchoring every block, rather than
    only the first, keeps times right when the sound card's clock drifts
    against the system clock over weeks of capture.
    """

    def __init__(self) -> None:
        self._anchors: collections.deque[tuple[int, float]] = collections.deque()

    def add_block(self, first_sample: int, frames: int, samplerate: float, read_time: float) -> None:
        self._anchors.append((first_sample, read_time - frames / samplerate))

    def time_of(self, sample: int, samplerate: float) -> float:
        while len(self._anchors) > 1 and self._anchors[1][0] <= sample:
            self._anchors.popleft()
        first_sample, first_time = self._anchors[0]
        return first_time + (sample - first_sample) / samplerate


class MicrophoneSource:
    """Captures windows from a sound card through PortAudio (sounddevice).

    Capture is int16, because float32 capture was seen to corrupt the data
    of an ALSA file device, which int16 captured bit-exactly. Audio is mixed down to mono and resampled to 48 kHz when
    the device runs at another rate. A source is iterated once. ``close``
    (from any thread) or ``max_seconds`` ends the iteration, and the audio
    captured last is windowed with the same end rule as a file.

    Args:
        device: a sounddevice device index or name (a unique substring of
            it); None takes the system default input.
        samplerate: device sample rate in Hz.
        channels: channels to capture; they are averaged.
        overlap_s: overlap of consecutive windows, 0 <= overlap_s < 3.
        block_seconds: seconds per blocking read; also the longest delay
            before ``close`` takes effect.
        max_seconds: stop after this many seconds of captured audio (None:
            until closed).
    """

    def __init__(
        self,
        device: int | str | None = None,
        samplerate: int = SAMPLE_RATE,
        channels: int = 1,
        overlap_s: float = 0.0,
        block_seconds: float = 0.5,
        max_seconds: float | None = None,
    ):
        if not MIN_SAMPLE_RATE <= samplerate <= MAX_SAMPLE_RATE:
            raise ValueError(
                f"sample rate {samplerate} Hz is invalid: use {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz"
            )
        if channels < 1:
            raise ValueError(f"channels={channels} is invalid: capture at least 1 channel")
        if not block_seconds > 0:
            raise ValueError(f"block_seconds={block_seconds} is invalid: use a duration above 0")
        if max_seconds is not None and not max_seconds > 0:
            raise ValueError(f"max_seconds={max_seconds} is invalid: use a duration above 0, or None")
        self.device = device
        self.samplerate = int(samplerate)
        self.channels = int(channels)
        self.overlap_s = _check_overlap(overlap_s)
        self.block_frames = max(1, round(block_seconds * self.samplerate))
        self.max_seconds = max_seconds
        self.source = f"mic:{'default' if device is None else device}"
        self.overflows = 0
        self._closed = threading.Event()

    def close(self) -> None:
        """Stop capturing; the iteration ends after the current block."""
        self._closed.set()

    def __enter__(self) -> MicrophoneSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Window]:
        # Imported here because the import fails without the PortAudio
        # library, which file replay does not need.
        import sounddevice

        windower = Windower(self.overlap_s)
        resampler = _Resampler(self.samplerate)
        clock = _CaptureClock()
        frames_limit = None if self.max_seconds is None else round(self.max_seconds * self.samplerate)
        frames_captured = 0
        last_overflow_log = -float("inf")

        _LOGGER.info(
            "opening %s at %d Hz, %d channel(s), int16", self.source, self.samplerate, self.channels
        )
        with sounddevice.InputStream(
            device=self.device,
            samplerate=self.samplerate,
            channels=self.channels,
            dtype="int16",
            blocksize=self.block_frames,
        ) as stream:
            while not self._closed.is_set():
                frames = self.block_frames
                if frames_limit is not None:
                    frames = min(frames, frames_limit - frames_captured)
                    if frames <= 0:
                        break
                block, overflowed = stream.read(frames)
                read_time = time.time()
                if overflowed:
                    self.overflows += 1
                    if read_time - last_overflow_log >= _OVERFLOW_LOG_INTERVAL_S:
                        _LOGGER.warning(
                            "%s: input overflow, audio was lost (%d overflows so far)",
                            self.source, self.overflows,
                        )
                        last_overflow_log = read_time

                clock.add_block(frames_captured, len(block), self.samplerate, read_time)
                frames_captured += len(block)
                # int16 / 32768 is exact in float32, so 48 kHz mono capture is bit-exact.
                if block.shape[1] == 1:
                    mono = block[:, 0].astype(np.float32) / 32768.0
                else:
                    mono = block.astype(np.float32).mean(axis=1, dtype=np.float32) / 32768.0
                resampled = resampler.process(np.ascontiguousarray(mono))
                for piece in windower.push(resampled):
                    yield self._window(piece, clock)
        _LOGGER.info("closed %s after %.1f s of audio", self.source, frames_captured / self.samplerate)

        tail = resampler.flush()
        for piece in windower.push(tail):
            yield self._window(piece, clock)
        for piece in windower.finish():
            yield self._window(piece, clock)

    def _window(self, piece: _WindowSlice, clock: _CaptureClock) -> Window:
        device_sample = round(piece.start_sample * self.samplerate / SAMPLE_RATE)
        return Window(
            samples=piece.samples,
            source=self.source,
            offset_s=piece.start_sample / SAMPLE_RATE,
            start_time=clock.time_of(device_sample, self.samplerate),
            duration_s=piece.valid_samples / SAMPLE_RATE,
        )
