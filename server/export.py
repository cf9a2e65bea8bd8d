"""``server export-detections``: the base station's detection log as BirdNET-Analyzer CSV or Raven tables.

The detection log (``STATE_DIR/detections.jsonl``, written by
``server/feed.py``) has one JSON detection per line, timed in unix seconds.
BirdNET's formats time a detection within a recording, and a recorder keeps
no recordings, so each recorder's UTC day takes the place of one: the recording
``SITE/DEVICE/YYYY-MM-DD`` starts at 00:00:00 UTC, and ``Start (s)`` and
``Begin Time (s)`` count seconds from then.

- ``--format csv`` writes ``OUT/detections.csv``, one row per detection.
- ``--format raven`` writes one selection table per recorder and day,
  ``OUT/SITE/DEVICE/YYYY-MM-DD.BirdNET.selection.table.txt``.

Both add the columns of ``EXTRA_COLUMNS`` after BirdNET-Analyzer's.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import pathlib
import sys
from typing import Iterator

from dawnchorus.protocol import detection_files
from dawnchorus.protocol.messages import Detection
from dawnchorus.protocol.topics import TopicError, validate_id

_LOGGER = logging.getLogger(__name__)

LOG_NAME = "detections.jsonl"
CSV_NAME = "detections.csv"
EXTRA_COLUMNS = ("Site", "Device", "Time (UTC)", "Head version", "Sequence")

EXIT_OK = 0
EXIT_FAILED = 2


class ExportError(ValueError):
    """An invalid option or an unreadable log: the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class ExportFilter:
    """The selection of detections to export; None matches everything.

    Attributes:
        sites, devices: ids to keep.
        since, until: unix seconds; a detection is kept if its window starts
            at or after ``since`` and before ``until``.
    """

    sites: frozenset[str] | None = None
    devices: frozenset[str] | None = None
    since: float | None = None
    until: float | None = None

    def describe(self) -> str:
        """Return the filter as the command-line options that set it, or "no filters"."""
        parts = [f"--site {site}" for site in sorted(self.sites or ())]
        parts += [f"--device {device}" for device in sorted(self.devices or ())]
        for option, moment in (("--since", self.since), ("--until", self.until)):
            if moment is not None:
                parts.append(f"{option} {_iso_utc(moment)}")
        return " ".join(parts) or "no filters"

    def matches(self, detection: Detection) -> bool:
        if self.sites is not None and detection.site not in self.sites:
            return False
        if self.devices is not None and detection.device not in self.devices:
            return False
        if self.since is not None and detection.start_time < self.since:
            return False
        return self.until is None or detection.start_time < self.until


@dataclasses.dataclass(frozen=True)
class ExportedFile:
    """One file written: its path and the detections in it (0 for a CSV with only its header)."""

    path: pathlib.Path
    detections: int


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """The result of ``export``: the files it wrote and the detections it read.

    Attributes:
        files: the files written; none in the Raven format when no detection matched.
        logged: detections read from the log, before the filters.
    """

    files: list[ExportedFile]
    logged: int

    @property
    def exported(self) -> int:
        return sum(file.detections for file in self.files)


def _iso_utc(unix_s: float) -> str:
    try:
        moment = datetime.datetime.fromtimestamp(unix_s, tz=datetime.timezone.utc)
    except (OverflowError, ValueError, OSError):
        return f"{unix_s:g}"
    return moment.isoformat().replace("+00:00", "Z")


def _detections(count: int) -> str:
    return f"{count} detection" if count == 1 else f"{count} detections"


