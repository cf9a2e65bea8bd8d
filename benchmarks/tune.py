"""Choose each adaptation method's hyperparameters by grid search on one domain, and freeze them.

For every method with a learning rate, the script tries every combination of
the values in ``GRIDS`` with ``SEEDS`` seeds each, scores the final head on
the domain's windows with ``evaluation.metrics.evaluate`` and picks one setting
per method. It prints a table of every setting tried and writes the choices as
TOML tables that ``dawnchorus bench run`` reads (by default
``benchmarks/hyperparameters.toml``).

Criterion: the mean over seeds of (sample-wise mAP + class-wise cmAP) / 2, so
that a gain in per-class ranking counts as much as one in mAP, which class
priors alone can raise. NOTE: on western North America cmAP spanned 2.4 points
across the grid and mAP 11, so in practice the criterion ranks mostly by mAP.
Settings within ``TIE_TOLERANCE`` of the best criterion count as tied.
Ties go to the fewest candidate heads that the collapse guard blocked (or would
block), then to the smaller learning rate, then to the higher criterion.

Tune on western North America only, and keep the other domains for the
frozen run. ``source`` has nothing to tune. ``prior-shift``'s source prior is
left out on purpose, so neither gets a table.

Run from the repository root. Its 138 runs of ``adapt`` took 2.5 minutes on an
idle 2-core x86 machine, and 5 minutes under other load:

    .venv/bin/python benchmarks/tune.py
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import logging
import pathlib
import sys
import time
from typing import Any

import numpy as np

from dawnchorus.evaluation.cli import DEFAULT_CACHE
from dawnchorus.evaluation.domains import load_domain
from dawnchorus.evaluation.methods import MethodSettings, adapt
from dawnchorus.evaluation.metrics import evaluate
from dawnchorus.models.backbone import load_source_model

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DOMAIN = REPO / "benchmarks" / "domains" / "western-north-america.toml"
DEFAULT_OUT = REPO / "benchmarks" / "hyperparameters.toml"

SEEDS = (0, 1)

# Criterion values closer than this to the best one (0.1 point) count as a
# tie. The standard deviation over seeds in the untuned run of
# docs/benchmarks.md was 0.1 to 0.3 points of mAP on this domain.
TIE_TOLERANCE = 0.001

LEARNING_RATES = (1e-4, 3e-4, 1e-3)
DROPOUT_RATES = (0.1, 0.3)
EPOCHS = (3, 5, 10)

# Offline methods that train with dropout, offline methods that train
# without it, and the streaming method, which has no epochs.
GRIDS: dict[str, dict[str, tuple]] = {
    **{method: {"learning_rate": LEARNING_RATES, "dropout_rate": DROPOUT_RATES, "epochs": EPOCHS}
       for method in ("notela", "dropout-student", "pseudo-label", "dust")},
    **{method: {"learning_rate": LEARNING_RATES, "epochs": EPOCHS} for method in ("tent", "shot", "nrc")},
    "notela-streaming": {"learning_rate": LEARNING_RATES, "dropout_rate": DROPOUT_RATES,
                         "round_steps": (4, 8, 16), "chunk_size": (128, 256)},
}

# Settings held fixed while tuning. They go to the [default] table, so that
# the frozen run keeps them even if the defaults of MethodSettings change.
FIXED_FIELDS = ("batch_size", "train_affine", "k", "lam", "alpha")


@dataclasses.dataclass
class Trial:
    """One setting of one method, scored over all seeds.

    Attributes:
        settings: the grid's values, as MethodSettings fields.
        sample_map: mean over seeds of sample-wise mAP.
        class_map: mean over seeds of class-wise cmAP.
        blocked: candidate heads the collapse guard blocked or would block, summed over seeds.
    """

    settings: dict[str, Any]
    sample_map: float
    class_map: float
    blocked: int

    @property
    def criterion(self) -> float:
        return (self.sample_map + self.class_map) / 2


def fixed_settings() -> dict[str, Any]:
    """Return the MethodSettings defaults of ``FIXED_FIELDS``."""
    defaults = MethodSettings()
    return {name: getattr(defaults, name) for name in FIXED_FIELDS}


def run_method(method: str, grid: dict[str, tuple], head, domain, seeds) -> list[Trial]:
    """Score every setting of ``grid`` for one method.

    An offline method trains once per seed with the largest epoch count, and
    the shorter epoch counts are read from its per-epoch logits and guard
    decisions.
    """
    # NOTE: reading shorter runs from a longer one is exact only while no
    # offline method depends on the total epoch count (no schedule, no
    # per-run budget), which holds for evaluation/methods.py as written.
    epoch_counts = grid.get("epochs")
    trained = {name: values for name, values in grid.items() if name != "epochs"}
    fixed = fixed_settings()
    trials = []
    for values in itertools.product(*trained.values()):
        settings = dict(zip(trained, values))
        scores: dict[int | None, list[tuple[float, float, int]]] = {}
        for seed in seeds:
            hyper = {**fixed, **settings}
            if epoch_counts:
                hyper["epochs"] = max(epoch_counts)
            result = adapt(method, head, domain.embeddings, hyper, seed)
            if epoch_counts:
                accepted = [bool(stats["accepted"]) for stats in result.stats]
                rejected = sum(not decision for decision in accepted)
                if len(result.logits_by_round) != max(epoch_counts) or rejected != result.blocked_heads:
                    raise RuntimeError(
                        f"{method}: expected one head and one guard decision per epoch for {max(epoch_counts)} "
                        f"epochs, got {len(result.logits_by_round)} heads and {len(accepted)} decisions")
                for epochs in epoch_counts:
                    metrics = evaluate(result.logits_by_round[epochs - 1], domain)
                    blocked = sum(not decision for decision in accepted[:epochs])
                    scores.setdefault(epochs, []).append((metrics["sample_map"], metrics["class_map"], blocked))
            else:
                metrics = evaluate(result.final_logits, domain)
                scores.setdefault(None, []).append((metrics["sample_map"], metrics["class_map"], result.blocked_heads))

        for epochs, runs in scores.items():
            trial_settings = settings if epochs is None else {**settings, "epochs": epochs}
            trials.append(Trial(trial_settings, float(np.mean([run[0] for run in runs])),
                                float(np.mean([run[1] for run in runs])), sum(run[2] for run in runs)))
    return trials


def choose(trials: list[Trial]) -> Trial:
    """Pick one of the trials within ``TIE_TOLERANCE`` of the best criterion.

    The fewest blocked heads win, then the smaller learning rate, then the higher criterion.
    """
    best = max(trial.criterion for trial in trials)
    tied = [trial for trial in trials if trial.criterion >= best - TIE_TOLERANCE]
    return min(tied, key=lambda trial: (trial.blocked, trial.settings["learning_rate"], -trial.criterion))


def format_table(method: str, trials: list[Trial], chosen: Trial, source: Trial) -> str:
    """Render one method's trials, in points, with the chosen one marked by '*'."""
    names = list(trials[0].settings)
    header = "  ".join(f"{name:>13}" for name in names)
    lines = [f"{method}  ({len(trials)} settings)",
             f"  {header}  {'mAP':>6} {'cmAP':>6} {'crit':>6} {'Δcrit':>6} {'blocked':>7}"]
    for trial in trials:
        cells = "  ".join(f"{trial.settings[name]:>13g}" for name in names)
        mark = "*" if trial is chosen else " "
        lines.append(f"{mark} {cells}  {100 * trial.sample_map:6.2f} {100 * trial.class_map:6.2f} "
                     f"{100 * trial.criterion:6.2f} {100 * (trial.criterion - source.criterion):+6.2f} "
                     f"{trial.blocked:7d}")
    return "\n".join(lines)


