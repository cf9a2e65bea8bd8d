"""``analyze``: run the recorder's front end and BirdNET on audio files, without a broker.

Writes one row per window and species whose confidence reaches
``--min-conf``, in the layouts of BirdNET-Analyzer (protocol/detection_files.py):

- ``--format csv`` (the default): one CSV, as its ``csv`` result type:
  ``Start (s),End (s),Scientific name,Common name,Confidence,File``.
- ``--format raven``: one Raven selection table per audio file, as its
  ``table`` result type, in the folder ``--out``.

``End (s)`` is cut at the end of the file for the zero-padded last window.
Rows are sorted by file, then start, then confidence (highest first).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pathlib
import sys
from typing import Mapping, Sequence

import numpy as np
import soundfile

from dawnchorus.edge import audio
from dawnchorus.edge.pipeline import InferencePipeline
from dawnchorus.edge.progress import add_progress_argument, progress_bar
from dawnchorus.models import birdnet
from dawnchorus.models.backbone import Backbone, load_source_model
from dawnchorus.models.head import LinearHead, sigmoid
from dawnchorus.models.species import (DEFAULT_RANGE_THRESHOLD, SpeciesListError, SpeciesSpec,
                                       add_threshold_arguments, load_species_thresholds, range_threshold_argument,
                                       species_spec_argument, threshold_vector)
from dawnchorus.protocol import detection_files

_LOGGER = logging.getLogger(__name__)

CSV_COLUMNS = detection_files.CSV_COLUMNS

# BirdNET-Analyzer's defaults and limits for the same options.
DEFAULT_MIN_CONFIDENCE = 0.1
DEFAULT_SENSITIVITY = 1.0
MIN_SENSITIVITY = 0.5
MAX_SENSITIVITY = 1.5

# Offline analysis has no latency to keep low. Over four runs of
# benchmarks/edge_throughput.py on a 2-core AMD EPYC, batches of 4 were 0-5 %
# and batches of 8 1-8 % faster than batch 1. Batch 8 raised the process's
# peak memory from 213 MB (batch 1) to 311 MB, batch 4 only to 245 MB.
ANALYZE_BATCH_SIZE = 4

EXIT_OK = 0
EXIT_FAILED = 2


class AnalyzeError(ValueError):
    """Invalid options or model files: the message names the option or file and the fix."""


@dataclasses.dataclass(frozen=True)
class Detection:
    """One CSV row: a species scored at or above the minimum confidence in one window."""

    file: str
    start_s: float
    end_s: float
    label: str
    confidence: float


def _ranged_float(name: str, low: float, high: float, high_inclusive: bool = True):
    """Build an argparse type that accepts a float in [low, high] (or [low, high))."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        _check_range(name, value, low, high, high_inclusive)
        return value

    return parse


