"""Find where streaming NOTELA's gain in sample-wise mAP comes from, and check the collapse guard.

For each domain it prints eight markdown tables:

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
6. the collapse guard's decision on every candidate head of every method,
   against whether the labels show that the head collapsed;
7. the same at 10 and 100 times every tuned learning rate, to provoke collapses;
8. offline NOTELA with a neighbour graph that never pairs two windows of one
   background recording, against the normal graph.

Settings come from benchmarks/hyperparameters.toml when it exists, else
(or with ``--method-defaults``) from the defaults of ``MethodSettings``. For
the streaming variants, tables 6 and 7 check every round's candidate, also
the ones the adapter's own guard blocked. Run from the repository root:

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
from dawnchorus.evaluation.methods import STREAMING_VARIANTS, MethodSettings, _guard_config, adapt, streaming_settings
from dawnchorus.evaluation import METHOD_NAMES
from dawnchorus.evaluation.cli import DEFAULT_CACHE
from dawnchorus.evaluation.domains import Domain, load_domain, read_manifest
from dawnchorus.evaluation.metrics import average_precision, class_map, detection_logit, evaluate, sample_map
from dawnchorus.evaluation.runner import DEFAULT_HYPERPARAMETERS, load_hyperparameters, method_settings
from dawnchorus.models.backbone import load_source_model
from dawnchorus.models.head import LinearHead
from dawnchorus.models.notela import HeadTrainer, notela_round
from dawnchorus.server.adaptation import SiteAdapter, check_collapse
from dawnchorus.server.buffer import NeighbourBuffer, unit_vectors
from dawnchorus.server.priors import prior_shift

REPO = pathlib.Path(__file__).resolve().parents[1]
DOMAINS = ("western-north-america", "europe")
BUFFER_CAPACITIES = (256, 512, 1100)
SNR_BINS = ((-math.inf, -6.0, "< -6 dB"), (-6.0, 0.0, "-6 to 0 dB"), (0.0, math.inf, ">= 0 dB"))
# A head whose sample-wise mAP or cmAP is this far below the source's counts as collapsed.
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


def mutual_without_same_background(embeddings: np.ndarray, background: np.ndarray, k: int) -> np.ndarray:
    """Return mutual neighbours [windows, k - 1] by cosine similarity, never two windows of one background recording.

    A brute-force search, enough for one domain of about a thousand windows.
    """
    units = unit_vectors(embeddings).astype(np.float64)
    similarities = units @ units.T
    similarities[background[:, None] == background[None, :]] = -np.inf
    nearest = np.argsort(-similarities, axis=1, kind="stable")[:, : k - 1]
    nearest = np.where(np.isfinite(np.take_along_axis(similarities, nearest, axis=1)), nearest, -1)
    is_mutual = np.zeros(nearest.shape, dtype=bool)
    for slot in range(k - 1):
        column = nearest[:, slot]
        valid = column >= 0
        is_mutual[valid, slot] = (nearest[column[valid]] == np.flatnonzero(valid)[:, None]).any(axis=1)
    order = np.argsort(~is_mutual, axis=1, kind="stable")
    return np.take_along_axis(np.where(is_mutual, nearest, -1), order, axis=1).astype(np.int32)


def background_graph_table(domain: Domain, source: LinearHead, tables: dict, seed: int) -> None:
    """Print table 8: offline NOTELA with the normal neighbour graph and with same-background pairs removed."""
    hyper = method_settings(tables, "notela", quick=False)
    settings = MethodSettings(**hyper)
    buffer = NeighbourBuffer(capacity=len(domain.embeddings), dim=domain.embeddings.shape[1], k=settings.k)
    buffer.add(domain.embeddings)
    labels = domain.labels.astype(np.int32)
    rows = []
    for name, neighbours in (
        ("all pairs (as shipped)", buffer.mutual_neighbours()),
        ("no pair from one background recording",
         mutual_without_same_background(domain.embeddings, domain.background_recording, settings.k)),
    ):
        owners, slots = np.nonzero(neighbours >= 0)
        partners = neighbours[owners, slots]
        same_background = (domain.background_recording[owners] == domain.background_recording[partners]).mean()
        both_labeled = ~domain.bird_free[owners] & ~domain.bird_free[partners]
        shared_species = ((labels[owners] * labels[partners]).sum(axis=1) > 0)[both_labeled].mean()
        trainer = HeadTrainer(source, learning_rate=settings.learning_rate, dropout_rate=settings.dropout_rate,
                              train_affine=settings.train_affine, seed=seed)
        steps = max(1, math.ceil(len(domain.embeddings) / settings.batch_size))
        for _ in range(settings.epochs):
            notela_round(trainer, domain.embeddings, neighbours, settings.lam, settings.alpha, steps,
                         settings.batch_size)
        scores = evaluate(trainer.logits(domain.embeddings), domain)
        rows.append([name, len(owners) // 2, points(same_background), points(shared_species),
                     points(scores["sample_map"]), points(scores["class_map"]), points(scores["recall"])])
    print_table(["neighbour graph", "mutual pairs", "same background", "both labeled: a shared species",
                 "NOTELA mAP", "cmAP", "recall"], rows)


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


def streaming_candidates(source: LinearHead, embeddings: np.ndarray, hyper: dict, seed: int,
                         method: str = "notela-streaming") -> list:
    """Run a streaming variant as ``adapt`` does and return every candidate head, blocked or not.

    Returns (candidate, accepted) pairs, where accepted is the guard's decision
    on the adapter's buffer, as on a base station.
    """
    settings = streaming_settings(method, MethodSettings(**hyper))
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


def guard_table(domain: Domain, source: LinearHead, tables: dict, seed: int, learning_rate_factor: float = 1.0) -> None:
    """Print table 6: the guard's decision on every candidate head against its mAP and cmAP.

    A candidate counts as collapsed when its sample-wise mAP or its cmAP is
    more than ``COLLAPSE_MAP_DROP`` below the source head's: the labels
    decide, not the guard's own statistics. ``learning_rate_factor``
    multiplies every method's tuned learning rate, to provoke collapses.
    """
    source_logits = source.logits(domain.embeddings)
    source_map = sample_map(source_logits, domain.labels)
    source_cmap = class_map(source_logits, domain.labels)[0]
    rows, flagged = [], []
    for method in METHOD_NAMES:
        hyper = method_settings(tables, method, quick=False)
        hyper["learning_rate"] = learning_rate_factor * hyper.get("learning_rate", MethodSettings.learning_rate)
        config = _guard_config(MethodSettings(**hyper))
        reference_logits = source_logits
        if method in STREAMING_VARIANTS:
            candidates = [head for head, _ in streaming_candidates(source, domain.embeddings, hyper, seed, method)]
            if streaming_settings(method, MethodSettings(**hyper)).streaming_prior_shift:
                # The base station's guard compares with the prior-shifted source head.
                reference_logits = (source_logits + prior_shift(source_logits)).astype(np.float32)
        else:
            candidates = adapt(method, source, domain.embeddings, hyper, seed).heads
        blocked = blocked_better = passed_collapsed = collapsed = 0
        lowest_ratio = math.inf
        for number, head in enumerate(candidates, start=1):
            logits = head.logits(domain.embeddings)
            decision = check_collapse(reference_logits, logits, config)
            if decision.accepted:
                ratio = decision.stats["candidate_mean_top_score"] / decision.stats["source_mean_top_score"]
                lowest_ratio = min(lowest_ratio, ratio)
            delta_map = sample_map(logits, domain.labels) - source_map
            delta_cmap = class_map(logits, domain.labels)[0] - source_cmap
            is_collapsed = min(delta_map, delta_cmap) < -COLLAPSE_MAP_DROP
            collapsed += is_collapsed
            if not decision.accepted:
                blocked += 1
                better = delta_map > 0 and delta_cmap > 0
                blocked_better += better
                case = "blocked"
                if better:
                    case = "blocked, better"
                elif is_collapsed:
                    case = "blocked, collapsed"
                flagged.append([method, number, case, f"{100 * delta_map:+.1f}", f"{100 * delta_cmap:+.1f}",
                                decision.reason])
            if decision.accepted and is_collapsed:
                passed_collapsed += 1
                flagged.append([method, number, "passed but collapsed", f"{100 * delta_map:+.1f}",
                                f"{100 * delta_cmap:+.1f}", decision.reason])
        ratio_cell = f"{lowest_ratio:.2f}" if math.isfinite(lowest_ratio) else "n/a"
        rows.append([method, f"{hyper['learning_rate']:g}", len(candidates), collapsed, blocked, blocked_better,
                     passed_collapsed, ratio_cell])
    drop = f"{100 * COLLAPSE_MAP_DROP:.0f}"
    print_table(["method", "learning rate", "candidate heads", f"collapsed (mAP or cmAP down > {drop} points)",
                 "blocked", "blocked, better mAP and cmAP", "passed but collapsed",
                 f"lowest top-score ratio passed (limit {config.min_top_score_ratio:.2f})"], rows)
    if flagged:
        print_table(["method", "epoch or round", "case", "Δ mAP", "Δ cmAP", "guard"], flagged)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS), help="domain names under benchmarks/domains")
    parser.add_argument("--seed", type=int, default=0, help="seed of every adaptation run (default %(default)s)")
    parser.add_argument("--method-defaults", action="store_true",
                        help="use the defaults of MethodSettings, not benchmarks/hyperparameters.toml")
    parser.add_argument("--stress-factors", type=float, nargs="*", default=[10.0, 100.0],
                        help="table 7, once per factor, multiplies every tuned learning rate by it "
                             "(default %(default)s)")
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
        for factor in args.stress_factors:
            print(f"### 7. Collapse guard at {factor:g} times the tuned learning rates\n")
            guard_table(domain, source, tables, args.seed, learning_rate_factor=factor)
        print("### 8. Neighbour graph without pairs that share a background recording (offline NOTELA)\n")
        background_graph_table(domain, source, tables, args.seed)
    print(f"Took {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