def edge_notes(grid: dict[str, tuple], chosen: Trial) -> list[str]:
    """List the chosen values that sit at the smallest or largest value of a grid with 3 or more values."""
    notes = []
    for name, values in grid.items():
        if len(values) >= 3 and chosen.settings[name] in (min(values), max(values)):
            notes.append(f"{name} = {chosen.settings[name]:g} is at the edge of the grid {list(values)}")
    return notes


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    raise TypeError(f"cannot write {value!r} of type {type(value).__name__} as TOML; expected a bool, int or float")


def hyperparameters_toml(domain_name: str, command: str, chosen: dict[str, Trial], seeds) -> str:
    """Render the frozen hyperparameters: a header, [default] with the fixed settings, a table per method."""
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    lines = [
        "# Hyperparameters that `dawnchorus bench run` reads by default.",
        f"# Chosen on {domain_name} by `{command}` on {today}, by grid search",
        f"# with {len(seeds)} seeds per setting. Criterion: the mean over seeds of",
        "# (sample-wise mAP + class-wise cmAP) / 2. Settings within",
        f"# {100 * TIE_TOLERANCE:g} point of the best criterion count as tied, and ties go to",
        "# fewer collapse-guard blocks, then the smaller learning rate.",
        "# Fields not listed keep the defaults of MethodSettings in",
        "# evaluation/methods.py. source has nothing to tune, and prior-shift's",
        "# source_prior is not tuned, so neither has a table.",
        "",
        "# Held fixed while tuning.",
        "[default]",
    ]
    lines += [f"{name} = {toml_value(value)}" for name, value in fixed_settings().items()]
    for method, trial in chosen.items():
        lines += ["", f"[{method}]",
                  f"# {domain_name}: mAP {100 * trial.sample_map:.2f}, cmAP {100 * trial.class_map:.2f}, "
                  f"{trial.blocked} heads blocked over {len(seeds)} seeds"]
        lines += [f"{name} = {toml_value(value)}" for name, value in trial.settings.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domain", type=pathlib.Path, default=DEFAULT_DOMAIN,
                        help="domain spec (TOML) to tune on (default: %(default)s)")
    parser.add_argument("--methods", nargs="+", default=list(GRIDS), choices=list(GRIDS), metavar="METHOD",
                        help=f"methods to tune (default: all of {', '.join(GRIDS)})")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT,
                        help="hyperparameters TOML to write (default: %(default)s)")
    parser.add_argument("--cache", type=pathlib.Path, default=DEFAULT_CACHE,
                        help="folder of built domains (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    started = time.perf_counter()
    domain = load_domain(args.domain, args.cache)
    head = load_source_model().head.select(domain.classes)
    source_metrics = evaluate(head.logits(domain.embeddings), domain)
    source = Trial({}, source_metrics["sample_map"], source_metrics["class_map"], 0)
    print(f"{domain.name}: {len(domain.embeddings)} windows, {len(domain.classes)} classes; "
          f"source mAP {100 * source.sample_map:.2f}, cmAP {100 * source.class_map:.2f}, "
          f"criterion {100 * source.criterion:.2f}; seeds {list(SEEDS)}\n")

    chosen: dict[str, Trial] = {}
    for method in args.methods:
        method_started = time.perf_counter()
        trials = run_method(method, GRIDS[method], head, domain, SEEDS)
        chosen[method] = choose(trials)
        print(format_table(method, trials, chosen[method], source))
        for note in edge_notes(GRIDS[method], chosen[method]):
            print(f"  note: {note}")
        if chosen[method].class_map < source.class_map + TIE_TOLERANCE:
            print(f"  note: the chosen setting's cmAP is less than {100 * TIE_TOLERANCE:g} point above the "
                  f"source's ({100 * chosen[method].class_map:.2f} vs {100 * source.class_map:.2f})")
        print(f"  ({time.perf_counter() - method_started:.0f} s)\n", flush=True)

    print("chosen:")
    for method, trial in chosen.items():
        settings = ", ".join(f"{name} {value:g}" for name, value in trial.settings.items())
        print(f"  {method:17} {settings}: mAP {100 * trial.sample_map:.2f}, cmAP {100 * trial.class_map:.2f}, "
              f"blocked {trial.blocked}")

    command = " ".join(["python", "benchmarks/tune.py", *(argv if argv is not None else sys.argv[1:])])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(hyperparameters_toml(domain.name, command, chosen, SEEDS), encoding="utf-8")
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
