"""Stability of streaming NOTELA over a stream ten times longer than one benchmark domain.

The stream is one domain spec built with ``--passes`` consecutive seeds
(``spec.seed``, ``spec.seed + 1``, ...), so every pass has the same site,
species and backgrounds but freshly drawn windows. The passes are built into
the normal domain cache and concatenated in seed order. The streaming method
(``--method``, notela-streaming by default) then runs once over the whole
stream per method seed, with the method's table of the hyperparameters file
when it exists and the defaults of ``MethodSettings`` otherwise.
``--buffer-capacity`` below the stream's length makes the buffer evict.

For each pass the script scores, on that pass's windows only:

- the source head;
- ``online``: each window scored by the head in force when it arrived;
- ``end of pass``: the head in force after the pass's last window was added
  and any round then due had run. Rounds run at chunk boundaries, so when a
  pass does not end on one, this head has not yet trained on the pass's last
  partial chunk;
- the final head of the stream, on the first pass's windows.

It also counts the candidate heads that the collapse guard blocked in each
pass. Three drift indicators follow each pass: the guard's mean top score in
the pass's last round relative to the source head's, the relative L2 change
of the head's weights, and the mean shift of its biases from the source head.

Usage:

    .venv/bin/python benchmarks/long_stream.py --passes 10 --method-seeds 2 --out /tmp/long_stream.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import pathlib
import shlex
import sys
import time
from typing import Any

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_SPEC = REPO / "benchmarks" / "domains" / "western-north-america.toml"
METHOD = "notela-streaming"
STREAMING_METHODS = ("notela-streaming", "notela-streaming-source-teacher", "notela-streaming-prior-shift")

_LOGGER = logging.getLogger("long_stream")

# (result key, column title, scale): metrics of ``evaluate`` shown in the tables.
_COLUMNS = (
    ("sample_map", "mAP", 100.0),
    ("class_map", "cmAP", 100.0),
    ("precision", "precision", 100.0),
    ("recall", "recall", 100.0),
    ("false_detections_per_hour", "false / h", 1.0),
)


@dataclasses.dataclass
class WindowSlice:
    """The labeled windows of one pass, in the layout that ``metrics.evaluate`` reads."""

    classes: list[str]
    labels: np.ndarray
    bird_free: np.ndarray
    window_seconds: float


@dataclasses.dataclass
class Stream:
    """The concatenated passes.

    Attributes:
        names: domain name of each pass, e.g. ``western-north-america-seed2025``.
        bounds: [passes + 1] window index where each pass starts, then the total.
        classes: the K site classes, the same in every pass.
        embeddings: [windows, 1024] float32 in stream order.
        labels: [windows, K] bool.
        bird_free: [windows] bool.
        window_seconds: length of one window in seconds.
    """

    names: list[str]
    bounds: list[int]
    classes: list[str]
    embeddings: np.ndarray
    labels: np.ndarray
    bird_free: np.ndarray
    window_seconds: float

    def window_slice(self, index: int) -> WindowSlice:
        start, end = self.bounds[index], self.bounds[index + 1]
        return WindowSlice(self.classes, self.labels[start:end], self.bird_free[start:end], self.window_seconds)


def build_stream(spec_path: pathlib.Path, passes: int, cache: pathlib.Path,
                 data_root: pathlib.Path | None) -> tuple[Stream, float]:
    """Build or load each pass's domain and concatenate them. Returns the stream and the seconds it took."""
    from dawnchorus.evaluation.domains import load_domain, load_spec

    spec = load_spec(spec_path)
    if spec.kind != "mixed":
        raise ValueError(f"{spec_path} is a {spec.kind!r} domain; a new seed only redraws a 'mixed' domain")

    started = time.monotonic()
    domains = []
    for offset in range(passes):
        seed = spec.seed + offset
        pass_spec = dataclasses.replace(spec, seed=seed, name=f"{spec.name}-seed{seed}")
        pass_started = time.monotonic()
        domain = load_domain(pass_spec, cache, data_root)
        _LOGGER.info("pass %d: %s, %d windows, ready in %.1f s", offset + 1, domain.name, len(domain.embeddings),
                     time.monotonic() - pass_started)
        if domains and domain.classes != domains[0].classes:
            # NOTE: classes are the range-model list plus the labeled species,
            # so a seed that never draws one focal species changes them.
            raise ValueError(f"{domain.name} has {len(domain.classes)} classes and {domains[0].name} "
                             f"{len(domains[0].classes)}; the passes must share one class list")
        domains.append(domain)
    seconds = time.monotonic() - started

    bounds = np.cumsum([0] + [len(domain.embeddings) for domain in domains]).tolist()
    stream = Stream(
        names=[domain.name for domain in domains],
        bounds=[int(bound) for bound in bounds],
        classes=list(domains[0].classes),
        embeddings=np.concatenate([domain.embeddings for domain in domains]).astype(np.float32),
        labels=np.concatenate([domain.labels for domain in domains]),
        bird_free=np.concatenate([domain.bird_free for domain in domains]),
        window_seconds=float(domains[0].window_seconds),
    )
    return stream, seconds


