"""Time the neighbour update of a full buffer and a whole streaming NOTELA round.

For full buffers of 1,000, 5,000 and 20,000 embeddings and 256 new ones, it
reports three median times. ``NeighbourBuffer.add`` is the incremental
neighbour update. ``NeighbourBuffer.rebuild``, a brute-force recomputation of
every neighbour list, is the reference. A whole NOTELA round is the update,
mutual neighbours, teacher logits for the whole buffer, pseudo-labels and a few
student steps. The round is skipped when ``dawnchorus.models.notela`` cannot
be imported.

Data: BirdNET V2.4 embeddings of the 3 s windows of the recordings under
``--soundscapes`` (files that are not 48 kHz are resampled with soxr), with
the source head restricted to the K classes of highest mean logit on them.
Each buffer row is a randomly chosen real embedding plus Gaussian noise of 0.1
times that dimension's standard deviation over the real set, clipped at 0 as
BirdNET embeddings never go negative. Without the BirdNET model, or with
``--synthetic``, the base embeddings and the head are random.

Run from the repository root:

    .venv/bin/python benchmarks/round_time.py
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
import types
from typing import Any, Callable

import numpy as np

from dawnchorus.models.birdnet import ModelFileError
from dawnchorus.server.buffer import NeighbourBuffer

_LOGGER = logging.getLogger(__name__)

_DEFAULT_SOUNDSCAPES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "soundscapes"
_SAMPLE_RATE = 48_000
_WINDOW_SAMPLES = 144_000
_EMBEDDING_DIM = 1024


@dataclasses.dataclass
class SourceData:
    """Base embeddings and a source head to build the benchmark from.

    Attributes:
        embeddings: [windows, 1024] float32 base embeddings.
        weights: [K, 1024] float32 head weights.
        bias: [K] float32 head bias.
        labels: the K class labels.
        description: where the data came from, for the report.
    """

    embeddings: np.ndarray
    weights: np.ndarray
    bias: np.ndarray
    labels: list[str]
    description: str


def read_windows(paths: list[pathlib.Path]) -> np.ndarray:
    """Return the whole 3 s windows [windows, 144000] float32 of the recordings, at 48 kHz mono."""
    import soundfile
    import soxr

    windows = []
    for path in paths:
        audio, sample_rate = soundfile.read(path, dtype="float32", always_2d=True)
        mono = audio.mean(axis=1)
        if sample_rate != _SAMPLE_RATE:
            mono = soxr.resample(mono, sample_rate, _SAMPLE_RATE).astype(np.float32)
        count = len(mono) // _WINDOW_SAMPLES
        windows.append(mono[: count * _WINDOW_SAMPLES].reshape(count, _WINDOW_SAMPLES))
    return np.concatenate(windows)


def load_birdnet_data(soundscapes: pathlib.Path, classes: int) -> SourceData:
    """Embed the soundscape recordings with BirdNET V2.4 and cut its head to ``classes`` classes."""
    from dawnchorus.models import backbone, birdnet

    files = birdnet.locate_birdnet_files(fetch=False)
    split = backbone.split_model(files.model.read_bytes())
    labels = birdnet.read_labels(files.labels)
    model = backbone.Backbone(split.backbone)

    paths = sorted(soundscapes.rglob("*.flac")) + sorted(soundscapes.rglob("*.wav"))
    if not paths:
        raise FileNotFoundError(f"no .flac or .wav recordings under {soundscapes}; pass --soundscapes or --synthetic")
    windows = read_windows(paths)
    embeddings = np.concatenate([model.embed(windows[start : start + 32]) for start in range(0, len(windows), 32)])

    mean_logits = (embeddings @ split.weights.T + split.bias).mean(axis=0)
    chosen = np.sort(np.argsort(mean_logits)[::-1][:classes])
    description = (
        f"BirdNET V2.4 embeddings of {len(embeddings)} windows from {len(paths)} recordings "
        f"under {soundscapes.name}/, head cut to the {classes} classes of highest mean logit"
    )
    return SourceData(
        embeddings, split.weights[chosen], split.bias[chosen], [labels[i] for i in chosen], description
    )


def make_synthetic_data(rng: np.random.Generator, classes: int) -> SourceData:
    """Return random non-negative base embeddings in 40 clusters and a random head."""
    centres = np.abs(rng.normal(0.4, 0.35, size=(40, _EMBEDDING_DIM)))
    embeddings = np.abs(centres[rng.integers(0, 40, size=400)] + rng.normal(0, 0.1, size=(400, _EMBEDDING_DIM)))
    weights = rng.normal(0, 0.05, size=(classes, _EMBEDDING_DIM))
    bias = np.full(classes, -8.0)
    labels = [f"Species {i}_Species {i}" for i in range(classes)]
    description = "random non-negative embeddings in 40 clusters (BirdNET not used), random head"
    return SourceData(
        embeddings.astype(np.float32), weights.astype(np.float32), bias.astype(np.float32), labels, description
    )


def sample_embeddings(rng: np.random.Generator, base: np.ndarray, count: int) -> np.ndarray:
    """Return [count, dim] float32: random rows of ``base`` plus 0.1-standard-deviation noise, clipped at 0."""
    spread = base.std(axis=0)
    rows = base[rng.integers(0, len(base), size=count)]
    noisy = rows + rng.normal(0.0, 1.0, size=rows.shape) * (0.1 * spread)
    return np.maximum(noisy, 0.0).astype(np.float32)


def time_call(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def machine_description() -> str:
    model = platform.processor() or "unknown processor"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError) as error:
        _LOGGER.warning("lscpu failed (%s); the processor model comes from platform.processor()", error)
    return f"{os.cpu_count()} CPUs ({model}), {platform.system()} {platform.machine()}, numpy {np.__version__}"


def run_round(
    buffer: NeighbourBuffer,
    trainer: Any,
    notela: types.ModuleType,
    new_rows: np.ndarray,
    steps: int,
    batch_size: int,
) -> dict[str, float]:
    """Run one streaming NOTELA round and return the time of each part in seconds.

    Args:
        trainer: a ``notela.HeadTrainer``.
        notela: the ``dawnchorus.models.notela`` module.
        new_rows: [U, 1024] float32 embeddings to add.
    """
    times = {}
    start = time.perf_counter()
    buffer.add(new_rows)
    times["update"] = time.perf_counter() - start

    mark = time.perf_counter()
    mutual = buffer.mutual_neighbours()
    logits = trainer.logits(buffer.embeddings)
    targets = notela.notela_targets(logits, mutual, 1.0, 1.0)
    times["teacher"] = time.perf_counter() - mark

    mark = time.perf_counter()
    trainer.fit(buffer.embeddings, targets, steps, batch_size)
    times["student"] = time.perf_counter() - mark
    times["round"] = time.perf_counter() - start
    return times


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000], help="buffer capacities")
    parser.add_argument("--new", type=int, default=256, help="new embeddings per update (U)")
    parser.add_argument("--repeats", type=int, default=7, help="timed updates and rounds per buffer size")
    parser.add_argument(
        "--reference-repeats", type=int, default=3,
        help="timed full recomputations per buffer size; buffers above 10,000 get one",
    )
    parser.add_argument("--classes", type=int, default=150, help="head classes (K)")
    parser.add_argument("--steps", type=int, default=8, help="student steps per round")
    parser.add_argument("--batch-size", type=int, default=256, help="windows per student step")
    parser.add_argument("--soundscapes", type=pathlib.Path, default=_DEFAULT_SOUNDSCAPES,
                        help="folder of .flac/.wav recordings to embed")
    parser.add_argument("--synthetic", action="store_true", help="use random embeddings, not BirdNET")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random data")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    rng = np.random.default_rng(arguments.seed)

    source = None
    if not arguments.synthetic:
        try:
            source = load_birdnet_data(arguments.soundscapes, arguments.classes)
        except (ImportError, OSError, ModelFileError) as error:
            print(f"BirdNET data not available ({error}); using random embeddings")
    if source is None:
        source = make_synthetic_data(rng, arguments.classes)

    try:
        from dawnchorus.models import head, notela
    except ImportError as error:
        notela = None
        print(f"NOTELA round skipped: dawnchorus.models.notela cannot be imported ({error})")

    print(f"machine: {machine_description()}")
    print(f"data: {source.description}")
    print(f"load average before: {os.getloadavg()[0]:.2f}")

    header = "| buffer | update, U = {u} | full recompute | ratio | recomputed rows | NOTELA round | teacher | student |"
    lines = [
        header.format(u=arguments.new),
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for size in arguments.sizes:
        buffer = NeighbourBuffer(capacity=size)
        fill_seconds = time_call(lambda: buffer.add(sample_embeddings(rng, source.embeddings, size)))

        updates = []
        recomputed = []
        for _ in range(arguments.repeats):
            rows = sample_embeddings(rng, source.embeddings, arguments.new)
            updates.append(time_call(lambda: buffer.add(rows)))
            recomputed.append(buffer.last_add_stats.recomputed_rows)

        reference_repeats = 1 if size > 10_000 else arguments.reference_repeats
        references = [time_call(buffer.rebuild) for _ in range(reference_repeats)]

        update = statistics.median(updates)
        reference = statistics.median(references)
        round_cells = ["skipped", "", ""]
        if notela is not None:
            source_head = head.LinearHead(source.labels, source.weights, source.bias)
            trainer = notela.HeadTrainer(source_head, learning_rate=1e-3, dropout_rate=0.1, train_affine=True, seed=0)
            # The first round traces the TensorFlow functions, so it is not timed.
            run_round(buffer, trainer, notela, sample_embeddings(rng, source.embeddings, arguments.new),
                      arguments.steps, arguments.batch_size)
            rounds = [
                run_round(buffer, trainer, notela, sample_embeddings(rng, source.embeddings, arguments.new),
                          arguments.steps, arguments.batch_size)
                for _ in range(arguments.repeats)
            ]
            round_cells = [
                f"{statistics.median(r[part] for r in rounds) * 1000:.0f} ms"
                for part in ("round", "teacher", "student")
            ]

        lines.append(
            f"| {size:,} | {update * 1000:.0f} ms | {reference:.2f} s | {reference / update:.0f}x "
            f"| {statistics.median(recomputed):.0f} | " + " | ".join(round_cells) + " |"
        )
        print(f"buffer {size:,}: first fill {fill_seconds:.2f} s, updates {[round(t * 1000) for t in updates]} ms")

    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print()
    print("\n".join(lines))
    if notela is not None:
        print(
            f"\nNOTELA round: update + mutual neighbours + teacher logits of the whole buffer + pseudo-labels "
            f"(lambda 1, alpha 1) + {arguments.steps} student steps of {arguments.batch_size}, "
            f"K = {arguments.classes}, affine on. Medians of {arguments.repeats}; full recompute: median of "
            f"{arguments.reference_repeats} (1 above 10,000)."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
