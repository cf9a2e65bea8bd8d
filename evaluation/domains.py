"""Benchmark domains: labeled 3 s windows built from real recordings, described by TOML specs.

A mixed domain ("mixed", the default kind) puts focal clips into real
backgrounds. Each window is a 3 s crop of a background recording, scaled to a
drawn level, plus 0 to 3 focal events. An event is a crop of a focal clip
placed at a random position in the window, optionally low-pass filtered to
imitate distance, and scaled to a drawn signal-to-noise ratio:

    snr_db = 20 * log10(rms(event crop as mixed) / rms(background window as mixed))

where the event RMS is taken over the event's own samples (after filter, fades
and gain) and the background RMS over the whole 3 s background crop after its
gain. Every draw is stored in a JSON-lines manifest, and ``rebuild_window``
renders a window from its manifest entry alone with the same code that built
it, so a rebuild is bit-exact.

Background screening: a background may contain the domain's own species (a
dawn chorus file, a park). Each background file is cut into candidate 3 s
windows every ``screening.hop_seconds``. The source BirdNET model scores every
candidate, and a candidate whose sigmoid score for any focal species of the
domain is at least ``screening.threshold`` is dropped. Mixed windows draw their
background crops only from the surviving candidates. The stats JSON lists every
dropped candidate with its best focal species and score.

An annotated domain ("annotated") cuts one real recording into 3 s windows.
The last one is zero-padded, and kept if it contains at least 1 s of audio.
Each window is labeled with every species whose annotation box overlaps it by
at least ``min_overlap`` times the shorter of the box and the window.

``build_domain`` writes, under ``<cache>/<name>/``: ``manifest.jsonl``,
``classes.txt``, ``stats.json`` and ``embeddings-<hash>.npy``, whose hash is
the manifest's sha256, so a rebuild with an unchanged manifest reuses them.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import pathlib
import re
import time
import tomllib
from typing import Any, Callable, Sequence

import numpy as np
import scipy.signal

from dawnchorus.edge.audio import AudioError, read_audio
from dawnchorus.edge.progress import progress_bar
from dawnchorus.models import birdnet
from dawnchorus.models.species import Location, SpeciesListError, species_from_range_model

_LOGGER = logging.getLogger(__name__)

SAMPLE_RATE = 48_000
WINDOW_SECONDS = 3.0
WINDOW_SAMPLES = 144_000

# Like BirdNET-Analyzer, a last partial window is kept (zero-padded) when it contains at least 1 s.
_MIN_TAIL_SAMPLES = SAMPLE_RATE

# A raised-cosine fade of 10 ms at both ends of each event crop: without it
# the cut edges are broadband clicks that BirdNET could use as a cue.
_FADE_SAMPLES = 480

# Event crops start on a grid of 0.5 s inside their clip. A crop is counted
# as reused when an event starts on the same grid point of the same clip.
_CROP_GRID_SAMPLES = 24_000

# Activity check for event crops: frame energy above 300 Hz in 50 ms frames.
# The high-pass removes wind and handling rumble but keeps dove and heron
# calls, which a cut at 1.2 kHz left without any active crop. A crop must be
# at least 6 dB above the clip's 20th-percentile frame.
_ACTIVITY_HIGHPASS_HZ = 300.0
_ACTIVITY_FRAME_SAMPLES = 2_400
_ACTIVITY_MARGIN_DB = 6.0

_FOCAL_FORMATS = ("phoebe", "bird-radio", "microfaune")
_ANNOTATION_FORMATS = ("csv", "raven")
_EMBED_BATCH = 64


class DomainSpecError(ValueError):
    """An invalid benchmark domain spec: the message names the key and the fix."""


# ---------------------------------------------------------------------------
# Spec


@dataclasses.dataclass(frozen=True)
class SiteSpec:
    """Location and week of the domain, for the range-model species list.

    Attributes:
        latitude, longitude: degrees.
        week: BirdNET week, 1 to 48, or -1 for the whole year.
        range_threshold: minimum range-model occurrence score of a class.
    """

    latitude: float
    longitude: float
    week: int
    range_threshold: float = 0.03


@dataclasses.dataclass(frozen=True)
class FocalSpec:
    """A folder of focal clips and the format of its label file.

    Attributes:
        format: "phoebe" (app_data.json), "bird-radio" (data/clips.json) or
            "microfaune" (species_map_fr_to_birdnet.csv).
        path: folder relative to the data root.
    """

    format: str
    path: str


@dataclasses.dataclass(frozen=True)
class BackgroundSpec:
    """A folder of background recordings.

    Attributes:
        path: folder relative to the data root.
        glob: file pattern inside it.
        night_hours: (start, end) hours, end exclusive and wrapping over
            midnight, matched against the HHMMSS in each file name; None keeps
            every file.
        kind: kind of background given to files without a more specific one.
        kind_column: column of the folder's tags.csv that names each file's kind.
        kind_keywords: substring of a file name -> kind, used before ``kind``.
    """

    path: str
    glob: str = "*.flac"
    night_hours: tuple[int, int] | None = None
    kind: str = "unknown"
    kind_column: str | None = None
    kind_keywords: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class MixingSpec:
    """Parameters of the window mixing.

    Attributes:
        windows: number of windows.
        event_count_weights: relative probability of 0, 1, 2, 3 events in a window.
        snr_db: (min, max) event SNR, uniform.
        event_seconds: (min, max) event length, uniform.
        background_dbfs: (min, max) RMS level of the background window, uniform.
        max_background_gain_db: upper limit of the background gain, so that
            near-silent room tone is not raised into amplified quantisation noise.
        lowpass_share: probability that an event is low-pass filtered.
        lowpass_hz: (min, max) cutoff, log-uniform.
        lowpass_order: Butterworth order.
        zipf_exponent: species weights are rank ** -zipf_exponent over a
            seeded random ranking; 0 gives equal weights.
        max_events_per_recording: cap on events from one source recording.
        max_crop_uses: cap on events that start on the same 0.5 s grid point of a clip.
    """

    windows: int = 1200
    event_count_weights: tuple[float, ...] = (0.15, 0.45, 0.28, 0.12)
    snr_db: tuple[float, float] = (-12.0, 6.0)
    event_seconds: tuple[float, float] = (1.0, 3.0)
    background_dbfs: tuple[float, float] = (-45.0, -25.0)
    max_background_gain_db: float = 40.0
    lowpass_share: float = 0.3
    lowpass_hz: tuple[float, float] = (1500.0, 6000.0)
    lowpass_order: int = 4
    zipf_exponent: float = 1.0
    max_events_per_recording: int = 50
    max_crop_uses: int = 6


@dataclasses.dataclass(frozen=True)
class ScreeningSpec:
    """Background screening with the source model.

    Attributes:
        threshold: candidates with a focal-species sigmoid score at or above it are dropped.
        hop_seconds: spacing of candidate background windows.
    """

    threshold: float = 0.5
    hop_seconds: float = 1.0


@dataclasses.dataclass(frozen=True)
class AnnotatedSpec:
    """A real recording with annotation boxes.

    Attributes:
        recording: audio file relative to the data root.
        annotations: CSV or Raven selection table relative to the data root.
        format: "csv" (comma-separated) or "raven" (tab-separated selection table).
        start_column, end_column, label_column: column names; times in seconds.
        labels: annotation code -> BirdNET label. Codes not listed are ignored.
        min_overlap: fraction of min(box length, window length) a box must
            overlap a window to label it.
        background_kind: kind of background for every window.
    """

    recording: str
    annotations: str
    labels: dict[str, str]
    format: str = "csv"
    start_column: str = "start.time"
    end_column: str = "end.time"
    label_column: str = "name"
    min_overlap: float = 0.25
    background_kind: str = "field"


@dataclasses.dataclass(frozen=True)
class DomainSpec:
    """A benchmark domain.

    Attributes:
        name: used as the cache folder name.
        kind: "mixed" or "annotated".
        site: location and week of the range-model species list.
        seed: seed of every random draw.
        focal, background, mixing, screening: for mixed domains.
        annotated: for annotated domains.
    """

    name: str
    kind: str
    site: SiteSpec
    seed: int = 0
    focal: tuple[FocalSpec, ...] = ()
    background: tuple[BackgroundSpec, ...] = ()
    mixing: MixingSpec = MixingSpec()
    screening: ScreeningSpec = ScreeningSpec()
    annotated: AnnotatedSpec | None = None


def _fail(key: str, problem: str, fix: str) -> DomainSpecError:
    return DomainSpecError(f"{key}: {problem} ({fix})")


def _take(table: dict[str, Any], key: str, prefix: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    full = f"{prefix}{key}"
    if key not in table:
        if default is ...:
            raise _fail(full, "missing", f"add `{key} = ...` to the spec")
        return default
    value = table.pop(key)
    accepted = kind if isinstance(kind, tuple) else (kind,)
    if float in accepted and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and bool not in accepted or not isinstance(value, accepted):
        names = " or ".join(k.__name__ for k in accepted)
        raise _fail(full, f"{value!r} is a {type(value).__name__}", f"give a {names}")
    return value


def _take_range(table: dict[str, Any], key: str, prefix: str, default: tuple[float, float],
                low: float = -math.inf, high: float = math.inf) -> tuple[float, float]:
    full = f"{prefix}{key}"
    value = _take(table, key, prefix, list, list(default))
    if len(value) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise _fail(full, f"{value!r} is not a pair of numbers", "give [min, max]")
    first, second = float(value[0]), float(value[1])
    if first > second:
        raise _fail(full, f"min {first} is above max {second}", "give [min, max] in that order")
    if first < low or second > high:
        raise _fail(full, f"{value!r} is outside [{low}, {high}]", f"keep both ends within [{low}, {high}]")
    return first, second


def _reject_unknown(table: dict[str, Any], prefix: str, known: Sequence[str]) -> None:
    if table:
        key = sorted(table)[0]
        raise _fail(f"{prefix}{key}", "unknown key", f"use one of {', '.join(known)} or remove it")


def _parse_site(table: dict[str, Any]) -> SiteSpec:
    known = ("latitude", "longitude", "week", "range_threshold")
    site = SiteSpec(
        latitude=_take(table, "latitude", "site.", float),
        longitude=_take(table, "longitude", "site.", float),
        week=_take(table, "week", "site.", int),
        range_threshold=_take(table, "range_threshold", "site.", float, 0.03),
    )
    _reject_unknown(table, "site.", known)
    try:
        Location(site.latitude, site.longitude, site.week)
    except SpeciesListError as error:
        raise _fail("site", str(error), "fix latitude, longitude or week") from error
    if not 0.0 <= site.range_threshold < 1.0:
        raise _fail("site.range_threshold", f"{site.range_threshold} is outside [0, 1)", "give e.g. 0.03")
    return site


def _parse_focal(entries: list[Any]) -> tuple[FocalSpec, ...]:
    parsed = []
    for i, entry in enumerate(entries):
        prefix = f"focal[{i}]."
        if not isinstance(entry, dict):
            raise _fail(f"focal[{i}]", "is not a table", "write it as [[focal]] with format and path")
        table = dict(entry)
        focal = FocalSpec(format=_take(table, "format", prefix, str), path=_take(table, "path", prefix, str))
        _reject_unknown(table, prefix, ("format", "path"))
        if focal.format not in _FOCAL_FORMATS:
            raise _fail(prefix + "format", f"{focal.format!r} is unknown", f"use one of {', '.join(_FOCAL_FORMATS)}")
        parsed.append(focal)
    return tuple(parsed)


def _parse_background(entries: list[Any]) -> tuple[BackgroundSpec, ...]:
    known = ("path", "glob", "night_hours", "kind", "kind_column", "kind_keywords")
    parsed = []
    for i, entry in enumerate(entries):
        prefix = f"background[{i}]."
        if not isinstance(entry, dict):
            raise _fail(f"background[{i}]", "is not a table", "write it as [[background]] with a path")
        table = dict(entry)
        path = _take(table, "path", prefix, str)
        glob = _take(table, "glob", prefix, str, "*.flac")
        hours = _take(table, "night_hours", prefix, list, None)
        if hours is not None:
            if len(hours) != 2 or not all(isinstance(h, int) and 0 <= h <= 24 for h in hours):
                raise _fail(prefix + "night_hours", f"{hours!r} is not two hours 0-24",
                            "give [start, end], e.g. [20, 6] for 20:00 to 06:00")
            hours = (hours[0], hours[1])
        kind = _take(table, "kind", prefix, str, "unknown")
        kind_column = _take(table, "kind_column", prefix, str, None)
        keywords = _take(table, "kind_keywords", prefix, dict, {})
        if not all(isinstance(v, str) for v in keywords.values()):
            raise _fail(prefix + "kind_keywords", "has a value that is not a string", "map substrings to kind names")
        _reject_unknown(table, prefix, known)
        parsed.append(BackgroundSpec(path, glob, hours, kind, kind_column, dict(keywords)))
    return tuple(parsed)


def _parse_mixing(table: dict[str, Any]) -> MixingSpec:
    prefix = "mixing."
    defaults = MixingSpec()

    windows = _take(table, "windows", prefix, int, defaults.windows)
    if windows < 1:
        raise _fail(prefix + "windows", f"{windows} is below 1", "give a positive number of windows")
    weights = _take(table, "event_count_weights", prefix, list, list(defaults.event_count_weights))
    if (not 1 <= len(weights) <= 4 or not all(isinstance(w, (int, float)) and w >= 0 for w in weights)
            or sum(weights) <= 0):
        raise _fail(prefix + "event_count_weights", f"{weights!r} is invalid",
                    "give 1 to 4 non-negative weights for 0, 1, 2, 3 events, not all zero")

    snr = _take_range(table, "snr_db", prefix, defaults.snr_db)
    event_seconds = _take_range(table, "event_seconds", prefix, defaults.event_seconds, 0.1, WINDOW_SECONDS)
    background_dbfs = _take_range(table, "background_dbfs", prefix, defaults.background_dbfs, -120.0, 0.0)
    max_gain = _take(table, "max_background_gain_db", prefix, float, defaults.max_background_gain_db)

    share = _take(table, "lowpass_share", prefix, float, defaults.lowpass_share)
    if not 0.0 <= share <= 1.0:
        raise _fail(prefix + "lowpass_share", f"{share} is outside [0, 1]", "give a probability")
    lowpass_hz = _take_range(table, "lowpass_hz", prefix, defaults.lowpass_hz, 20.0, SAMPLE_RATE / 2 - 1)
    order = _take(table, "lowpass_order", prefix, int, defaults.lowpass_order)
    if not 1 <= order <= 12:
        raise _fail(prefix + "lowpass_order", f"{order} is outside 1-12", "give e.g. 4")

    zipf = _take(table, "zipf_exponent", prefix, float, defaults.zipf_exponent)
    if zipf < 0:
        raise _fail(prefix + "zipf_exponent", f"{zipf} is negative", "give 0 (balanced) or more")

    per_recording = _take(table, "max_events_per_recording", prefix, int, defaults.max_events_per_recording)
    crop_uses = _take(table, "max_crop_uses", prefix, int, defaults.max_crop_uses)
    for key, value in (("max_events_per_recording", per_recording), ("max_crop_uses", crop_uses)):
        if value < 1:
            raise _fail(prefix + key, f"{value} is below 1", "give a positive cap")

    _reject_unknown(table, prefix, [f.name for f in dataclasses.fields(MixingSpec)])
    return MixingSpec(windows, tuple(float(w) for w in weights), snr, event_seconds, background_dbfs,
                      max_gain, share, lowpass_hz, order, zipf, per_recording, crop_uses)


def _parse_screening(table: dict[str, Any]) -> ScreeningSpec:
    prefix = "screening."
    threshold = _take(table, "threshold", prefix, float, 0.5)
    hop = _take(table, "hop_seconds", prefix, float, 1.0)
    _reject_unknown(table, prefix, ("threshold", "hop_seconds"))
    if not 0.0 < threshold <= 1.0:
        raise _fail(prefix + "threshold", f"{threshold} is outside (0, 1]", "give a sigmoid score, e.g. 0.5")
    if not 0.1 <= hop <= WINDOW_SECONDS:
        raise _fail(prefix + "hop_seconds", f"{hop} is outside [0.1, 3]", "give e.g. 1.0")
    return ScreeningSpec(threshold, hop)


def _parse_annotated(table: dict[str, Any]) -> AnnotatedSpec:
    prefix = "annotated."
    recording = _take(table, "recording", prefix, str)
    annotations = _take(table, "annotations", prefix, str)
    labels = _take(table, "labels", prefix, dict)
    if not labels or not all(isinstance(v, str) for v in labels.values()):
        raise _fail(prefix + "labels", "is empty or has a non-string label",
                    'map each annotation code to a BirdNET label, e.g. OVEN = "Seiurus aurocapilla_Ovenbird"')
    fmt = _take(table, "format", prefix, str, "csv")
    if fmt not in _ANNOTATION_FORMATS:
        raise _fail(prefix + "format", f"{fmt!r} is unknown", "use csv or raven")
    raven = fmt == "raven"
    start_column = _take(table, "start_column", prefix, str, "Begin Time (s)" if raven else "start.time")
    end_column = _take(table, "end_column", prefix, str, "End Time (s)" if raven else "end.time")
    label_column = _take(table, "label_column", prefix, str, "Annotation" if raven else "name")
    min_overlap = _take(table, "min_overlap", prefix, float, 0.25)
    if not 0.0 < min_overlap <= 1.0:
        raise _fail(prefix + "min_overlap", f"{min_overlap} is outside (0, 1]", "give a fraction, e.g. 0.25")
    background_kind = _take(table, "background_kind", prefix, str, "field")
    _reject_unknown(table, prefix, [f.name for f in dataclasses.fields(AnnotatedSpec)])
    return AnnotatedSpec(recording, annotations, dict(labels), fmt, start_column, end_column, label_column,
                         min_overlap, background_kind)


def parse_spec(text: str) -> DomainSpec:
    """Parse and validate a domain spec from TOML text.

    Raises:
        DomainSpecError: invalid TOML, a missing, unknown or invalid key; the
            message starts with the key.
    """
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise DomainSpecError(f"spec is not valid TOML: {error}") from error

    name = _take(table, "name", "", str)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise _fail("name", f"{name!r} is not usable as a folder name", "use letters, digits, '.', '_' and '-'")
    kind = _take(table, "kind", "", str, "mixed")
    if kind not in ("mixed", "annotated"):
        raise _fail("kind", f"{kind!r} is unknown", "use mixed or annotated")
    seed = _take(table, "seed", "", int, 0)
    site = _parse_site(dict(_take(table, "site", "", dict)))

    if kind == "annotated":
        annotated = _parse_annotated(dict(_take(table, "annotated", "", dict)))
        _reject_unknown(table, "", ("name", "kind", "seed", "site", "annotated"))
        return DomainSpec(name, kind, site, seed, annotated=annotated)

    focal = _parse_focal(_take(table, "focal", "", list))
    if not focal:
        raise _fail("focal", "is empty", "add at least one [[focal]] table")
    background = _parse_background(_take(table, "background", "", list))
    if not background:
        raise _fail("background", "is empty", "add at least one [[background]] table")
    mixing = _parse_mixing(dict(_take(table, "mixing", "", dict, {})))
    screening = _parse_screening(dict(_take(table, "screening", "", dict, {})))
    _reject_unknown(table, "", ("name", "kind", "seed", "site", "focal", "background", "mixing", "screening"))
    return DomainSpec(name, kind, site, seed, focal, background, mixing, screening)


def load_spec(path: str | pathlib.Path) -> DomainSpec:
    """Read and validate a domain spec file (see ``parse_spec``)."""
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise DomainSpecError(f"cannot read domain spec {path}: {error.strerror}") from error
    try:
        return parse_spec(text)
    except DomainSpecError as error:
        raise DomainSpecError(f"{path}: {error}") from error


def default_data_root() -> pathlib.Path:
    """Return the default root of the paths in specs.

    $DAWNCHORUS_DATA if set, else ``../shared/data`` beside the repository
    (for an editable install), else ``../shared/data`` from the working directory.
    """
    if "DAWNCHORUS_DATA" in os.environ:
        return pathlib.Path(os.environ["DAWNCHORUS_DATA"])
    beside_repository = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if beside_repository.is_dir():
        return beside_repository
    return pathlib.Path.cwd().parent / "shared" / "data"


# ---------------------------------------------------------------------------
# Focal clips and backgrounds


@dataclasses.dataclass(frozen=True)
class FocalClip:
    """One focal clip: ``file`` relative to the data root, its BirdNET ``label``
    and ``recording``, the id of the source recording (e.g. ``xc:536501``)."""

    file: str
    label: str
    recording: str


@dataclasses.dataclass(frozen=True)
class BackgroundFile:
    """One background recording: ``file`` relative to the data root and its ``kind``."""

    file: str
    kind: str


def _label_by_scientific_name(labels: Sequence[str]) -> dict[str, str]:
    return {birdnet.split_label(label)[0]: label for label in labels}


def _focal_phoebe(root: pathlib.Path, folder: str, by_scientific: dict[str, str]) -> list[FocalClip]:
    data = json.loads((root / folder / "app_data.json").read_text(encoding="utf-8"))
    clips = []
    for scientific, entries in data.items():
        if scientific not in by_scientific:
            _LOGGER.warning("%s: %s is not a BirdNET species, its clips are skipped", folder, scientific)
            continue
        for entry in entries:
            clips.append(FocalClip(f"{folder}/clips/{entry['file_name']}", by_scientific[scientific],
                                   f"xc:{entry['recording_id']}"))
    return clips


def _focal_bird_radio(root: pathlib.Path, folder: str, by_scientific: dict[str, str]) -> list[FocalClip]:
    data = json.loads((root / folder / "data" / "clips.json").read_text(encoding="utf-8"))
    clips = []
    for entry in data["clips"]:
        scientific = entry["scientific_name"]
        if scientific not in by_scientific:
            _LOGGER.warning("%s: %s is not a BirdNET species, clip %s is skipped", folder, scientific, entry["clip_id"])
            continue
        clips.append(FocalClip(f"{folder}/{entry['processed_file']}", by_scientific[scientific], f"xc:{entry['xc_id']}"))
    return clips


def _focal_microfaune(root: pathlib.Path, folder: str, labels: set[str]) -> list[FocalClip]:
    with open(root / folder / "species_map_fr_to_birdnet.csv", encoding="utf-8", newline="") as handle:
        mapping = {row["file_stem"]: row["birdnet_label"] for row in csv.DictReader(handle)}
    clips = []
    for path in sorted((root / folder).iterdir()):
        if path.suffix.lower() not in (".flac", ".wav", ".mp3", ".ogg"):
            continue
        label = mapping.get(path.stem)
        if label is None or label not in labels:
            _LOGGER.warning("%s: %s has no BirdNET label in the species map, skipped", folder, path.name)
            continue
        clips.append(FocalClip(f"{folder}/{path.name}", label, f"microfaune:{path.stem}"))
    return clips


def list_focal_clips(spec: DomainSpec, data_root: pathlib.Path, labels: Sequence[str]) -> list[FocalClip]:
    """List the focal clips of all ``spec.focal`` folders with their BirdNET labels."""
    by_scientific = _label_by_scientific_name(labels)
    clips: list[FocalClip] = []
    for i, focal in enumerate(spec.focal):
        if not (data_root / focal.path).is_dir():
            raise _fail(f"focal[{i}].path", f"{data_root / focal.path} is not a folder",
                        "give a folder relative to the data root, or pass --data-root")
        if focal.format == "phoebe":
            clips += _focal_phoebe(data_root, focal.path, by_scientific)
        elif focal.format == "bird-radio":
            clips += _focal_bird_radio(data_root, focal.path, by_scientific)
        else:
            clips += _focal_microfaune(data_root, focal.path, set(labels))
    return clips


def _file_hour(name: str) -> int | None:
    stamps = re.findall(r"(?<!\d)(\d{2})(\d{2})(\d{2})(?!\d)", name)
    return int(stamps[-1][0]) if stamps else None


def _in_hours(hour: int, hours: tuple[int, int]) -> bool:
    start, end = hours
    return start <= hour < end if start <= end else hour >= start or hour < end


def _read_tags(folder: pathlib.Path, column: str) -> dict[str, str]:
    path = folder / "tags.csv"
    if not path.is_file():
        return {}
    # utf-8-sig: the shipped tags.csv files start with a byte-order mark.
    with open(path, encoding="utf-8-sig", newline="") as handle:
        return {row["filename"]: row[column] for row in csv.DictReader(handle) if row.get(column)}


def list_backgrounds(spec: DomainSpec, data_root: pathlib.Path) -> list[BackgroundFile]:
    """List the background files of all ``spec.background`` folders, sorted, with their kinds."""
    files = []
    for i, background in enumerate(spec.background):
        folder = data_root / background.path
        if not folder.is_dir():
            raise _fail(f"background[{i}].path", f"{folder} is not a folder",
                        "give a folder relative to the data root, or pass --data-root")
        tags = _read_tags(folder, background.kind_column) if background.kind_column else {}
        matched = sorted(folder.glob(background.glob))
        for path in matched:
            if background.night_hours is not None:
                hour = _file_hour(path.name)
                if hour is None or not _in_hours(hour, background.night_hours):
                    continue
            kind = tags.get(path.name)
            if kind is None:
                kind = next((k for word, k in background.kind_keywords.items() if word.lower() in path.name.lower()),
                            background.kind)
            files.append(BackgroundFile(f"{background.path}/{path.name}", kind))
        if not matched:
            raise _fail(f"background[{i}].glob", f"{background.glob!r} matches nothing in {folder}", "fix the pattern")
    return files


# ---------------------------------------------------------------------------
# Rendering


class _AudioCache:
    """Decoded 48 kHz mono audio [samples] float32 per file, read once per build."""

    def __init__(self, data_root: pathlib.Path):
        self.data_root = data_root
        self._audio: dict[str, np.ndarray] = {}

    def __call__(self, file: str) -> np.ndarray:
        if file not in self._audio:
            self._audio[file] = read_audio(self.data_root / file)
        return self._audio[file]


def _fade(length: int, fade_samples: int) -> np.ndarray:
    envelope = np.ones(length, dtype=np.float64)
    fade = min(fade_samples, length // 2)
    if fade > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(fade) + 0.5) / fade)
        envelope[:fade] = ramp
        envelope[length - fade:] = ramp[::-1]
    return envelope


def _event_crop(clip: np.ndarray, event: dict[str, Any]) -> np.ndarray:
    """Return the event's crop [length] float64 after filter and fades, before gain."""
    start = event["clip_offset_samples"]
    crop = clip[start:start + event["length_samples"]].astype(np.float64)
    if event["lowpass_hz"] is not None:
        sos = scipy.signal.butter(event["lowpass_order"], event["lowpass_hz"], btype="lowpass",
                                  fs=SAMPLE_RATE, output="sos")
        crop = scipy.signal.sosfilt(sos, crop)
    return crop * _fade(len(crop), event["fade_samples"])


