"""Find where streaming NOTELA's gain in sample-wise mAP comes from, and check the collapse guard.

For each domain it prints six markdown tables:

1. per labeled species, the AP of the source head and of streaming NOTELA's
   final head, and the change of the class's bias and logits. The classes
   that never occur get the same changes in one row. A second table gives
   sample-wise mAP with the adapted logits on one group of classes only;
2. per SNR bin (the largest event SNR of a window) and for bird-free windows,
   sample-wise mAP, recall and false detections of both heads;
3. final mAP and cmAP of notela-streaming for several buffer capacities;
4. shares of mutual neighbour pairs that share a background recording or a
   species, against the same shares over all window pairs;
5. a bias-only head (source weights, streaming NOTELA's biases) against the
   full adapted head;
6. the collapse guard's decision on every candidate head of every method.

Settings come from benchmarks/hyperparameters.toml when it exists, else
(or with ``--method-defaults``) from the defaults of ``MethodSettings``. For
notela-streaming, table 6 checks every round's candidate, also the ones the
adapter's own guard blocked. Run from the repository root:

    .venv/bin/python benchmarks/analysis.py
"""

from __future__ import annotations

import argparse
import math
import pathlib
import time

import numpy as np

# methods sets TensorFlow's log level before TensorFlow loads, so it comes first.
# NOTE: _guard_config is private to methods. Table 6 imports it to check heads with the guard settings of adapt.
from dawnchorus.evaluation.methods import MethodSettings, _guard_config, adapt
from dawnchorus.evaluation import METHOD_NAMES
from dawnchorus.evaluation.cli import DEFAULT_CACHE
from dawnchorus.evaluation.domains import Domain, load_domain, read_manifest
from dawnchorus.evaluation.metrics import average_precision, class_map, detection_logit, evaluate, sample_map
from dawnchorus.evaluation.runner import DEFAULT_HYPERPARAMETERS, load_hyperparameters, method_settings
from dawnchorus.models.backbone import load_source_model
from dawnchorus.models.head import LinearHead
from dawnchorus.server.adaptation import SiteAdapter, check_collapse
from dawnchorus.server.buffer import NeighbourBuffer

REPO = pathlib.Path(__file__).resolve().parents[1]
DOMAINS = ("western-north-america", "europe")
BUFFER_CAPACITIES = (256, 512, 1100)
SNR_BINS = ((-math.inf, -6.0, "< -6 dB"), (-6.0, 0.0, "-6 to 0 dB"), (0.0, math.inf, ">= 0 dB"))
# A head that passes the guard with sample-wise mAP this far below the source's counts as a missed collapse.
COLLAPSE_MAP_DROP = 0.05