def round_window_counts(windows: int, chunk_size: int, min_buffer: int, buffer_capacity: int) -> list[int]:
    """Return the number of stream windows added before each round of ``notela-streaming``.

    This repeats the schedule of ``methods._run_notela_streaming`` and
    ``SiteAdapter.round_due``: chunks of ``chunk_size``, a round once the
    buffer contains ``min(min_buffer, buffer_capacity)`` windows and a full
    chunk is pending, and a last round on any remainder. ``analyse_run``
    checks the result against the run's online logits.
    """
    min_buffer = min(min_buffer, buffer_capacity)
    counts = []
    added = pending = 0
    for start in range(0, windows, chunk_size):
        chunk = min(chunk_size, windows - start)
        added += chunk
        pending += chunk
        if min(added, buffer_capacity) >= min_buffer and pending >= chunk_size:
            counts.append(added)
            pending = 0
    if pending > 0 and min(added, buffer_capacity) >= 2:
        counts.append(added)
    return counts


def check_schedule(result, embeddings: np.ndarray, source_head, counts: list[int], chunk_size: int) -> None:
    """Raise if ``counts`` does not match the run: the round count, and which head scored each chunk online."""
    if len(counts) != len(result.heads):
        raise RuntimeError(f"expected {len(counts)} rounds from the chunk schedule, the run has {len(result.heads)}; "
                           "update round_window_counts to the schedule of methods._run_notela_streaming")
    for start in range(0, len(embeddings), chunk_size):
        done = sum(1 for count in counts if count <= start)
        head = result.heads[done - 1] if done else source_head
        rows = slice(start, start + chunk_size)
        expected = head.logits(embeddings[rows])
        if not np.allclose(result.online_logits[rows], expected, rtol=1e-4, atol=1e-3):
            raise RuntimeError(f"the online logits of windows {start}+ do not come from the head after round {done}; "
                               "update round_window_counts to the schedule of methods._run_notela_streaming")


def _head_change(head, source_head) -> tuple[float, float]:
    """Return the relative L2 change of the weights and the mean bias shift in logits, both against the source."""
    source_weights = source_head.weights.astype(np.float64)
    weight_change = float(np.linalg.norm(head.weights.astype(np.float64) - source_weights)
                          / np.linalg.norm(source_weights))
    bias_shift = float(np.mean(head.bias.astype(np.float64) - source_head.bias.astype(np.float64)))
    return weight_change, bias_shift