def _render(entry: dict[str, Any], audio: Callable[[str], np.ndarray]) -> np.ndarray:
    if entry["kind"] == "annotated":
        recording = audio(entry["recording"])
        start = entry["offset_samples"]
        window = np.zeros(WINDOW_SAMPLES, dtype=np.float32)
        piece = recording[start:start + WINDOW_SAMPLES]
        window[:len(piece)] = piece
        return window

    background = entry["background"]
    start = background["offset_samples"]
    window = audio(background["file"])[start:start + WINDOW_SAMPLES].astype(np.float64) * background["gain"]
    for event in entry["events"]:
        crop = _event_crop(audio(event["file"]), event)
        position = event["position_samples"]
        window[position:position + len(crop)] += event["gain"] * crop
    return window.astype(np.float32)


def rebuild_window(manifest_entry: dict[str, Any], data_root: str | pathlib.Path) -> np.ndarray:
    """Render one window [144000] float32 from its manifest entry, bit-exactly as the build did."""
    return _render(manifest_entry, _AudioCache(pathlib.Path(data_root)))


def _rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))


# ---------------------------------------------------------------------------
# Screening and embedding


@dataclasses.dataclass
class _Models:
    """The source model, loaded once per build: backbone [n, 144000] -> [n, 1024], full head."""

    backbone: Any
    head: Any
    backbone_sha256: str


