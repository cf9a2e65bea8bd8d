"""Site species lists: from BirdNET's range model at a location and week, or from a file.

A site's head covers only its species, which keeps the pushed head small
(about 0.3 MB at fp16 for 150 classes against 13 MB for all 6522) and
removes classes that cannot occur there from adaptation.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Sequence

import numpy as np

from dawnchorus.models.runtime import make_interpreter

_LOGGER = logging.getLogger(__name__)

# BirdNET-Analyzer's default location filter threshold: classes whose
# occurrence score at the location and week is below it are dropped.
DEFAULT_RANGE_THRESHOLD = 0.03


class SpeciesListError(ValueError):
    """An invalid location, week, threshold or species file."""


@dataclasses.dataclass(frozen=True)
class Location:
    """Location and week of a site's recordings.

    Attributes:
        latitude: degrees, -90 to 90.
        longitude: degrees, -180 to 180.
        week: BirdNET week of the year, 1 to 48 (four per month), or -1 for the whole year.
    """

    latitude: float
    longitude: float
    week: int = -1

    def __post_init__(self):
        if not -90.0 <= self.latitude <= 90.0:
            raise SpeciesListError(f"latitude {self.latitude} is outside -90 to 90")
        if not -180.0 <= self.longitude <= 180.0:
            raise SpeciesListError(f"longitude {self.longitude} is outside -180 to 180")
        if self.week != -1 and not 1 <= self.week <= 48:
            raise SpeciesListError(f"week {self.week} must be 1 to 48, or -1 for the whole year")


def range_scores(range_model: pathlib.Path, location: Location) -> np.ndarray:
    """Return the range model's occurrence scores [6522] float32 at ``location``."""
    interpreter = make_interpreter(model_path=str(range_model), num_threads=1)
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]
    query = np.array([[location.latitude, location.longitude, location.week]], dtype=np.float32)
    interpreter.set_tensor(input_index, query)
    interpreter.invoke()
    return interpreter.get_tensor(output_index)[0].astype(np.float32)


def species_from_range_model(
    range_model: pathlib.Path,
    labels: Sequence[str],
    location: Location,
    threshold: float = DEFAULT_RANGE_THRESHOLD,
) -> list[str]:
    """Return the labels whose occurrence score at ``location`` is at least ``threshold``."""
    if not 0.0 <= threshold < 1.0:
        raise SpeciesListError(f"range threshold {threshold} must be in [0, 1)")
    scores = range_scores(range_model, location)
    if scores.shape[0] != len(labels):
        raise SpeciesListError(f"range model has {scores.shape[0]} outputs but there are {len(labels)} labels")
    selected = [label for label, score in zip(labels, scores) if score >= threshold]
    _LOGGER.info(
        "range model at %.4f, %.4f, week %d: %d species at threshold %.3f",
        location.latitude, location.longitude, location.week, len(selected), threshold,
    )
    return selected


def species_from_file(path: pathlib.Path, labels: Sequence[str]) -> list[str]:
    """Read a species list: one label per line, as ``Scientific name_Common name`` or
    the scientific name alone; blank lines and lines starting with '#' are ignored.

    Returns the matching model labels in the model's order.
    """
    known = set(labels)
    by_scientific = {label.partition("_")[0]: label for label in labels}
    selected: set[str] = set()
    unknown: list[str] = []
    for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if entry in known:
            selected.add(entry)
        elif entry in by_scientific:
            selected.add(by_scientific[entry])
        else:
            unknown.append(entry)
    if unknown:
        raise SpeciesListError(
            f"{path}: {len(unknown)} entries match no model label, e.g. {unknown[:3]}; use "
            "'Scientific name_Common name' as in the BirdNET labels file, or the scientific name"
        )
    if not selected:
        raise SpeciesListError(f"{path} lists no species")
    return [label for label in labels if label in selected]