def _check_range(name: str, value: float, low: float, high: float, high_inclusive: bool = True) -> None:
    above_high = value > high if high_inclusive else value >= high
    if not value >= low or above_high:
        bracket = "]" if high_inclusive else ")"
        raise argparse.ArgumentTypeError(f"{name} {value} is out of range [{low}, {high}{bracket}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``analyze`` options to ``parser``."""
    parser.add_argument(
        "paths", nargs="+", type=pathlib.Path,
        help="audio files (wav, flac, ogg, opus, mp3) or folders, searched recursively",
    )
    parser.add_argument(
        "--out", required=True, type=pathlib.Path,
        help="the CSV file to write, or with --format raven the folder for the tables (created if missing)",
    )
    parser.add_argument(
        "--format", choices=detection_files.FORMATS, default="csv",
        help="csv: one CSV as BirdNET-Analyzer's csv result type; raven: one Raven selection table per "
        "audio file (<name>.BirdNET.selection.table.txt), as its table result type (default csv)",
    )
    parser.add_argument(
        "--species-codes", type=pathlib.Path, default=None, metavar="FILE",
        help="with --format raven: JSON object mapping labels to eBird species codes for the Species Code "
        "column, e.g. BirdNET-Analyzer's eBird_taxonomy_codes_2021E.json (default: the label)",
    )
    parser.add_argument(
        "--min-conf", type=_ranged_float("--min-conf", 0.0, 1.0), default=DEFAULT_MIN_CONFIDENCE,
        help=f"minimum confidence of a row, 0 to 1 (default {DEFAULT_MIN_CONFIDENCE})",
    )
    parser.add_argument(
        "--sensitivity", type=_ranged_float("--sensitivity", MIN_SENSITIVITY, MAX_SENSITIVITY),
        default=DEFAULT_SENSITIVITY,
        help=f"sigmoid sensitivity, {MIN_SENSITIVITY} to {MAX_SENSITIVITY}; higher values push "
        f"confidences towards 0 and 1 (default {DEFAULT_SENSITIVITY})",
    )
    parser.add_argument(
        "--overlap", type=_ranged_float("--overlap", 0.0, audio.WINDOW_SECONDS, high_inclusive=False),
        default=0.0, help="overlap of consecutive 3 s windows in seconds, 0 to under 3 (default 0)",
    )
    species = parser.add_mutually_exclusive_group()
    species.add_argument(
        "--species-file", type=pathlib.Path,
        help="text file with one label per line (Scientific name_Common name, or the "
        "scientific name alone; lines starting with # are ignored); only these species are "
        "reported, and an entry that matches no label is an error",
    )
    species.add_argument(
        "--species", type=species_spec_argument, metavar="SPEC",
        help="only report these species: LAT,LON[,WEEK] (BirdNET's range model at that latitude, "
        "longitude and week 1-48, or -1 for the whole year), @FILE or all; append +@FILE to add a "
        "file's species and -@FILE to remove them",
    )
    parser.add_argument(
        "--range-threshold", type=range_threshold_argument, default=DEFAULT_RANGE_THRESHOLD, metavar="SCORE",
        help=f"range model occurrence threshold for --species (default {DEFAULT_RANGE_THRESHOLD}, as BirdNET)",
    )
    add_threshold_arguments(parser)
    parser.add_argument(
        "--model", type=pathlib.Path,
        help="another TFLite classifier (input [1, 144000] float32 at 48 kHz, ending in a "
        "FULLY_CONNECTED layer that outputs logits); needs --labels (default: BirdNET V2.4)",
    )
    parser.add_argument(
        "--labels", type=pathlib.Path,
        help="labels file for --model, one Scientific name_Common name per line; with the "
        "default model it replaces BirdNET's labels (for example a translated file)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=ANALYZE_BATCH_SIZE,
        help=f"windows per model call (default {ANALYZE_BATCH_SIZE})",
    )
    parser.add_argument(
        "--threads", type=int, default=None,
        help="LiteRT threads (default: the number of cores, at most 4)",
    )
    add_progress_argument(parser)


def _validate(args: argparse.Namespace) -> None:
    """Check options again, for callers that build the Namespace without argparse."""
    try:
        _check_range("--min-conf", args.min_conf, 0.0, 1.0)
        _check_range("--sensitivity", args.sensitivity, MIN_SENSITIVITY, MAX_SENSITIVITY)
        _check_range("--overlap", args.overlap, 0.0, audio.WINDOW_SECONDS, high_inclusive=False)
    except argparse.ArgumentTypeError as error:
        raise AnalyzeError(str(error)) from None
    if args.batch_size < 1:
        raise AnalyzeError(f"--batch-size {args.batch_size} is invalid: use 1 or more")
    if args.threads is not None and args.threads < 1:
        raise AnalyzeError(f"--threads {args.threads} is invalid: use 1 or more")
    if args.model is not None and args.labels is None:
        raise AnalyzeError(f"--model {args.model} needs --labels with one label per output class")
    if not args.out.parent.is_dir():
        raise AnalyzeError(f"--out {args.out}: folder {args.out.parent} does not exist")
    output_format = getattr(args, "format", "csv")
    if output_format not in detection_files.FORMATS:
        raise AnalyzeError(f"--format {output_format!r} is unknown: use one of {', '.join(detection_files.FORMATS)}")
    if output_format == "raven" and args.out.exists() and not args.out.is_dir():
        raise AnalyzeError(f"--out {args.out} is a file, but --format raven writes one table per audio file "
                           "into a folder: give a folder")
    if output_format == "csv" and args.out.is_dir():
        raise AnalyzeError(f"--out {args.out} is a folder: give the CSV file to write")


def load_classifier(
    model_path: pathlib.Path | None = None,
    labels_path: pathlib.Path | None = None,
    num_threads: int | None = None,
) -> tuple[Backbone, LinearHead]:
    """Load a classifier split into a backbone and a linear head (BirdNET V2.4 by default).

    A labels file without a model relabels BirdNET V2.4, for example with
    one of its translated labels files.

    Raises:
        AnalyzeError: a file cannot be read, the model does not end in a
            FULLY_CONNECTED layer or does not take 3 s of 48 kHz audio, or
            its labels do not match its classes.
    """
    if model_path is None and labels_path is not None:
        model_path = birdnet.locate_birdnet_files().model
    try:
        model = load_source_model(model_path, labels_path)
    except (OSError, ValueError) as error:
        raise AnalyzeError(f"cannot load the model: {error}") from error
    except Exception as error:  # the flatbuffers reader raises struct.error and others on non-TFLite files
        raise AnalyzeError(f"{model_path} is not a readable TFLite model ({type(error).__name__}: {error})") from error

    backbone = Backbone(model.backbone, num_threads=num_threads)
    if backbone.window_samples != audio.WINDOW_SAMPLES:
        raise AnalyzeError(
            f"model {model_path} takes {backbone.window_samples} samples per window, but the "
            f"front end cuts {audio.WINDOW_SAMPLES} (3 s at 48 kHz)"
        )
    _LOGGER.info("loaded %s: %d classes", model_path or "BirdNET V2.4", len(model.head.labels))
    return backbone, model.head


def _select_species(args: argparse.Namespace, head: LinearHead) -> tuple[LinearHead, dict[str, float]]:
    """Cut ``head`` to the species of --species-file or --species and read --species-thresholds."""
    # Thresholds are checked against every model label, as on a recorder, so that one
    # thresholds file serves several species lists.
    try:
        thresholds = load_species_thresholds(getattr(args, "species_thresholds", None))
        per_species = thresholds.resolve(head.labels) if thresholds is not None else {}
    except SpeciesListError as error:
        raise AnalyzeError(f"--species-thresholds: {error}") from error

    spec = SpeciesSpec(args.species_file) if args.species_file is not None else getattr(args, "species", None)
    option = "--species-file" if args.species_file is not None else "--species"
    if spec is not None:
        range_model = birdnet.locate_birdnet_files().range_model if args.model is None else None
        threshold = getattr(args, "range_threshold", DEFAULT_RANGE_THRESHOLD)
        try:
            head = head.select(spec.resolve(head.labels, range_model, threshold))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise AnalyzeError(f"{option} {args.species_file or spec}: {error}") from error
    return head, per_species


def _expected_windows(paths: Sequence[pathlib.Path], overlap_s: float) -> int | None:
    """Estimate the number of windows from file headers, for the progress bar."""
    total = 0
    for path in paths:
        duration_s = audio.audio_duration(path)
        if duration_s is not None:
            total += audio.count_windows(round(duration_s * audio.SAMPLE_RATE), overlap_s)
    return total or None


def _rows(detections: Sequence[Detection]) -> list[detection_files.DetectionRow]:
    return [detection_files.DetectionRow(d.file, d.start_s, d.end_s, d.label, d.confidence) for d in detections]


def _write_csv(path: pathlib.Path, detections: list[Detection]) -> None:
    detection_files.write_csv(path, _rows(detections))


def _table_paths(arguments: Sequence[pathlib.Path], files: Sequence[pathlib.Path],
                 out: pathlib.Path) -> dict[str, pathlib.Path]:
    """Map each audio file to its table: a file found in a folder keeps its path below that folder.

    Raises:
        AnalyzeError: two audio files would get the same table, e.g. a.wav and a.flac.
    """
    folders = [path for path in arguments if path.is_dir()]
    tables: dict[str, pathlib.Path] = {}
    owners: dict[pathlib.Path, str] = {}
    for file in files:
        relative = pathlib.Path(file.name)
        for folder in folders:
            if file.is_relative_to(folder):
                relative = file.relative_to(folder)
                break
        table = out / relative.parent / detection_files.raven_table_name(relative)
        if table in owners:
            raise AnalyzeError(f"{owners[table]} and {file} would both write {table}: analyse them in separate "
                               "runs with different --out folders, or rename one")
        owners[table] = str(file)
        tables[str(file)] = table
    return tables


def _high_freq_hz(path: str) -> float:
    """Top of a selection's band for a file: 15 kHz, or its Nyquist frequency when that is lower."""
    try:
        sample_rate = soundfile.info(path).samplerate
    except (RuntimeError, OSError):
        return detection_files.HIGH_FREQ_HZ
    return min(detection_files.HIGH_FREQ_HZ, sample_rate // 2)


def _write_raven_tables(tables: dict[str, pathlib.Path], analysed: set[str], detections: list[Detection],
                        species_codes: dict[str, str] | None = None) -> int:
    """Write one table per analysed file, a ``nocall`` row for a file without detections; return the count."""
    by_file: dict[str, list[Detection]] = {}
    for detection in detections:
        by_file.setdefault(detection.file, []).append(detection)
    written = 0
    for file, table in tables.items():
        if file not in analysed and file not in by_file:
            continue
        table.parent.mkdir(parents=True, exist_ok=True)
        detection_files.write_raven_table(table, file, _rows(by_file.get(file, [])), _high_freq_hz(file),
                                          species_codes=species_codes)
        written += 1
    return written


def analyze_files(
    source: audio.FileSource,
    pipeline: InferencePipeline,
    min_confidence: float,
    sensitivity: float,
    progress=None,
    species_thresholds: Mapping[str, float] | None = None,
) -> list[Detection]:
    """Score every window of ``source`` and return the rows at or above their class's threshold, sorted.

    A class's threshold is its entry in ``species_thresholds`` (keyed by label), else ``min_confidence``.
    """
    detections: list[Detection] = []
    thresholds = threshold_vector(pipeline.head.labels, min_confidence, species_thresholds or {})  # [K]
    for batch in pipeline.run(source):
        confidences = sigmoid(batch.logits, sensitivity)  # [windows, K] float64
        rows, classes = np.nonzero(confidences >= thresholds)
        for row, label_index in zip(rows.tolist(), classes.tolist()):
            window = batch.windows[row]
            detections.append(Detection(
                file=window.source,
                start_s=round(window.offset_s, 6),
                end_s=round(window.offset_s + window.duration_s, 6),
                label=batch.head.labels[label_index],
                confidence=float(confidences[row, label_index]),
            ))
        if progress is not None:
            progress.update(len(batch.windows))

    detections.sort(key=lambda d: (d.file, d.start_s, -d.confidence, d.label))
    return detections


def run(args: argparse.Namespace) -> int:
    """Analyse the files named in ``args`` and write the CSV or the Raven tables; return the exit code.

    Returns 0 if at least one file was analysed, 2 if none was or an option
    or model file is invalid. Unreadable files are logged and skipped.
    """
    try:
        _validate(args)
        backbone, head = load_classifier(args.model, args.labels, args.threads)
        head, per_species = _select_species(args, head)
    except AnalyzeError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED

    # Folders are expanded once, so that each skipped file is logged once.
    files = audio.find_audio_files(args.paths)
    output_format = getattr(args, "format", "csv")
    tables = {}
    species_codes = None
    if output_format == "raven":
        try:
            tables = _table_paths(args.paths, files, args.out)
            if getattr(args, "species_codes", None) is not None:
                species_codes = detection_files.load_species_codes(args.species_codes)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_FAILED
    source = audio.FileSource(files, overlap_s=args.overlap)
    pipeline = InferencePipeline(backbone, head, batch_size=args.batch_size)
    enabled = getattr(args, "progress", True)
    total = _expected_windows(files, args.overlap) if enabled else None
    progress = progress_bar(total=total, unit="window", enabled=enabled)
    try:
        detections = analyze_files(source, pipeline, args.min_conf, args.sensitivity, progress, per_species)
    finally:
        progress.close()

    print(
        f"analysed {source.files_read} file(s), {source.files_rejected} unreadable; "
        f"{pipeline.windows_scored} windows, {len(detections)} rows with confidence >= "
        f"{args.min_conf}",
        file=sys.stderr,
    )
    if source.files_read == 0:
        print("error: no file could be analysed, so nothing was written", file=sys.stderr)
        return EXIT_FAILED

    if output_format == "raven":
        analysed = {str(file) for file in files} - {error.path for error in source.errors}
        args.out.mkdir(exist_ok=True)
        written = _write_raven_tables(tables, analysed, detections, species_codes)
        print(f"wrote {written} Raven selection table(s) to {args.out}", file=sys.stderr)
        return EXIT_OK
    _write_csv(args.out, detections)
    print(f"wrote {args.out}", file=sys.stderr)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``python -m dawnchorus.edge.analyze``."""
    parser = argparse.ArgumentParser(
        prog="python -m dawnchorus.edge.analyze",
        description="Detect bird species in audio files with BirdNET and write a CSV or Raven selection tables.",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