def _load_models() -> _Models:
    from dawnchorus.models.backbone import Backbone, load_source_model

    source = load_source_model()
    return _Models(Backbone(source.backbone), source.head, hashlib.sha256(source.backbone).hexdigest())


def _embed(models: _Models, windows: Sequence[np.ndarray] | Callable[[int], np.ndarray], count: int,
           progress=None) -> np.ndarray:
    """Embed ``count`` windows, given as a list or a function of the index, in batches: [count, 1024] float32.

    ``progress`` is a bar from ``progress_bar``, advanced per batch and closed at the end.
    """
    get = windows if callable(windows) else windows.__getitem__
    embeddings = np.zeros((count, 1024), dtype=np.float32)
    try:
        for start in range(0, count, _EMBED_BATCH):
            stop = min(count, start + _EMBED_BATCH)
            embeddings[start:stop] = models.backbone.embed(np.stack([get(i) for i in range(start, stop)]))
            if progress is not None:
                progress.update(stop - start)
    finally:
        if progress is not None:
            progress.close()
    return embeddings


@dataclasses.dataclass(frozen=True)
class _Candidate:
    file: str
    kind: str
    offset_samples: int
    next_kept: bool  # the candidate one hop later in the same file also survived


def _screen_backgrounds(spec: DomainSpec, backgrounds: list[BackgroundFile], focal_labels: list[str],
                        audio: _AudioCache, models: _Models, cache: pathlib.Path,
                        progress: bool = True) -> tuple[list[_Candidate], dict]:
    """Cut backgrounds into candidate windows, score them with the source model, drop those with focal species."""
    hop = round(spec.screening.hop_seconds * SAMPLE_RATE)
    offsets: list[tuple[BackgroundFile, int]] = []
    for background in backgrounds:
        try:
            length = len(audio(background.file))
        except AudioError as error:
            _LOGGER.warning("background %s skipped: %s", background.file, error)
            continue
        if length < WINDOW_SAMPLES:
            _LOGGER.info("background %s skipped: %.2f s is shorter than a window", background.file,
                         length / SAMPLE_RATE)
            continue
        offsets += [(background, offset) for offset in range(0, length - WINDOW_SAMPLES + 1, hop)]

    key = hashlib.sha256(json.dumps([models.backbone_sha256, focal_labels,
                                     [(b.file, o) for b, o in offsets]]).encode()).hexdigest()[:16]
    cached = cache / f"screening-{key}.npz"
    if cached.is_file():
        scores = np.load(cached)["scores"]
    else:
        _LOGGER.info("screening %d background windows for %d focal species", len(offsets), len(focal_labels))
        embeddings = _embed(models, lambda i: audio(offsets[i][0].file)[offsets[i][1]:offsets[i][1] + WINDOW_SAMPLES],
                            len(offsets), progress_bar(total=len(offsets), unit="window",
                                                       description=f"{spec.name}: screening", enabled=progress))
        logits = models.head.select(focal_labels).logits(embeddings)
        scores = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        np.savez(cached, scores=scores)

    best = scores.argmax(axis=1)
    kept = scores.max(axis=1) < spec.screening.threshold
    dropped = [{"file": b.file, "offset_seconds": o / SAMPLE_RATE, "species": focal_labels[best[i]],
                "score": round(float(scores[i, best[i]]), 4)}
               for i, (b, o) in enumerate(offsets) if not kept[i]]
    kept_keys = {(b.file, o) for i, (b, o) in enumerate(offsets) if kept[i]}
    candidates = [_Candidate(b.file, b.kind, o, (b.file, o + hop) in kept_keys)
                  for i, (b, o) in enumerate(offsets) if kept[i]]
    stats = {"candidate_windows": len(offsets), "dropped_windows": len(dropped), "threshold": spec.screening.threshold,
             "dropped": dropped}
    _LOGGER.info("screening dropped %d of %d background windows", len(dropped), len(offsets))
    return candidates, stats


