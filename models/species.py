"""Site species lists and per-species confidence thresholds.

A site's species list comes from BirdNET's range model at a location and
week, from a file, or from all model classes, and files can add species to it
or remove them (``SpeciesSpec``). A site's head covers only its species, which
keeps the pushed head small (about 0.3 MB at fp16 for 150 classes against
13 MB for all 6522) and removes classes that cannot occur there from
adaptation. Recorders and the base station resolve a spec with the same code,
so both arrive at the same class list.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import pathlib
import re
from typing import Mapping, Sequence

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


def _read_species_names(path: pathlib.Path, labels: Sequence[str]) -> list[str]:
    """Read a species file like ``species_from_file``, with read errors as ``SpeciesListError``."""
    try:
        return species_from_file(path, labels)
    except (OSError, UnicodeDecodeError) as error:
        raise SpeciesListError(f"cannot read species file {path}: {error}") from error


# A spec's terms are joined by "+@FILE" and "-@FILE". Matching the "@" too keeps
# the minus sign of a negative longitude ("47.6,-122.3") out of the split.
_SPEC_TERM = re.compile(r"([+-])@")


@dataclasses.dataclass(frozen=True)
class SpeciesSpec:
    """A species list as the command line and configuration files give it.

    Text form: ``BASE[+@FILE...][-@FILE...]``, where BASE is ``LAT,LON[,WEEK]``
    (BirdNET's range model), ``@FILE`` (exactly the species in a file) or
    ``all`` (every model class). ``+@FILE`` adds a file's species to the base
    list, as BirdNET-Pi's whitelist adds species that the range model leaves
    out, and ``-@FILE`` removes them, as its exclude list does. A team that
    wants exactly its own list, as BirdNET-Pi's include list gives, uses the
    file as BASE.

    Attributes:
        base: a location for the range model, a species file, or None for all classes.
        include: files whose species are added to the base list.
        exclude: files whose species are removed; they win over ``include``.
    """

    base: Location | pathlib.Path | None = None
    include: tuple[pathlib.Path, ...] = ()
    exclude: tuple[pathlib.Path, ...] = ()

    @classmethod
    def parse(cls, text: str) -> SpeciesSpec:
        """Parse the text form; raise ``SpeciesListError`` with the expected form."""
        parts = _SPEC_TERM.split(text.strip())
        base_text = parts[0].strip()
        include: list[pathlib.Path] = []
        exclude: list[pathlib.Path] = []
        for sign, path_text in zip(parts[1::2], parts[2::2]):
            if not path_text.strip():
                raise SpeciesListError(f"invalid species spec {text!r}: {sign}@ needs a file name")
            (include if sign == "+" else exclude).append(pathlib.Path(path_text.strip()))
        return cls(_parse_base(base_text, text), tuple(include), tuple(exclude))

    def format(self) -> str:
        """Return the text form, which ``parse`` reads back into an equal spec."""
        if self.base is None:
            text = "all"
        elif isinstance(self.base, Location):
            text = f"{self.base.latitude!r},{self.base.longitude!r},{self.base.week}"
        else:
            text = f"@{self.base}"
        text += "".join(f"+@{path}" for path in self.include)
        return text + "".join(f"-@{path}" for path in self.exclude)

    def __str__(self) -> str:
        return self.format()

    def rebase(self, folder: pathlib.Path) -> SpeciesSpec:
        """Return the spec with relative file paths taken relative to ``folder``."""
        base = folder / self.base if isinstance(self.base, pathlib.Path) else self.base
        return SpeciesSpec(base, tuple(folder / path for path in self.include),
                           tuple(folder / path for path in self.exclude))

    def resolve(
        self,
        labels: Sequence[str],
        range_model: pathlib.Path | None,
        threshold: float = DEFAULT_RANGE_THRESHOLD,
    ) -> list[str]:
        """Return the listed model labels, in the model's order.

        Raises:
            SpeciesListError: a location without a range model, an unreadable
                file or one with unknown names, or an empty result.
        """
        if self.base is None:
            selected = set(labels)
        elif isinstance(self.base, Location):
            if range_model is None:
                raise SpeciesListError(f"species spec {self}: a location needs BirdNET's range model, which "
                                       "a custom --model lacks; give the species as @FILE instead")
            selected = set(species_from_range_model(range_model, labels, self.base, threshold))
        else:
            selected = set(_read_species_names(self.base, labels))

        for path in self.include:
            added = set(_read_species_names(path, labels)) - selected
            _LOGGER.info("species file %s adds %d species", path, len(added))
            selected |= added
        for path in self.exclude:
            removed = set(_read_species_names(path, labels)) & selected
            _LOGGER.info("species file %s removes %d species", path, len(removed))
            selected -= removed

        if not selected:
            raise SpeciesListError(f"species spec {self} leaves no species: check the location, the range "
                                   "threshold and the exclude files")
        return [label for label in labels if label in selected]


def _parse_base(base: str, text: str) -> Location | pathlib.Path | None:
    if base == "all":
        return None
    if base.startswith("@"):
        if not base[1:].strip():
            raise SpeciesListError(f"invalid species spec {text!r}: @ needs a file name")
        return pathlib.Path(base[1:].strip())
    parts = [part.strip() for part in base.split(",")]
    if len(parts) not in (2, 3):
        raise SpeciesListError(f"invalid species spec {text!r}: expected LAT,LON[,WEEK], @FILE or all, "
                               "then +@FILE to add and -@FILE to remove species, e.g. 47.68,-122.29,20-@never.txt")
    try:
        latitude, longitude = float(parts[0]), float(parts[1])
        week = int(parts[2]) if len(parts) == 3 else -1
    except ValueError:
        raise SpeciesListError(f"invalid species spec {text!r}: latitude and longitude must be numbers in "
                               "degrees and the week a whole number, e.g. 47.68,-122.29,20") from None
    return Location(latitude, longitude, week)


def _label_index(labels: Sequence[str]) -> dict[str, str]:
    """Map every label and every scientific name to its label."""
    index = {label.partition("_")[0]: label for label in labels}
    index.update({label: label for label in labels})
    return index


@dataclasses.dataclass(frozen=True)
class SpeciesThresholds:
    """Per-species confidence thresholds that replace the minimum confidence for those species.

    Attributes:
        thresholds: species name, as a model label or a scientific name, to its
            threshold in (0, 1].
        source: where the thresholds come from (a file or a configuration key), for messages.
    """

    thresholds: Mapping[str, float]
    source: str

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, object], source: str) -> SpeciesThresholds:
        """Check names and thresholds of a mapping, e.g. a TOML table."""
        thresholds: dict[str, float] = {}
        for name, value in mapping.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SpeciesListError(f"{source}: threshold of {name!r} is {value!r}: use a number in (0, 1], "
                                       "e.g. 0.85")
            thresholds[str(name).strip()] = _check_threshold(float(value), name, source)
        return cls(thresholds, source)

    @classmethod
    def from_file(cls, path: pathlib.Path) -> SpeciesThresholds:
        """Read ``NAME,THRESHOLD`` lines; blank lines and lines starting with '#' are ignored.

        NAME is a label (``Scientific name_Common name``) or a scientific name.
        """
        thresholds: dict[str, float] = {}
        try:
            lines = pathlib.Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise SpeciesListError(f"cannot read species thresholds file {path}: {error}") from error
        for number, line in enumerate(lines, start=1):
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            name, comma, value = entry.rpartition(",")
            try:
                threshold = float(value)
            except ValueError:
                threshold = math.nan
            if not comma or not name.strip() or math.isnan(threshold):
                raise SpeciesListError(f"{path}, line {number}: {entry!r} is not NAME,THRESHOLD; write e.g. "
                                       "'Turdus merula_Eurasian Blackbird,0.85' or 'Turdus merula,0.85'")
            thresholds[name.strip()] = _check_threshold(threshold, name.strip(), f"{path}, line {number}")
        return cls(thresholds, str(path))

    def resolve(self, labels: Sequence[str]) -> dict[str, float]:
        """Return the thresholds keyed by model label.

        Raises:
            SpeciesListError: a name matches no model label.
        """
        index = _label_index(labels)
        unknown = [name for name in self.thresholds if name not in index]
        if unknown:
            raise SpeciesListError(f"{self.source}: {len(unknown)} species match no model label, e.g. "
                                   f"{unknown[:3]}; use 'Scientific name_Common name' as in the BirdNET labels "
                                   "file, or the scientific name")
        return {index[name]: threshold for name, threshold in self.thresholds.items()}


def _check_threshold(value: float, name: object, source: str) -> float:
    if not 0.0 < value <= 1.0:
        raise SpeciesListError(f"{source}: threshold {value} of {name!r} is invalid: use a number in (0, 1], "
                               "e.g. 0.85")
    return value


def threshold_vector(labels: Sequence[str], min_conf: float, per_label: Mapping[str, float]) -> np.ndarray:
    """Return the detection threshold of each class [K] float64: ``per_label`` where given, else ``min_conf``."""
    return np.array([per_label.get(label, min_conf) for label in labels], dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class SiteSpecies:
    """A site id with its species spec, as ``--site-species SITE=SPEC`` gives it."""

    site: str
    spec: SpeciesSpec

    @classmethod
    def parse(cls, text: str) -> SiteSpecies:
        site, _, spec = text.partition("=")
        if not site.strip() or not spec.strip():
            raise SpeciesListError(f"invalid site species {text!r}: expected SITE=SPEC, e.g. "
                                   "forest-a=47.68,-122.29,20 or meadow=@meadow-species.txt")
        return cls(site.strip(), SpeciesSpec.parse(spec))

    def rebase(self, folder: pathlib.Path) -> SiteSpecies:
        return SiteSpecies(self.site, self.spec.rebase(folder))

    def __str__(self) -> str:
        return f"{self.site}={self.spec}"


# Command-line argument types. argparse shows the message of an
# ArgumentTypeError but replaces that of a ValueError with "invalid value".

def species_spec_argument(text: str) -> SpeciesSpec:
    """Parse a SPEC option value (see ``SpeciesSpec``)."""
    try:
        return SpeciesSpec.parse(text)
    except SpeciesListError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def site_species_argument(text: str) -> SiteSpecies:
    """Parse a SITE=SPEC option value."""
    try:
        return SiteSpecies.parse(text)
    except SpeciesListError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def range_threshold_argument(text: str) -> float:
    """Parse a range model threshold, 0 to below 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"range threshold {text!r} is not a number: use e.g. 0.03") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"range threshold {value} is invalid: use a number in [0, 1), e.g. 0.03")
    return value


def species_thresholds_argument(text: str) -> pathlib.Path:
    """Take a thresholds file path; the file is read by ``load_species_thresholds`` at start-up."""
    return pathlib.Path(text)


# A configuration file may give the thresholds as a table instead of a file
# (see dawnchorus.config, which looks for this attribute).
species_thresholds_argument.from_table = lambda table, key: SpeciesThresholds.from_mapping(table, key)


def load_species_thresholds(value: pathlib.Path | SpeciesThresholds | None) -> SpeciesThresholds | None:
    """Return the thresholds of a ``--species-thresholds`` value: a file path, a table already read, or None."""
    if value is None or isinstance(value, SpeciesThresholds):
        return value
    return SpeciesThresholds.from_file(value)


def add_threshold_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--species-thresholds`` to a parser that detects species."""
    parser.add_argument(
        "--species-thresholds", type=species_thresholds_argument, default=None, metavar="FILE",
        help="per-species detection thresholds that replace --min-conf for those species: lines of "
             "NAME,THRESHOLD, where NAME is 'Scientific name_Common name' or the scientific name, e.g. "
             "'Turdus merula,0.85'; blank lines and lines starting with # are ignored")