def print_table(header: list[str], rows: list[list]) -> None:
    """Print a markdown table and a blank line."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
    print()


def points(value: float) -> str:
    """Format a share in [0, 1] as percentage points, or n/a when it is NaN."""
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def false_per_hour(logits: np.ndarray, labels: np.ndarray, window_seconds: float) -> float:
    """Count detections at a score of 0.5 of classes that a window does not contain, per hour of those windows."""
    false = (logits >= detection_logit(0.5)) & ~labels
    return float(false.sum()) / (len(labels) * window_seconds / 3600.0)


def per_class_table(domain: Domain, source: LinearHead, adapted: LinearHead) -> None:
    """Print table 1: per-class AP and bias shift, and whether absent classes carry the mAP gain."""
    source_logits = source.logits(domain.embeddings)
    adapted_logits = adapted.logits(domain.embeddings)
    bias_shift = adapted.bias.astype(np.float64) - source.bias
    logit_change = adapted_logits.astype(np.float64) - source_logits
    logit_shift, logit_spread = logit_change.mean(axis=0), logit_change.std(axis=0)
    positives = domain.labels.sum(axis=0)
    present = positives > 0

    rows = []
    for c in np.flatnonzero(present):
        before = average_precision(source_logits[:, c], domain.labels[:, c])
        after = average_precision(adapted_logits[:, c], domain.labels[:, c])
        rows.append([domain.classes[c].split("_")[-1], int(positives[c]), points(before), points(after),
                     f"{100 * (after - before):+.1f}", f"{bias_shift[c]:+.2f}", f"{logit_shift[c]:+.2f}", f"{logit_spread[c]:.2f}"])
    for name, mask in (("all labeled species", present), ("classes that never occur", ~present)):
        rows.append([f"**{name}** ({int(mask.sum())})", "", "", "", "",
                     f"{bias_shift[mask].mean():+.2f}", f"{logit_shift[mask].mean():+.2f}",
                     f"{logit_spread[mask].mean():.2f}"])
    print_table(["species", "positive windows", "AP source", "AP adapted", "Δ AP", "Δ bias", "mean Δ logit",
                 "sd Δ logit"], rows)

    # Swap in the adapted logits for one group of classes at a time.
    absent_only = np.where(present[None, :], source_logits, adapted_logits)
    labeled_only = np.where(present[None, :], adapted_logits, source_logits)
    print_table(["logits", "sample-wise mAP"], [
        ["source", points(sample_map(source_logits, domain.labels))],
        ["adapted on absent classes, source on labeled species", points(sample_map(absent_only, domain.labels))],
        ["adapted on labeled species, source on absent classes", points(sample_map(labeled_only, domain.labels))],
        ["adapted", points(sample_map(adapted_logits, domain.labels))],
    ])


def snr_table(domain: Domain, source: LinearHead, adapted: LinearHead) -> None:
    """Print table 2: mAP, recall and false detections per SNR bin and on bird-free windows."""
    groups = [(label, (domain.snr_db >= low) & (domain.snr_db < high)) for low, high, label in SNR_BINS]
    groups.append(("bird-free", domain.bird_free))
    heads = (source.logits(domain.embeddings), adapted.logits(domain.embeddings))
    rows = []
    for label, mask in groups:
        labels = domain.labels[mask]
        row = [label, int(mask.sum())]
        for logits in heads:
            detected = logits[mask] >= detection_logit(0.5)
            recall = (detected & labels).sum() / labels.sum() if labels.any() else math.nan
            row += [points(sample_map(logits[mask], labels)), points(recall),
                    f"{false_per_hour(logits[mask], labels, domain.window_seconds):.0f}"]
        rows.append(row)
    print_table(["windows", "n", "mAP source", "recall source", "false / h source",
                 "mAP adapted", "recall adapted", "false / h adapted"], rows)


def buffer_table(domain: Domain, source: LinearHead, hyper: dict, seed: int, default_run) -> None:
    """Print table 3: final mAP and cmAP of notela-streaming per buffer capacity."""
    runs = [(capacity, adapt("notela-streaming", source, domain.embeddings,
                             {**hyper, "buffer_capacity": capacity}, seed)) for capacity in BUFFER_CAPACITIES]
    runs.append((f"{MethodSettings(**hyper).buffer_capacity} (setting in force)", default_run))
    rows = []
    for capacity, result in runs:
        rows.append([capacity, len(result.heads), result.blocked_heads,
                     points(sample_map(result.final_logits, domain.labels)),
                     points(class_map(result.final_logits, domain.labels)[0])])
    print_table(["buffer capacity", "rounds", "blocked", "mAP", "cmAP"], rows)


def neighbour_table(domain: Domain, k: int, manifest_folder: pathlib.Path) -> None:
    """Print table 4: what mutual neighbours share, against all pairs of windows."""
    windows = len(domain.embeddings)
    buffer = NeighbourBuffer(capacity=windows, dim=domain.embeddings.shape[1], k=k)
    buffer.add(domain.embeddings)
    mutual = buffer.mutual_neighbours()
    pairs = np.array(sorted({(min(i, int(j)), max(i, int(j))) for i in range(windows) for j in mutual[i] if j >= 0}))
    first, second = pairs[:, 0], pairs[:, 1]

    labels = domain.labels.astype(np.int32)
    shares_species = (labels @ labels.T) > 0
    shares_background = domain.background_recording[:, None] == domain.background_recording[None, :]
    labeled = ~domain.bird_free
    both_labeled = labeled[:, None] & labeled[None, :]
    one_bird_free = domain.bird_free[:, None] != domain.bird_free[None, :]
    all_pairs = np.triu(np.ones((windows, windows), dtype=bool), k=1)
    both_bird_free = domain.bird_free[:, None] & domain.bird_free[None, :]

    # A window-by-focal-recording incidence matrix gives the pairs that share a focal recording.
    focal = [{event["recording"] for event in entry.get("events", [])} for entry in read_manifest(manifest_folder)]
    recordings = {name: column for column, name in enumerate(sorted(set().union(*focal)))}
    incidence = np.zeros((windows, len(recordings)), dtype=np.int32)
    for window, names in enumerate(focal):
        incidence[window, [recordings[name] for name in names]] = 1
    shares_focal = (incidence @ incidence.T) > 0

    def shares(within: np.ndarray, condition: np.ndarray) -> tuple[str, str]:
        """Share of mutual pairs, then of all window pairs, inside ``within`` that meet ``condition``."""
        mutual_within = within[first, second]
        mutual_share = condition[first, second][mutual_within].mean() if mutual_within.any() else math.nan
        every = within & all_pairs
        return points(mutual_share), points(condition[every].mean())

    print_table(["share", "mutual neighbour pairs", "all window pairs (chance)"], [
        ["pairs", len(pairs), int(all_pairs.sum())],
        ["same background recording", *shares(all_pairs, shares_background)],
        ["one window bird-free, the other labeled", *shares(all_pairs, one_bird_free)],
        ["both bird-free", *shares(all_pairs, both_bird_free)],
        ["both bird-free: same background", *shares(both_bird_free, shares_background)],
        ["both labeled: a shared species", *shares(both_labeled, shares_species)],
        ["both labeled: same background", *shares(both_labeled, shares_background)],
        ["a shared species: same background", *shares(shares_species, shares_background)],
        ["a shared species: same focal recording", *shares(shares_species, shares_focal)],
        ["same background, both labeled: a shared species", *shares(shares_background & both_labeled, shares_species)],
    ])


def bias_only_table(domain: Domain, source: LinearHead, adapted: LinearHead) -> None:
    """Print table 5: source-weight heads with changed biases against streaming NOTELA's head."""
    source_logits = source.logits(domain.embeddings)
    mean_shift = (adapted.logits(domain.embeddings) - source_logits).mean(axis=0)
    heads = [
        ("source", source),
        ("source weights, adapted bias", LinearHead(source.labels, source.weights, adapted.bias)),
        ("source, bias + mean logit change", LinearHead(source.labels, source.weights, source.bias + mean_shift)),
        ("streaming NOTELA", adapted),
    ]
    rows = []
    for name, head in heads:
        scores = evaluate(head.logits(domain.embeddings), domain)
        rows.append([name, points(scores["sample_map"]), points(scores["class_map"]), points(scores["top1"]),
                     f"{scores['false_detections_per_hour']:.0f}"])
    print_table(["head", "mAP", "cmAP", "top-1", "false / h"], rows)