def analyse_run(result, stream: Stream, source_head, settings: dict[str, Any], threshold: float) -> dict[str, Any]:
    """Score one ``notela-streaming`` run pass by pass."""
    from dawnchorus.evaluation.methods import MethodSettings
    from dawnchorus.evaluation.metrics import evaluate

    resolved = MethodSettings(**settings)
    counts = round_window_counts(len(stream.embeddings), resolved.chunk_size, resolved.min_buffer,
                                 resolved.buffer_capacity)
    check_schedule(result, stream.embeddings, source_head, counts, resolved.chunk_size)
    if not result.logits_by_round:
        raise RuntimeError(f"the run had no round: {len(stream.embeddings)} windows are too few for a chunk size of "
                           f"{resolved.chunk_size}; lower chunk_size or add passes")
    first_start, first_end = stream.bounds[0], stream.bounds[1]

    passes = []
    for index in range(len(stream.names)):
        start, end = stream.bounds[index], stream.bounds[index + 1]
        windows = stream.window_slice(index)
        rounds = [r for r, count in enumerate(counts) if start < count <= end]
        done = sum(1 for count in counts if count <= end)
        record: dict[str, Any] = {
            "pass": index + 1,
            "domain": stream.names[index],
            "rounds": len(rounds),
            "blocked": int(sum(1 for r in rounds if not result.stats[r]["accepted"])),
            "end_head_windows_seen": counts[done - 1] if done else 0,
            "online": evaluate(result.online_logits[start:end], windows, threshold),
        }
        if done:
            end_logits = result.logits_by_round[done - 1]
            record["end_of_pass"] = evaluate(end_logits[start:end], windows, threshold)
            record["end_head_on_first_pass"] = evaluate(end_logits[first_start:first_end],
                                                        stream.window_slice(0), threshold)
            last = result.stats[rounds[-1]] if rounds else result.stats[done - 1]
            record["top_score_ratio"] = last["candidate_mean_top_score"] / last["source_mean_top_score"]
            record["weight_change"], record["bias_shift"] = _head_change(result.heads[done - 1], source_head)
        passes.append(record)

    final_on_first = evaluate(result.logits_by_round[-1][first_start:first_end], stream.window_slice(0), threshold)
    return {"passes": passes, "final_on_first_pass": final_on_first, "blocked_total": int(result.blocked_heads),
            "rounds_total": len(result.heads)}


def _cell(values: list[float], scale: float) -> str:
    finite = [value for value in values if value is not None and math.isfinite(value)]
    if not finite:
        return "n/a"
    digits = 1 if scale == 100.0 else 0
    text = f"{scale * float(np.mean(finite)):.{digits}f}"
    if len(finite) > 1:
        text += f" ± {scale * float(np.std(finite)):.{digits}f}"
    return text


def _metric_cells(records: list[dict[str, float]], baseline: dict[str, float] | None = None) -> list[str]:
    cells = [_cell([record[key] for record in records], scale) for key, _, scale in _COLUMNS]
    if baseline is not None:
        for key in ("sample_map", "class_map"):
            deltas = [record[key] - baseline[key] for record in records]
            cells.append(f"{100 * float(np.mean(deltas)):+.1f}")
    return cells


def _header(first: list[str], extra: list[str]) -> list[str]:
    titles = first + [title for _, title, _ in _COLUMNS] + extra
    return ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]


