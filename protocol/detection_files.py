"""Detection files in the layouts of BirdNET-Analyzer: its CSV and Raven selection tables.

Both ``dawnchorus analyze`` (recorder side) and ``dawnchorus server
export-detections`` (base station) write these files, so the writers live
here, free of TensorFlow and LiteRT.

CSV, as BirdNET-Analyzer's ``csv`` result type, one row per detection:

    Start (s),End (s),Scientific name,Common name,Confidence,File

Raven selection table, as BirdNET-Analyzer's ``table`` result type: one
tab-separated file per recording, named ``<recording>.BirdNET.selection.table.txt``,
with the columns of ``RAVEN_COLUMNS``. A table for a recording without any
detection contains one ``nocall`` row, as BirdNET-Analyzer writes, so that every
recording analysed has a table.

Extra columns (the base station adds site, device and time) come after
BirdNET-Analyzer's, as its own additional CSV columns do, so that tools that
read columns by name keep working.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
from typing import Callable, Iterable, Mapping, Sequence

FORMATS = ("csv", "raven")

CSV_COLUMNS = ("Start (s)", "End (s)", "Scientific name", "Common name", "Confidence", "File")
RAVEN_COLUMNS = (
    "Selection", "View", "Channel", "Begin Time (s)", "End Time (s)", "Low Freq (Hz)", "High Freq (Hz)",
    "Common Name", "Species Code", "Confidence", "Begin Path", "File Offset (s)",
)
RAVEN_SUFFIX = ".BirdNET.selection.table.txt"

# BirdNET V2.4's spectrogram spans 0 to 15 kHz (BirdNET-Analyzer's SIG_FMIN and
# SIG_FMAX). A selection's band is that span, cut at the Nyquist frequency
# of a recording sampled below 30 kHz. A wider band would claim frequencies
# that the model never saw.
LOW_FREQ_HZ = 0
HIGH_FREQ_HZ = 15_000

RAVEN_VIEW = "Spectrogram 1"
RAVEN_CHANNEL = "1"
# The placeholder row of a recording without detections, as BirdNET-Analyzer writes it.
NO_CALL = "nocall"


@dataclasses.dataclass(frozen=True)
class DetectionRow:
    """One detection in a recording.

    Attributes:
        recording: the recording, as written in ``File`` and ``Begin Path``.
        start_s, end_s: the window's start and end within the recording, in seconds.
        label: ``Scientific name_Common name``.
        confidence: 0 to 1.
        extra: values of the extra columns, by column name.
    """

    recording: str
    start_s: float
    end_s: float
    label: str
    confidence: float
    extra: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def scientific_name(self) -> str:
        return self.label.partition("_")[0]

    @property
    def common_name(self) -> str:
        scientific, _, common = self.label.partition("_")
        return common or scientific


def format_seconds(value: float) -> str:
    """Format a time in seconds as BirdNET-Analyzer does (``3.0``, ``4.5``), rounded to milliseconds."""
    return str(round(float(value), 3))


def format_confidence(value: float) -> str:
    return f"{value:.4f}"


def check_format(name: str) -> str:
    """Return ``name`` if it is a known format, else raise ValueError naming the formats."""
    if name not in FORMATS:
        raise ValueError(f"unknown detection file format {name!r}: use one of {', '.join(FORMATS)}")
    return name


def load_species_codes(path: pathlib.Path) -> dict[str, str]:
    """Read eBird species codes from a JSON object that maps labels to codes.

    BirdNET-Analyzer's ``eBird_taxonomy_codes_2021E.json`` has this layout
    (it also maps each code back to its label, which does no harm here). A
    key may also be a scientific name alone.

    Raises:
        ValueError: the file cannot be read or is not such an object.
    """
    try:
        codes = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"species codes file {path} cannot be read: {error}") from error
    if not isinstance(codes, dict) or not all(isinstance(key, str) and isinstance(value, str)
                                              for key, value in codes.items()):
        raise ValueError(f"species codes file {path} must be one JSON object mapping labels "
                         "('Scientific name_Common name') to eBird codes, as BirdNET-Analyzer's "
                         "eBird_taxonomy_codes_2021E.json")
    return codes


def species_code(row: DetectionRow, codes: Mapping[str, str]) -> str:
    """Return the row's eBird code: by label, then by scientific name, else the label, as BirdNET-Analyzer does."""
    return codes.get(row.label) or codes.get(row.scientific_name) or row.label


def raven_table_name(recording: str | os.PathLike) -> str:
    """Return the table file name of a recording: its name without the extension, plus ``RAVEN_SUFFIX``."""
    return pathlib.PurePath(recording).stem + RAVEN_SUFFIX


def _write_atomically(path: pathlib.Path, write: Callable[[csv.writer], None], delimiter: str) -> None:
    """Write through a temporary file and rename it, so that a crash never leaves half a file."""
    path = pathlib.Path(path)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", newline="", encoding="utf-8") as stream:
        write(csv.writer(stream, delimiter=delimiter, lineterminator="\n"))
    os.replace(partial, path)


def write_csv(path: pathlib.Path, rows: Iterable[DetectionRow], extra_columns: Sequence[str] = ()) -> int:
    """Write a BirdNET-Analyzer CSV of ``rows``, in the order given; return the number of rows."""
    count = 0

    def write(writer) -> None:
        nonlocal count
        writer.writerow([*CSV_COLUMNS, *extra_columns])
        for row in rows:
            writer.writerow([
                format_seconds(row.start_s), format_seconds(row.end_s), row.scientific_name, row.common_name,
                format_confidence(row.confidence), row.recording,
                *(row.extra.get(column, "") for column in extra_columns),
            ])
            count += 1

    _write_atomically(path, write, ",")
    return count


def write_raven_table(
    path: pathlib.Path,
    recording: str,
    rows: Iterable[DetectionRow],
    high_freq_hz: float = HIGH_FREQ_HZ,
    extra_columns: Sequence[str] = (),
    species_codes: Mapping[str, str] | None = None,
) -> int:
    """Write the Raven selection table of one recording; return the number of selections.

    Args:
        path: the table file.
        recording: the ``Begin Path`` of the placeholder row written when
            ``rows`` is empty.
        rows: the recording's detections, in the order given; selections are
            numbered from 1.
        high_freq_hz: top of each selection's band, normally
            ``min(HIGH_FREQ_HZ, sample rate / 2)``.
        extra_columns: names of columns appended after BirdNET-Analyzer's.
        species_codes: eBird species codes (``load_species_codes``).
            BirdNET-Analyzer writes the label as the code of a species
            without one, and so does this.
    """
    codes = species_codes or {}
    high = str(int(high_freq_hz))
    count = 0

    def write(writer) -> None:
        nonlocal count
        writer.writerow([*RAVEN_COLUMNS, *extra_columns])
        for row in rows:
            count += 1
            writer.writerow([
                str(count), RAVEN_VIEW, RAVEN_CHANNEL, format_seconds(row.start_s), format_seconds(row.end_s),
                str(LOW_FREQ_HZ), high, row.common_name, species_code(row, codes),
                format_confidence(row.confidence), row.recording, format_seconds(row.start_s),
                *(row.extra.get(column, "") for column in extra_columns),
            ])
        if count == 0:
            writer.writerow(["1", RAVEN_VIEW, RAVEN_CHANNEL, "0.0", "3.0", str(LOW_FREQ_HZ), high, NO_CALL, NO_CALL,
                             "1.0", recording, "0.0", *("" for _ in extra_columns)])

    _write_atomically(path, write, "\t")
    return count