# ---------------------------------------------------------------------------
# Mixing


class _ClipPool:
    """Focal clips with their activity envelopes and the per-recording and per-crop use counts."""

    def __init__(self, clips: list[FocalClip], audio: _AudioCache, mixing: MixingSpec):
        self.mixing = mixing
        self.clips: list[FocalClip] = []
        self.frame_energy: list[np.ndarray] = []
        self.floor: list[float] = []
        sos = scipy.signal.butter(4, _ACTIVITY_HIGHPASS_HZ, btype="highpass", fs=SAMPLE_RATE, output="sos")
        for clip in clips:
            try:
                samples = audio(clip.file)
            except AudioError as error:
                _LOGGER.warning("focal clip %s skipped: %s", clip.file, error)
                continue
            frames = len(samples) // _ACTIVITY_FRAME_SAMPLES
            if frames < 2:
                continue
            band = scipy.signal.sosfilt(sos, samples[:frames * _ACTIVITY_FRAME_SAMPLES].astype(np.float64))
            energy = np.mean(np.square(band.reshape(frames, _ACTIVITY_FRAME_SAMPLES)), axis=1)
            self.clips.append(clip)
            self.frame_energy.append(energy)
            self.floor.append(float(np.percentile(energy, 20)))
        self.audio = audio
        self.recording_uses: dict[str, int] = {}
        self.crop_uses: dict[tuple[str, int], int] = {}
        self.exhausted: set[int] = set()
        self.by_label: dict[str, list[int]] = {}
        for i, clip in enumerate(self.clips):
            self.by_label.setdefault(clip.label, []).append(i)

    def _active(self, clip_index: int, start: int, length: int) -> bool:
        energy = self.frame_energy[clip_index]
        first = start // _ACTIVITY_FRAME_SAMPLES
        last = max(first + 1, (start + length) // _ACTIVITY_FRAME_SAMPLES)
        mean = float(np.mean(energy[first:last]))
        return mean > 0 and mean >= self.floor[clip_index] * 10 ** (_ACTIVITY_MARGIN_DB / 10)

    def draw(self, label: str, rng: np.random.Generator) -> tuple[FocalClip, int, int] | None:
        """Draw (clip, start, length) in samples for ``label``, or None when the species is used up."""
        while True:
            open_clips = [i for i in self.by_label[label] if i not in self.exhausted
                          and self.recording_uses.get(self.clips[i].recording, 0) < self.mixing.max_events_per_recording]
            if not open_clips:
                return None
            fewest = min(self.recording_uses.get(self.clips[i].recording, 0) for i in open_clips)
            least_used = [i for i in open_clips if self.recording_uses.get(self.clips[i].recording, 0) == fewest]
            index = least_used[int(rng.integers(len(least_used)))]
            clip = self.clips[index]
            clip_samples = len(self.frame_energy[index]) * _ACTIVITY_FRAME_SAMPLES
            length = min(round(rng.uniform(*self.mixing.event_seconds) * SAMPLE_RATE), clip_samples)
            starts = [s for s in range(0, clip_samples - length + 1, _CROP_GRID_SAMPLES)
                      if self.crop_uses.get((clip.file, s), 0) < self.mixing.max_crop_uses
                      and self._active(index, s, length)]
            if not starts:
                self.exhausted.add(index)
                continue
            start = starts[int(rng.integers(len(starts)))]
            self.crop_uses[(clip.file, start)] = self.crop_uses.get((clip.file, start), 0) + 1
            self.recording_uses[clip.recording] = self.recording_uses.get(clip.recording, 0) + 1
            return clip, start, length


def _species_weights(species: list[str], exponent: float, rng: np.random.Generator) -> dict[str, float]:
    ranking = [species[i] for i in rng.permutation(len(species))]
    weights = np.arange(1, len(ranking) + 1, dtype=np.float64) ** -exponent
    return {label: float(w / weights.sum()) for label, w in zip(ranking, weights)}


def _mix_manifest(spec: DomainSpec, candidates: list[_Candidate], pool: _ClipPool,
                  rng: np.random.Generator) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    mixing = spec.mixing
    species = sorted(pool.by_label)
    weights = _species_weights(species, mixing.zipf_exponent, rng)
    used_up: set[str] = set()
    count_probabilities = np.array(mixing.event_count_weights) / sum(mixing.event_count_weights)
    hop = round(spec.screening.hop_seconds * SAMPLE_RATE)
    order: list[int] = []
    entries = []

    for _ in range(mixing.windows):
        # Background crops cycle through a shuffled list of the candidates, so
        # each is used once before any is used again.
        if not order:
            order = list(rng.permutation(len(candidates)))
        candidate = candidates[order.pop()]
        offset = candidate.offset_samples + (int(rng.integers(hop)) if candidate.next_kept else 0)
        background = pool.audio(candidate.file)[offset:offset + WINDOW_SAMPLES]
        background_rms = _rms(background)
        target_rms = 10 ** (rng.uniform(*mixing.background_dbfs) / 20)
        gain = min(target_rms / background_rms, 10 ** (mixing.max_background_gain_db / 20)) if background_rms > 0 else 0.0
        mixed_background_rms = background_rms * gain

        events = []
        event_count = int(rng.choice(len(count_probabilities), p=count_probabilities))
        chosen: set[str] = set()
        while len(events) < event_count:
            open_species = [s for s in species if s not in used_up and s not in chosen]
            if not open_species:
                break
            p = np.array([weights[s] for s in open_species])
            label = open_species[int(rng.choice(len(open_species), p=p / p.sum()))]
            drawn = pool.draw(label, rng)
            if drawn is None:
                _LOGGER.warning("%s: %s is no longer drawn after %d windows: its recordings reached "
                                "mixing.max_events_per_recording or their crops mixing.max_crop_uses",
                                spec.name, label, len(entries))
                used_up.add(label)
                continue
            chosen.add(label)
            clip, clip_offset, length = drawn
            snr_db = float(rng.uniform(*mixing.snr_db))
            cutoff = (float(np.exp(rng.uniform(*np.log(mixing.lowpass_hz))))
                      if rng.uniform() < mixing.lowpass_share else None)
            event = {"file": clip.file, "recording": clip.recording, "label": clip.label,
                     "clip_offset_samples": clip_offset, "length_samples": length,
                     "position_samples": int(rng.integers(WINDOW_SAMPLES - length + 1)),
                     "lowpass_hz": cutoff, "lowpass_order": mixing.lowpass_order, "fade_samples": _FADE_SAMPLES,
                     "snr_db": snr_db}
            crop_rms = _rms(_event_crop(pool.audio(clip.file), event))
            reference = mixed_background_rms if mixed_background_rms > 0 else 10 ** (mixing.background_dbfs[0] / 20)
            event["gain"] = reference * 10 ** (snr_db / 20) / crop_rms if crop_rms > 0 else 0.0
            events.append(event)

        entries.append({
            "kind": "mixed",
            "background": {"file": candidate.file, "recording": candidate.file, "kind": candidate.kind,
                           "offset_samples": offset, "gain": gain},
            "events": events,
            "labels": sorted({event["label"] for event in events}),
        })

    # Recording order: windows of one background file follow each other in time.
    entries.sort(key=lambda e: (e["background"]["file"], e["background"]["offset_samples"]))
    for index, entry in enumerate(entries):
        entry["index"] = index
    stats = {"species_weights": weights, "species_used_up": sorted(used_up),
             "events_per_recording_max": max(pool.recording_uses.values(), default=0),
             "crop_uses_max": max(pool.crop_uses.values(), default=0)}
    return entries, stats


# ---------------------------------------------------------------------------
# Annotated recordings


@dataclasses.dataclass(frozen=True)
class Annotation:
    """One annotation box: ``start`` and ``end`` in seconds, and its ``code``."""

    start: float
    end: float
    code: str


def read_annotations(path: str | pathlib.Path, fmt: str, start_column: str, end_column: str,
                     label_column: str) -> list[Annotation]:
    """Read boxes from a CSV ("csv") or a tab-separated Raven selection table ("raven")."""
    delimiter = "\t" if fmt == "raven" else ","
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        missing = [c for c in (start_column, end_column, label_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise DomainSpecError(f"{path} has no column {missing[0]!r}; its columns are {reader.fieldnames}: "
                                  "set annotated.start_column, end_column or label_column")
        boxes = []
        for line, row in enumerate(reader, start=2):
            try:
                boxes.append(Annotation(float(row[start_column]), float(row[end_column]), row[label_column].strip()))
            except (TypeError, ValueError) as error:
                raise DomainSpecError(f"{path} line {line}: start or end is not a number ({error})") from error
    return boxes


def label_windows(boxes: Sequence[Annotation], codes: dict[str, str], window_count: int,
                  min_overlap: float) -> list[list[str]]:
    """Label window i ([3i, 3i + 3) s) with each mapped code whose box overlaps it by at
    least ``min_overlap`` times min(box length, 3 s). Returns sorted labels per window."""
    labels: list[set[str]] = [set() for _ in range(window_count)]
    for box in boxes:
        if box.code not in codes:
            continue
        needed = min_overlap * min(box.end - box.start, WINDOW_SECONDS)
        for i in range(window_count):
            overlap = min(box.end, (i + 1) * WINDOW_SECONDS) - max(box.start, i * WINDOW_SECONDS)
            if overlap > 0 and overlap >= needed:
                labels[i].add(codes[box.code])
    return [sorted(window) for window in labels]


def _annotated_manifest(spec: DomainSpec, data_root: pathlib.Path, audio: _AudioCache) -> list[dict[str, Any]]:
    annotated = spec.annotated
    assert annotated is not None
    samples = len(audio(annotated.recording))
    window_count = samples // WINDOW_SAMPLES + int(samples % WINDOW_SAMPLES >= _MIN_TAIL_SAMPLES)
    boxes = read_annotations(data_root / annotated.annotations, annotated.format, annotated.start_column,
                             annotated.end_column, annotated.label_column)
    unmapped = sorted({box.code for box in boxes} - set(annotated.labels))
    if unmapped:
        _LOGGER.warning("%s: annotation codes without a label are ignored: %s", spec.name, unmapped)
    labels = label_windows(boxes, annotated.labels, window_count, annotated.min_overlap)
    return [{"kind": "annotated", "index": i, "recording": annotated.recording, "offset_samples": i * WINDOW_SAMPLES,
             "background_kind": annotated.background_kind, "labels": labels[i]} for i in range(window_count)]


# ---------------------------------------------------------------------------
# Build and load


@dataclasses.dataclass
class Domain:
    """A built benchmark domain.

    Attributes:
        name: the spec's name.
        classes: [K] BirdNET labels: the range-model list plus every labeled species.
        embeddings: [n, 1024] float32 BirdNET embeddings, in window order (recording order).
        labels: [n, K] bool.
        background_recording: [n] str, the background (or annotated) recording of each window.
        bird_free: [n] bool, windows without any label.
        background_kind: [n] str, e.g. rain, wind, water, room, night.
        snr_db: [n] float64, the largest event SNR of each window; NaN without events or when unknown.
        window_seconds: 3.0.
        stats: the stats JSON of the build.
    """

    name: str
    classes: list[str]
    embeddings: np.ndarray
    labels: np.ndarray
    background_recording: np.ndarray
    bird_free: np.ndarray
    background_kind: np.ndarray
    snr_db: np.ndarray
    window_seconds: float = WINDOW_SECONDS
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)


def _domain_classes(spec: DomainSpec, all_labels: list[str], labeled: set[str]) -> list[str]:
    files = birdnet.locate_birdnet_files()
    location = Location(spec.site.latitude, spec.site.longitude, spec.site.week)
    in_range = species_from_range_model(files.range_model, all_labels, location, spec.site.range_threshold)
    return sorted(set(in_range) | labeled)


def _neighbour_stats(embeddings: np.ndarray, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Shares of mutual k = 5 neighbour pairs that share a background or a focal recording, with chance levels."""
    from dawnchorus.server.buffer import NeighbourBuffer

    n = len(entries)
    if n < 2:
        return {"mutual_pairs": 0}
    buffer = NeighbourBuffer(capacity=n, dim=embeddings.shape[1], k=5)
    buffer.add(embeddings)
    mutual = buffer.mutual_neighbours()
    pairs = {(min(i, int(j)), max(i, int(j))) for i in range(n) for j in mutual[i] if j >= 0}

    backgrounds = [_background_recording(e) for e in entries]
    focal = [{ev["recording"] for ev in e.get("events", [])} for e in entries]
    same_background = sum(backgrounds[i] == backgrounds[j] for i, j in pairs)
    with_events = [(i, j) for i, j in pairs if focal[i] and focal[j]]
    same_focal = sum(bool(focal[i] & focal[j]) for i, j in with_events)

    species = [set(e["labels"]) for e in entries]
    same_species = sum(bool(species[i] & species[j]) for i, j in with_events)

    # Chance levels: the same shares over all pairs (backgrounds) or over
    # 20,000 random pairs of windows that both have events (focal recordings).
    _, counts = np.unique(backgrounds, return_counts=True)
    chance_background = float(np.sum(counts * (counts - 1)) / (n * (n - 1)))
    with_any = [i for i in range(n) if focal[i]]
    chance_focal = None
    if len(with_any) > 1:
        rng = np.random.default_rng(0)
        first, second = rng.choice(with_any, 20_000), rng.choice(with_any, 20_000)
        distinct = first != second
        chance_focal = float(np.mean([bool(focal[i] & focal[j]) for i, j in zip(first[distinct], second[distinct])]))
    return {
        "mutual_pairs": len(pairs),
        "same_background_share": same_background / len(pairs) if pairs else None,
        "same_background_chance": chance_background,
        "pairs_with_events_both": len(with_events),
        "same_focal_recording_share": same_focal / len(with_events) if with_events else None,
        "same_focal_recording_chance": chance_focal,
        "same_species_share": same_species / len(with_events) if with_events else None,
    }


def _background_recording(entry: dict[str, Any]) -> str:
    return entry["recording"] if entry["kind"] == "annotated" else entry["background"]["recording"]


def _spec_digest(spec: DomainSpec) -> str:
    return hashlib.sha256(repr(spec).encode()).hexdigest()[:16]


def build_domain(spec: DomainSpec, cache_dir: str | pathlib.Path, data_root: str | pathlib.Path | None = None,
                 progress: bool = True) -> pathlib.Path:
    """Build a domain into ``<cache_dir>/<name>/``: manifest, embeddings, classes, stats.

    Embeddings are reused when the manifest's sha256 is unchanged, and the
    background screening scores when the background windows and focal species are.
    ``progress`` shows a bar on a terminal while windows are embedded.

    Returns:
        The domain's cache folder.
    """
    started = time.monotonic()
    root = pathlib.Path(data_root) if data_root is not None else default_data_root()
    if not root.is_dir():
        raise DomainSpecError(f"data root {root} is not a folder: pass the folder of the recordings as data_root")
    folder = pathlib.Path(cache_dir) / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    _LOGGER.info("building domain %s (%s) into %s", spec.name, spec.kind, folder)

    all_labels = birdnet.read_labels(birdnet.locate_birdnet_files().labels)
    audio = _AudioCache(root)
    models = _load_models()
    rng = np.random.default_rng(spec.seed)
    stats: dict[str, Any] = {"name": spec.name, "kind": spec.kind, "spec_digest": _spec_digest(spec)}

    if spec.kind == "annotated":
        assert spec.annotated is not None
        unknown = sorted(set(spec.annotated.labels.values()) - set(all_labels))
        if unknown:
            raise _fail("annotated.labels", f"{unknown[0]!r} is not a BirdNET label",
                        "use 'Scientific name_Common name' as in the BirdNET labels file")
        entries = _annotated_manifest(spec, root, audio)
        labeled = set(spec.annotated.labels.values())
    else:
        clips = list_focal_clips(spec, root, all_labels)
        if not clips:
            raise _fail("focal", "no focal clip has a BirdNET label", "check the focal folders and formats")
        focal_labels = sorted({clip.label for clip in clips})
        candidates, stats["screening"] = _screen_backgrounds(spec, list_backgrounds(spec, root), focal_labels,
                                                             audio, models, folder, progress)
        if not candidates:
            raise _fail("screening.threshold", "every background window was dropped",
                        "raise the threshold or add backgrounds")
        pool = _ClipPool(clips, audio, spec.mixing)
        entries, stats["mixing"] = _mix_manifest(spec, candidates, pool, rng)
        labeled = set(focal_labels)

    manifest = "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in entries)
    (folder / "manifest.jsonl").write_text(manifest, encoding="utf-8")
    digest = hashlib.sha256((manifest + models.backbone_sha256).encode()).hexdigest()[:16]
    embeddings_path = folder / f"embeddings-{digest}.npy"
    if embeddings_path.is_file():
        embeddings = np.load(embeddings_path)
        _LOGGER.info("%s: reusing %s", spec.name, embeddings_path.name)
    else:
        embeddings = _embed(models, lambda i: _render(entries[i], audio), len(entries),
                            progress_bar(total=len(entries), unit="window", description=f"{spec.name}: embedding",
                                         enabled=progress))
        np.save(embeddings_path, embeddings)

    classes = _domain_classes(spec, all_labels, labeled)
    (folder / "classes.txt").write_text("".join(c + "\n" for c in classes), encoding="utf-8")

    bird_free = [not entry["labels"] for entry in entries]
    stats.update({
        "windows": len(entries),
        "classes": len(classes),
        "labeled_species": len(labeled),
        "bird_free_share": float(np.mean(bird_free)),
        "events": sum(len(entry.get("events", [])) for entry in entries),
        "windows_per_species": {label: sum(label in entry["labels"] for entry in entries) for label in sorted(labeled)},
        "embeddings_file": embeddings_path.name,
        "neighbours": _neighbour_stats(embeddings, entries),
        "build_seconds": round(time.monotonic() - started, 1),
    })
    (folder / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    _LOGGER.info("domain %s: %d windows, %d classes, %.1f s", spec.name, len(entries), len(classes),
                 stats["build_seconds"])
    return folder


def read_manifest(folder: str | pathlib.Path) -> list[dict[str, Any]]:
    """Read a built domain's manifest: one dict per window, in window order."""
    lines = (pathlib.Path(folder) / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line]


def load_domain(spec_path: str | pathlib.Path | DomainSpec, cache_dir: str | pathlib.Path,
                data_root: str | pathlib.Path | None = None, progress: bool = True) -> Domain:
    """Load a domain from the cache, building it first when missing or built from another spec.

    ``spec_path`` is a spec file or an already parsed spec. ``progress`` shows
    a bar on a terminal while a build embeds windows.
    """
    spec = spec_path if isinstance(spec_path, DomainSpec) else load_spec(spec_path)
    folder = pathlib.Path(cache_dir) / spec.name
    stats_path = folder / "stats.json"
    stats = json.loads(stats_path.read_text(encoding="utf-8")) if stats_path.is_file() else {}
    if stats.get("spec_digest") != _spec_digest(spec) or not (folder / stats.get("embeddings_file", "-")).is_file():
        build_domain(spec, cache_dir, data_root, progress=progress)
        stats = json.loads(stats_path.read_text(encoding="utf-8"))

    entries = read_manifest(folder)
    classes = (folder / "classes.txt").read_text(encoding="utf-8").split("\n")[:-1]
    position = {label: k for k, label in enumerate(classes)}
    labels = np.zeros((len(entries), len(classes)), dtype=bool)
    for i, entry in enumerate(entries):
        labels[i, [position[label] for label in entry["labels"]]] = True
    snr = [max((ev["snr_db"] for ev in entry.get("events", [])), default=math.nan) for entry in entries]
    kinds = [entry["background_kind"] if entry["kind"] == "annotated" else entry["background"]["kind"]
             for entry in entries]
    return Domain(
        name=spec.name,
        classes=classes,
        embeddings=np.load(folder / stats["embeddings_file"]),
        labels=labels,
        background_recording=np.array([_background_recording(e) for e in entries], dtype=str),
        bird_free=~labels.any(axis=1),
        background_kind=np.array(kinds, dtype=str),
        snr_db=np.array(snr, dtype=np.float64),
        stats=stats,
    )