def render_tables(runs: list[dict[str, Any]], source: list[dict[str, float]], stream: Stream) -> str:
    """Render the per-pass, drift and first-pass tables as markdown, with ± the standard deviation over method seeds."""
    lines = ["Per pass: source head, online scoring, and the head at the end of the pass, each on that pass's "
             "windows. Δ is against the source head on the same windows, in points.", ""]
    lines += _header(["pass", "head"], ["Δ mAP", "Δ cmAP", "rounds", "blocked"])
    for index in range(len(stream.names)):
        pass_runs = [run["passes"][index] for run in runs]
        number = index + 1
        blocked = ", ".join(str(record["blocked"]) for record in pass_runs)
        lines.append(f"| {number} | source | " + " | ".join(_metric_cells([source[index]], source[index]))
                     + f" | {pass_runs[0]['rounds']} | {blocked} |")
        lines.append(f"| {number} | online | "
                     + " | ".join(_metric_cells([record["online"] for record in pass_runs], source[index])) + " | | |")
        ended = [record["end_of_pass"] for record in pass_runs if "end_of_pass" in record]
        if ended:
            seen = pass_runs[0]["end_head_windows_seen"]
            lines.append(f"| {number} | end of pass (after window {seen}) | "
                         + " | ".join(_metric_cells(ended, source[index])) + " | | |")

    lines += ["", "Drift: the head at the end of each pass on the first pass's windows, the guard's mean top score "
              "of the pass's last round over the source head's (on the buffer), the relative L2 change of "
              "the head's weights from the source head, and the mean change of its biases in logits.", ""]
    lines += _header(["pass"], ["Δ mAP", "Δ cmAP", "top score ratio", "weight change", "mean bias shift"])
    for index in range(len(stream.names)):
        pass_runs = [run["passes"][index] for run in runs if "end_head_on_first_pass" in run["passes"][index]]
        if not pass_runs:
            continue
        cells = _metric_cells([record["end_head_on_first_pass"] for record in pass_runs], source[0])
        for key in ("top_score_ratio", "weight_change", "bias_shift"):
            values = [record[key] for record in pass_runs]
            cells.append(f"{float(np.mean(values)):.3f}")
        lines.append(f"| {index + 1} | " + " | ".join(cells) + " |")

    lines += ["", f"First pass ({stream.names[0]}): the end-of-pass-1 head against the final head of the stream.", ""]
    lines += _header(["head"], ["Δ mAP", "Δ cmAP"])
    lines.append("| source | " + " | ".join(_metric_cells([source[0]], source[0])) + " |")
    first_end = [run["passes"][0]["end_of_pass"] for run in runs if "end_of_pass" in run["passes"][0]]
    if first_end:
        lines.append("| end of pass 1 | " + " | ".join(_metric_cells(first_end, source[0])) + " |")
    lines.append(f"| final (after window {stream.bounds[-1]}) | "
                 + " | ".join(_metric_cells([run["final_on_first_pass"] for run in runs], source[0])) + " |")
    if first_end:
        differences = []
        for key in ("sample_map", "class_map"):
            values = [run["final_on_first_pass"][key] - run["passes"][0]["end_of_pass"][key] for run in runs]
            differences.append(f"{key} {100 * float(np.mean(values)):+.2f} ({', '.join(f'{100 * v:+.2f}' for v in values)})")
        lines += ["", "Final minus end-of-pass-1 head on pass 1, points, mean (per method seed): "
                  + "; ".join(differences)]
    return "\n".join(lines)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    from dawnchorus.evaluation.cli import DEFAULT_CACHE
    from dawnchorus.evaluation.runner import DEFAULT_HYPERPARAMETERS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=pathlib.Path, default=DEFAULT_SPEC,
                        help="mixed domain spec (TOML) that each pass redraws (default %(default)s)")
    parser.add_argument("--passes", type=int, default=10,
                        help="passes, each the spec built with the next seed (default %(default)s)")
    parser.add_argument("--method", choices=STREAMING_METHODS, default=METHOD,
                        help="streaming method and hyperparameter table (default %(default)s)")
    parser.add_argument("--method-seeds", type=int, default=2,
                        help="runs of the method over the stream, seeds 0, 1, ... (default %(default)s)")
    parser.add_argument("--hyperparameters", type=pathlib.Path, default=DEFAULT_HYPERPARAMETERS,
                        help="TOML with a [notela-streaming] table; when the file is missing the defaults of "
                             "MethodSettings apply (default %(default)s)")
    parser.add_argument("--buffer-capacity", type=int, default=None,
                        help="override the buffer capacity of the settings, e.g. below the stream's length "
                             "so that evictions happen (default: the settings' own)")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="detection threshold on the sigmoid score (default %(default)s)")
    parser.add_argument("--cache", type=pathlib.Path, default=DEFAULT_CACHE,
                        help="folder of built domains (default %(default)s)")
    parser.add_argument("--data-root", type=pathlib.Path, default=None,
                        help="root of the paths in the spec (default: ../shared/data beside the repository)")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="also write every number as JSON here")
    args = parser.parse_args(argv)
    if args.passes < 1:
        parser.error(f"--passes must be at least 1, got {args.passes}")
    if args.buffer_capacity is not None and args.buffer_capacity < 2:
        parser.error(f"--buffer-capacity must be at least 2, got {args.buffer_capacity}")
    if args.method_seeds < 1:
        parser.error(f"--method-seeds must be at least 1, got {args.method_seeds}")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_arguments(argv)
    command = " ".join(shlex.quote(part) for part in [sys.executable, *sys.argv])
    started = time.monotonic()

    from dawnchorus.evaluation.methods import MethodSettings, adapt
    from dawnchorus.evaluation.metrics import evaluate
    from dawnchorus.evaluation.runner import load_hyperparameters, method_settings
    from dawnchorus.models.backbone import load_source_model

    hyperparameters_found = args.hyperparameters.is_file()
    settings = method_settings(load_hyperparameters(args.hyperparameters), args.method, quick=False)
    if args.buffer_capacity is not None:
        settings["buffer_capacity"] = args.buffer_capacity
    settings_source = (f"[{args.method}] and [default] of {args.hyperparameters}" if hyperparameters_found
                       else f"MethodSettings defaults ({args.hyperparameters} not found)")
    _LOGGER.info("settings from %s: %s", settings_source, settings)

    stream, build_seconds = build_stream(args.spec, args.passes, args.cache, args.data_root)
    _LOGGER.info("stream: %d passes, %d windows, %d classes, loaded or built in %.0f s",
                 len(stream.names), len(stream.embeddings), len(stream.classes), build_seconds)

    source_head = load_source_model().head.select(stream.classes)
    source_logits = source_head.logits(stream.embeddings)
    source = [evaluate(source_logits[stream.bounds[i]:stream.bounds[i + 1]], stream.window_slice(i), args.threshold)
              for i in range(len(stream.names))]

    runs = []
    for seed in range(args.method_seeds):
        run_started = time.monotonic()
        result = adapt(args.method, source_head, stream.embeddings, settings, seed)
        adapt_seconds = time.monotonic() - run_started
        analysis = analyse_run(result, stream, source_head, settings, args.threshold)
        analysis.update(seed=seed, adapt_seconds=round(adapt_seconds, 1))
        runs.append(analysis)
        del result
        _LOGGER.info("method seed %d: %d rounds, %d blocked, adapted in %.0f s", seed, analysis["rounds_total"],
                     analysis["blocked_total"], adapt_seconds)

    total_seconds = time.monotonic() - started
    print(f"## Long stream: {args.spec.stem} x {len(stream.names)} passes ({len(stream.embeddings)} windows), "
          f"{args.method}, {len(runs)} method seed(s)")
    print()
    print(f"Settings from {settings_source}: {json.dumps(settings, sort_keys=True)}")
    print(f"Passes: {', '.join(stream.names)}")
    capacity = int(settings.get("buffer_capacity", MethodSettings.buffer_capacity))
    evicted = max(0, len(stream.embeddings) - capacity)
    print(f"Buffer: capacity {capacity}; {evicted} windows evicted"
          + (f", each slot refilled {evicted / capacity:.2f} times on average" if evicted else ""))
    print(f"Time: {total_seconds:.0f} s in all; {build_seconds:.0f} s to build or load the passes; "
          f"adaptation {', '.join(str(run['adapt_seconds']) for run in runs)} s per method seed")
    print()
    print(render_tables(runs, source, stream))
    print()
    print("Command:")
    print()
    print(f"    {command}")

    if args.out is not None:
        document = {"command": command, "settings": settings, "settings_source": settings_source,
                    "passes": stream.names, "bounds": stream.bounds, "source": source, "runs": runs,
                    "build_seconds": round(build_seconds, 1), "total_seconds": round(total_seconds, 1)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(document, indent=1, default=float, allow_nan=True) + "\n", encoding="utf-8")
        _LOGGER.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