def streaming_candidates(source: LinearHead, embeddings: np.ndarray, hyper: dict, seed: int) -> list:
    """Run notela-streaming as ``adapt`` does and return every candidate head, blocked or not.

    Returns (candidate, accepted) pairs, where accepted is the guard's decision
    on the adapter's buffer, as on a base station.
    """
    settings = MethodSettings(**hyper)
    adapter = SiteAdapter("analysis", source, _guard_config(settings), seed=seed)
    candidates = []
    for start in range(0, len(embeddings), settings.chunk_size):
        adapter.add(embeddings[start : start + settings.chunk_size])
        if adapter.round_due():
            result = adapter.run_round(version=len(candidates) + 1)
            candidates.append((result.head, result.decision.accepted))
    if adapter.round_due(flush=True):
        result = adapter.run_round(version=len(candidates) + 1)
        candidates.append((result.head, result.decision.accepted))
    return candidates


def guard_table(domain: Domain, source: LinearHead, tables: dict, seed: int) -> None:
    """Print table 6: the guard's decision on every candidate head against its mAP and cmAP."""
    source_logits = source.logits(domain.embeddings)
    source_map = sample_map(source_logits, domain.labels)
    source_cmap = class_map(source_logits, domain.labels)[0]
    rows, flagged = [], []
    for method in METHOD_NAMES:
        hyper = method_settings(tables, method, quick=False)
        config = _guard_config(MethodSettings(**hyper))
        if method == "notela-streaming":
            candidates = [head for head, _ in streaming_candidates(source, domain.embeddings, hyper, seed)]
        else:
            candidates = adapt(method, source, domain.embeddings, hyper, seed).heads
        blocked = blocked_better = passed_collapsed = 0
        lowest_ratio = math.inf
        for number, head in enumerate(candidates, start=1):
            logits = head.logits(domain.embeddings)
            decision = check_collapse(source_logits, logits, config)
            if decision.accepted:
                ratio = decision.stats["candidate_mean_top_score"] / decision.stats["source_mean_top_score"]
                lowest_ratio = min(lowest_ratio, ratio)
            delta_map = sample_map(logits, domain.labels) - source_map
            delta_cmap = class_map(logits, domain.labels)[0] - source_cmap
            if not decision.accepted:
                blocked += 1
                better = delta_map > 0 and delta_cmap > 0
                blocked_better += better
                case = "blocked, better" if better else "blocked"
                flagged.append([method, number, case, f"{100 * delta_map:+.1f}", f"{100 * delta_cmap:+.1f}",
                                decision.reason])
            if decision.accepted and delta_map < -COLLAPSE_MAP_DROP:
                passed_collapsed += 1
                flagged.append([method, number, "passed but collapsed", f"{100 * delta_map:+.1f}",
                                f"{100 * delta_cmap:+.1f}", decision.reason])
        ratio_cell = f"{lowest_ratio:.2f}" if math.isfinite(lowest_ratio) else "n/a"
        rows.append([method, len(candidates), blocked, blocked_better, passed_collapsed, ratio_cell])
    print_table(["method", "candidate heads", "blocked", "blocked, better mAP and cmAP",
                 f"passed, mAP down > {100 * COLLAPSE_MAP_DROP:.0f} points",
                 f"lowest top-score ratio passed (limit {config.min_top_score_ratio:.2f})"], rows)
    if flagged:
        print_table(["method", "epoch or round", "case", "Δ mAP", "Δ cmAP", "guard"], flagged)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS), help="domain names under benchmarks/domains")
    parser.add_argument("--seed", type=int, default=0, help="seed of every adaptation run (default %(default)s)")
    parser.add_argument("--method-defaults", action="store_true",
                        help="use the defaults of MethodSettings, not benchmarks/hyperparameters.toml")
    args = parser.parse_args()

    started = time.perf_counter()
    tables = {} if args.method_defaults else load_hyperparameters(DEFAULT_HYPERPARAMETERS)
    hyper = method_settings(tables, "notela-streaming", quick=False)
    origin = DEFAULT_HYPERPARAMETERS.relative_to(REPO) if tables else "MethodSettings defaults"
    print(f"Settings: {origin}; notela-streaming: {MethodSettings(**hyper)}\n")
    source_model = load_source_model()

    for name in args.domains:
        domain = load_domain(REPO / "benchmarks" / "domains" / f"{name}.toml", DEFAULT_CACHE)
        source = source_model.head.select(domain.classes)
        streaming = adapt("notela-streaming", source, domain.embeddings, hyper, args.seed)
        adapted = streaming.heads[-1] if streaming.heads else source
        print(f"## {name} (seed {args.seed})\n")
        print("### 1. Per class: source vs streaming NOTELA\n")
        per_class_table(domain, source, adapted)
        print("### 2. Per SNR bin\n")
        snr_table(domain, source, adapted)
        print("### 3. Per buffer capacity\n")
        buffer_table(domain, source, hyper, args.seed, streaming)
        print(f"### 4. Mutual neighbours (k = {MethodSettings(**hyper).k}, all windows)\n")
        neighbour_table(domain, MethodSettings(**hyper).k, DEFAULT_CACHE / domain.name)
        print("### 5. Bias-only correction\n")
        bias_only_table(domain, source, adapted)
        print("### 6. Collapse guard on every candidate head\n")
        guard_table(domain, source, tables, args.seed)
    print(f"Took {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