def parse_time(text: str) -> float:
    """Parse unix seconds or an ISO 8601 date or time (UTC unless it gives an offset) into unix seconds."""
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"invalid time {text!r}: give unix seconds or an ISO 8601 time")
        return value
    try:
        moment = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r}: give unix seconds or an ISO 8601 date or time, e.g. 2026-05-22 or "
            "2026-05-22T04:30:00+02:00 (UTC when no offset is given)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def _id(what: str):
    """Build an argparse type that accepts a site or device id."""

    def parse(text: str) -> str:
        try:
            return validate_id(text, what)
        except TopicError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``server export-detections`` options to ``parser``."""
    parser.add_argument("state_dir", type=pathlib.Path, metavar="STATE_DIR",
                        help=f"the base station's --state-dir, which contains {LOG_NAME}")
    parser.add_argument("--format", choices=detection_files.FORMATS, default="csv",
                        help=f"csv: one BirdNET-Analyzer CSV, OUT/{CSV_NAME}; raven: one Raven selection table "
                             "per recorder and UTC day (default csv)")
    parser.add_argument("--out", type=pathlib.Path, required=True, metavar="DIR",
                        help="folder for the files, created if missing")
    parser.add_argument("--species-codes", type=pathlib.Path, default=None, metavar="FILE",
                        help="with --format raven: JSON object mapping labels to eBird species codes for the "
                             "Species Code column, e.g. BirdNET-Analyzer's eBird_taxonomy_codes_2021E.json "
                             "(default: the label)")
    parser.add_argument("--site", action="append", type=_id("site id"), default=None,
                        help="export only this site; repeat for several (default: all)")
    parser.add_argument("--device", action="append", type=_id("device id"), default=None,
                        help="export only this recorder; repeat for several (default: all)")
    parser.add_argument("--since", type=parse_time, default=None, metavar="TIME",
                        help="export only windows that start at or after TIME: unix seconds or ISO 8601, "
                             "UTC unless an offset is given")
    parser.add_argument("--until", type=parse_time, default=None, metavar="TIME",
                        help="export only windows that start before TIME")


def read_log(path: pathlib.Path) -> Iterator[Detection]:
    """Yield the detections of a detection log; an invalid line is logged and skipped.

    Raises:
        ExportError: the log does not exist or cannot be read.
    """
    try:
        stream = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise ExportError(f"detection log {path} not found: pass the base station's --state-dir") from None
    except OSError as error:
        raise ExportError(f"cannot read the detection log {path}: {error}") from error

    with stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                yield Detection(**{field.name: record[field.name] for field in dataclasses.fields(Detection)})
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                # A crash can cut the last line short; the lines before it are still good.
                _LOGGER.warning("%s line %d skipped: not a detection (%s: %s)", path, number,
                                type(error).__name__, error)


def _utc_day(unix_s: float) -> datetime.datetime:
    moment = datetime.datetime.fromtimestamp(unix_s, tz=datetime.timezone.utc)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def to_row(detection: Detection) -> detection_files.DetectionRow:
    """Place a detection in its recorder's UTC day, the recording ``SITE/DEVICE/YYYY-MM-DD``."""
    day = _utc_day(detection.start_time)
    midnight = day.timestamp()
    start = datetime.datetime.fromtimestamp(detection.start_time, tz=datetime.timezone.utc)
    return detection_files.DetectionRow(
        recording=f"{detection.site}/{detection.device}/{day.date().isoformat()}",
        start_s=detection.start_time - midnight,
        end_s=detection.end_time - midnight,
        label=detection.label,
        confidence=detection.confidence,
        extra={
            "Site": detection.site,
            "Device": detection.device,
            "Time (UTC)": start.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "Head version": str(detection.head_version),
            "Sequence": str(detection.sequence),
        },
    )


def export(state_dir: pathlib.Path, output_format: str, out: pathlib.Path,
           selection: ExportFilter = ExportFilter(),
           species_codes: dict[str, str] | None = None) -> ExportResult:
    """Write the selected detections of ``state_dir``'s log to ``out``; return the files and their counts."""
    detection_files.check_format(output_format)
    logged = list(read_log(pathlib.Path(state_dir) / LOG_NAME))
    detections = [d for d in logged if selection.matches(d)]
    detections.sort(key=lambda d: (d.site, d.device, d.start_time, -d.confidence, d.label))
    out.mkdir(parents=True, exist_ok=True)

    if output_format == "csv":
        path = out / CSV_NAME
        count = detection_files.write_csv(path, (to_row(d) for d in detections), EXTRA_COLUMNS)
        return ExportResult([ExportedFile(path, count)], len(logged))

    tables: dict[str, list[detection_files.DetectionRow]] = {}
    for detection in detections:
        row = to_row(detection)
        tables.setdefault(row.recording, []).append(row)
    written = []
    for recording, rows in tables.items():
        path = out / f"{recording}{detection_files.RAVEN_SUFFIX}"
        path.parent.mkdir(parents=True, exist_ok=True)
        count = detection_files.write_raven_table(path, recording, rows, extra_columns=EXTRA_COLUMNS,
                                                  species_codes=species_codes)
        written.append(ExportedFile(path, count))
    return ExportResult(written, len(logged))


def run(args: argparse.Namespace) -> int:
    """Export the detection log with the options in ``args``; return the exit code."""
    if args.since is not None and args.until is not None and args.until <= args.since:
        print(f"error: --until ({args.until}) must be later than --since ({args.since})", file=sys.stderr)
        return EXIT_FAILED
    if args.out.exists() and not args.out.is_dir():
        print(f"error: --out {args.out} is a file: give a folder", file=sys.stderr)
        return EXIT_FAILED
    selection = ExportFilter(
        sites=frozenset(args.site) if args.site else None,
        devices=frozenset(args.device) if args.device else None,
        since=args.since, until=args.until,
    )
    try:
        codes = None if args.species_codes is None else detection_files.load_species_codes(args.species_codes)
        result = export(args.state_dir, args.format, args.out, selection, codes)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    _report(result, selection, args.state_dir / LOG_NAME)
    return EXIT_OK


def _report(result: ExportResult, selection: ExportFilter, log_path: pathlib.Path) -> None:
    """Print the detections written per file, and a note when none were."""
    for file in result.files:
        print(f"wrote {_detections(file.detections)} to {file.path}", file=sys.stderr)
    if result.exported:
        print(f"exported {_detections(result.exported)} of {result.logged} in {log_path} "
              f"({len(result.files)} file(s))", file=sys.stderr)
        return
    if result.logged == 0:
        reason = f"the detection log {log_path} has no detections yet."
    else:
        reason = (f"none of the {_detections(result.logged)} in {log_path} matched the filters "
                  f"({selection.describe()}). Check the site and device ids and the time range.")
    written = "The CSV has only its header." if result.files else "No table was written."
    print(f"note: no detections exported, because {reason} {written}", file=sys.stderr)
