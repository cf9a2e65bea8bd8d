"""Configuration files of ``dawnchorus edge run`` and ``dawnchorus server run``.

A configuration file is TOML. Its ``[recorder]`` table holds the settings of
``edge run`` and its ``[base_station]`` table those of ``server run``. Each key
is a long command-line option of that command with underscores for dashes
(``--min-conf`` is ``min_conf``). Keys are checked against the command's
argparse parser, and each value is converted and checked by the option's
own type function and choices, so every option added to a command can be
set in a file with no change here.

Values take the TOML type that fits the option: a flag takes true or
false, an option that takes several values or that can be repeated takes
an array, and a repeatable ``KEY=VALUE`` option (``--site-species``) also
takes a table. An option whose type function has a ``from_table`` attribute
accepts a table, which that function converts (``--species-thresholds``).
Relative paths are taken relative to the folder of the file, so that a
configuration and the key and species files next to it can move together.

Precedence: an option on the command line wins over the file, and the file
wins over the option's default. A repeatable option given on the command
line adds to the file's entries.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import pathlib
import sys
from typing import Any, Callable

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

# Table name -> the subcommand whose options its keys are.
TABLES = {"recorder": ("edge", "run"), "base_station": ("server", "run")}

CONFIG_OPTION = "--config"


class ConfigError(ValueError):
    """An unreadable or invalid configuration file; the message lists every problem."""

    def __init__(self, path: pathlib.Path, problems: list[str]):
        self.path = path
        self.problems = problems
        if len(problems) == 1:
            message = f"{path}: {problems[0]}"
        else:
            message = f"{path}: {len(problems)} problems:\n" + "\n".join(f"  {problem}" for problem in problems)
        super().__init__(message)


@dataclasses.dataclass
class Setting:
    """One key of a table.

    Attributes:
        action: the argparse action of the option.
        raw: the value as written in the file.
        value: the value as the option stores it on the command line.
    """

    action: argparse.Action
    raw: Any
    value: Any


def read_document(path: pathlib.Path) -> dict[str, Any]:
    """Parse a TOML file and check that it contains only known tables.

    Raises:
        ConfigError: the file cannot be read or parsed, or has unknown tables.
    """
    document, problems = parse_document(path)
    if problems:
        raise ConfigError(path, problems)
    return document


def parse_document(path: pathlib.Path) -> tuple[dict[str, Any], list[str]]:
    """Parse a TOML file; return the document and the problems of its top level (unknown tables, stray keys).

    Raises:
        ConfigError: the file cannot be read or is not valid TOML, so nothing else can be checked.
    """
    try:
        with open(path, "rb") as stream:
            document = tomllib.load(stream)
    except FileNotFoundError:
        raise ConfigError(path, ["file not found"]) from None
    except OSError as error:
        raise ConfigError(path, [f"cannot read the file: {error.strerror}"]) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(path, [f"invalid TOML: {error}"]) from None

    problems = []
    for name, value in document.items():
        if name in TABLES and isinstance(value, dict):
            continue
        if name in TABLES:
            problems.append(f"{name} must be a table: write [{name}] on a line of its own, then its keys")
        elif isinstance(value, dict):
            problems.append(f"unknown table [{name}]{_suggestion(name, TABLES)}; the tables are "
                            f"{', '.join(f'[{table}]' for table in TABLES)}")
        else:
            problems.append(f"{name} is outside a table: put it under "
                            f"{' or '.join(f'[{table}]' for table in TABLES)}")
    return document, problems


def option_key(action: argparse.Action) -> str | None:
    """Return the key of an option in a file: its first long option name with underscores."""
    for option in action.option_strings:
        if option.startswith("--"):
            return option[2:].replace("-", "_")
    return None


def option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Return the options of ``parser`` that a file can set, by key.

    An option that stores into the destination of an earlier one, such as
    ``--no-home-assistant`` after ``--home-assistant``, is that option's
    command-line negation and gets no key of its own.
    """
    actions = {}
    destinations = set()
    for action in parser._actions:  # argparse has no public list of a parser's actions
        key = option_key(action)
        if key is None or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        if CONFIG_OPTION in action.option_strings or action.dest in destinations:
            continue
        actions[key] = action
        destinations.add(action.dest)
    return actions


def _suggestion(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def format_value(value: Any) -> str:
    """Write a value as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {format_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(str(value))


class _Converter:
    """Converts the values of one table, collecting a message per invalid key."""

    def __init__(self, table: str, command: str, folder: pathlib.Path):
        self.table = table
        self.command = command
        self.folder = folder
        self.problems: list[str] = []

    def problem(self, key: str, raw: Any, reason: str, action: argparse.Action) -> None:
        self.problems.append(f"{self.table}.{key} = {format_value(raw)}: {reason}; {self.fix(key, action)}")

    def fix(self, key: str, action: argparse.Action) -> str:
        if isinstance(action, _FLAG_ACTIONS):
            return f"write {key} = true or {key} = false"
        default = action.default
        if default is not None and default is not argparse.SUPPRESS and default != []:
            return f"for example {key} = {format_value(default)}"
        return f"see {action.option_strings[0]} in 'dawnchorus {self.command} --help'"

    def convert(self, key: str, raw: Any, action: argparse.Action) -> tuple[bool, Any]:
        """Return (True, value) or (False, None) after recording the problem."""
        try:
            return True, self._convert(key, raw, action)
        except _Invalid as invalid:
            self.problem(key, raw, str(invalid), action)
            return False, None

    def _convert(self, key: str, raw: Any, action: argparse.Action) -> Any:
        if isinstance(action, _FLAG_ACTIONS):
            if not isinstance(raw, bool):
                raise _Invalid("must be true or false")
            if isinstance(action, argparse.BooleanOptionalAction):
                return raw
            return action.const if raw else action.default
        if isinstance(action, argparse._CountAction):
            if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
                raise _Invalid("must be a whole number, 0 or more")
            return raw
        if isinstance(action, argparse._AppendAction):
            if isinstance(raw, dict) and not hasattr(action.type, "from_table"):
                # A repeatable KEY=VALUE option: one entry per key of the table.
                raw = [f"{name}={value}" for name, value in raw.items()]
            items = raw if isinstance(raw, list) else [raw]
            return [self._scalar(key, item, action) for item in items]
        if type(action) is not argparse._StoreAction:
            raise _Invalid(f"{action.option_strings[0]} cannot be set in a configuration file; "
                           "give it on the command line")
        if action.nargs == "?" and isinstance(raw, bool):
            # An option with an optional value: true is the option without its value, false leaves it off.
            return action.const if raw else action.default
        if action.nargs in (None, "?"):
            return self._scalar(key, raw, action)
        items = raw if isinstance(raw, list) else [raw]
        if isinstance(action.nargs, int) and len(items) != action.nargs:
            raise _Invalid(f"must be an array of {action.nargs} values")
        if action.nargs == "+" and not items:
            raise _Invalid("must be an array of one or more values")
        return [self._scalar(key, item, action) for item in items]

    def _scalar(self, key: str, raw: Any, action: argparse.Action) -> Any:
        convert: Callable[[str], Any] | None = action.type
        if isinstance(raw, dict):
            from_table = getattr(convert, "from_table", None)
            if from_table is None:
                raise _Invalid("must be a single value, not a table")
            source = f"{self.table}.{key}"
            try:
                return from_table(raw, source)
            except (argparse.ArgumentTypeError, ValueError, TypeError) as error:
                raise _Invalid(str(error).removeprefix(f"{source}: ")) from None
        if isinstance(raw, list):
            raise _Invalid("must be a single value, not an array")
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
            raise _Invalid(f"must be {_expected(action)}, not {type(raw).__name__}")

        text = raw if isinstance(raw, str) else repr(raw)
        try:
            value = convert(text) if convert is not None else text
        except (argparse.ArgumentTypeError, ValueError, TypeError) as error:
            reason = str(error) if isinstance(error, argparse.ArgumentTypeError) else f"must be {_expected(action)}"
            raise _Invalid(reason) from None
        if action.choices is not None and value not in action.choices:
            raise _Invalid(f"must be one of {', '.join(map(str, action.choices))}")
        return self._rebase(value)

    def _rebase(self, value: Any) -> Any:
        if isinstance(value, pathlib.PurePath):
            return value if value.is_absolute() else self.folder / value
        rebase = getattr(value, "rebase", None)
        return rebase(self.folder) if callable(rebase) else value


class _Invalid(Exception):
    """A value that its option rejects; the message is the reason."""


_FLAG_ACTIONS = (argparse._StoreConstAction, argparse.BooleanOptionalAction)


def _expected(action: argparse.Action) -> str:
    """Describe the values an option accepts, for messages."""
    names = {int: "a whole number", float: "a number", pathlib.Path: "a path", None: "a string"}
    if action.type in names:
        return names[action.type]
    return f"a value that {action.option_strings[0]} accepts"


def load_table(
    path: pathlib.Path, document: dict[str, Any], table: str, parser: argparse.ArgumentParser
) -> dict[str, Setting]:
    """Convert the keys of ``table`` with the options of ``parser``.

    Raises:
        ConfigError: the table is missing, or a key is unknown or has an invalid value.
    """
    if table not in document:
        raise ConfigError(path, [f"no [{table}] table: the settings of 'dawnchorus {' '.join(TABLES[table])}' "
                                 f"go under a line [{table}]"])
    settings, problems = convert_table(path, document, table, parser)
    if problems:
        raise ConfigError(path, problems)
    return settings


def convert_table(
    path: pathlib.Path, document: dict[str, Any], table: str, parser: argparse.ArgumentParser
) -> tuple[dict[str, Setting], list[str]]:
    """Convert the keys of ``table``; return the valid settings and a problem for each invalid key."""
    actions = option_actions(parser)
    converter = _Converter(table, " ".join(TABLES[table]), path.resolve().parent)
    settings: dict[str, Setting] = {}
    for key, raw in document[table].items():
        action = actions.get(key)
        if action is None:
            converter.problems.append(f"{table}.{key} is not a setting{_suggestion(key, actions)}; "
                                      f"the keys are the options of 'dawnchorus {converter.command}' with "
                                      "underscores, e.g. min_conf for --min-conf")
            continue
        ok, value = converter.convert(key, raw, action)
        if ok:
            settings[key] = Setting(action, raw, value)

    for group in parser._mutually_exclusive_groups:
        both = [key for key, setting in settings.items() if setting.action in group._group_actions]
        if len(both) > 1:
            converter.problems.append(f"{table}: {' and '.join(both)} exclude each other; keep one")
    return settings, converter.problems


def apply_settings(settings: dict[str, Setting]) -> None:
    """Make the file's values the options' defaults, so that the command line still overrides them."""
    for setting in settings.values():
        setting.action.default = setting.value
        setting.action.required = False


def _config_argument(args: list[str]) -> pathlib.Path | None:
    """Find ``--config FILE`` before argparse parses the rest, so that the file can supply defaults.

    Raises:
        ValueError: ``--config`` is abbreviated, which argparse would accept
            but this search would miss.
    """
    for index, arg in enumerate(args):
        if arg == "--":
            return None
        name = arg.partition("=")[0]
        if name == CONFIG_OPTION and "=" in arg:
            return pathlib.Path(arg.partition("=")[2])
        if name == CONFIG_OPTION and index + 1 < len(args):
            return pathlib.Path(args[index + 1])
        if len(name) > 2 and name != CONFIG_OPTION and CONFIG_OPTION.startswith(name):
            raise ValueError(f"write {CONFIG_OPTION} in full instead of {name}, so that its file is read before "
                             "the other options")
    return None


class ConfigurableParser(argparse.ArgumentParser):
    """An argument parser whose ``--config FILE`` supplies defaults from the file's ``config_table``.

    Without ``config_table`` it is a plain ``ArgumentParser``.
    """

    def __init__(self, *args, config_table: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.config_table = config_table
        if config_table is not None:
            self.add_argument(
                CONFIG_OPTION, type=pathlib.Path, default=None, metavar="FILE",
                help=f"read settings from the [{config_table}] table of this TOML file; options given on the "
                     "command line override it ('dawnchorus config check FILE' shows the result)")

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        if self.config_table is not None:
            try:
                path = _config_argument(args)
                if path is not None:
                    apply_settings(load_table(path, read_document(path), self.config_table, self))
            except ValueError as error:  # ConfigError included
                self.error(str(error))
        return super().parse_known_args(args, namespace)


def find_subparser(parser: argparse.ArgumentParser, names: tuple[str, ...]) -> argparse.ArgumentParser:
    """Return the parser of a subcommand, e.g. ("edge", "run")."""
    for name in names:
        commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
        parser = commands.choices[name]
    return parser


# dawnchorus config check ---------------------------------------------------------


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=pathlib.Path, metavar="FILE", help="configuration file (TOML)")


def effective_namespace(parser: argparse.ArgumentParser, settings: dict[str, Setting]) -> argparse.Namespace:
    """Return the namespace that the command would start with: the file's values, else the defaults."""
    apply_settings(settings)
    for action in parser._actions:
        action.required = False
    namespace, _ = argparse.ArgumentParser.parse_known_args(parser, [])
    return namespace


def check_file(path: pathlib.Path, parser: argparse.ArgumentParser, checks: dict[str, Callable] | None = None):
    """Validate every table of a file; return [(table, command parser, settings, namespace)].

    ``checks`` maps a table to a function that validates the resolved
    namespace further (species files, ids) and returns a list of problems.

    All problems are collected in one pass: an unknown table does not stop
    the checks of the known ones, and the checks of ``checks`` run on the
    keys whose values are valid. A key whose value is invalid is checked no
    further, and a file that is not valid TOML is not checked at all.

    Raises:
        ConfigError: listing every problem of the file.
    """
    document, problems = parse_document(path)
    if not document:
        raise ConfigError(path, [f"no settings: add a {' or '.join(f'[{table}]' for table in TABLES)} table"])
    results = []
    for table, command in TABLES.items():
        if not isinstance(document.get(table), dict):
            continue
        command_parser = find_subparser(parser, command)
        settings, table_problems = convert_table(path, document, table, command_parser)
        problems += table_problems
        namespace = effective_namespace(command_parser, settings)
        if checks and table in checks:
            problems += [f"{table}.{problem}" for problem in checks[table](namespace)]
        results.append((table, command_parser, settings, namespace))
    if problems:
        raise ConfigError(path, problems)
    return results


def print_effective(results, stream=sys.stdout) -> None:
    """Print each table's settings as TOML, marking those that come from the file and those still missing."""
    for table, command_parser, settings, namespace in results:
        print(f"[{table}]  # dawnchorus {' '.join(TABLES[table])}", file=stream)
        for key, action in option_actions(command_parser).items():
            if key in settings:
                value, origin = _shown_value(settings[key]), "file"
            else:
                value, origin = getattr(namespace, action.dest, None), "default"
                if isinstance(action.default, str) and value is not None:
                    value = action.default  # as written in the parser, e.g. a broker "HOST:PORT", not (host, port)
            if value is None or value == []:
                if _was_required(action):
                    print(f"# {key} = ...  # required, not set: set it here or pass {action.option_strings[0]}",
                          file=stream)
                else:
                    print(f"# {key} = ...  # not set", file=stream)
                continue
            if isinstance(action, _FLAG_ACTIONS) and not isinstance(action, argparse.BooleanOptionalAction):
                value = value == action.const
            print(f"{key} = {format_value(value)}  # {origin}", file=stream)
        print(file=stream)


def _shown_value(setting: Setting) -> Any:
    """Return the value to print: the converted one where it resolved paths, else the one written."""
    values = setting.value if isinstance(setting.value, list) else [setting.value]
    if values and all(isinstance(value, pathlib.PurePath) or hasattr(value, "rebase") for value in values):
        return setting.value
    return setting.raw


# Keys without which a command refuses to start, although argparse does not
# require them (the demo, which shares the options, makes its own key).
NEEDED_TO_START = {"base_station": ("signing_key",)}


def _was_required(action: argparse.Action) -> bool:
    return bool(getattr(action, "_config_required", False))


def mark_required(parser: argparse.ArgumentParser) -> None:
    """Remember which options are required before a check relaxes them, for the printout."""
    for action in parser._actions:
        action._config_required = action.required


def run_check(args: argparse.Namespace, parser: argparse.ArgumentParser, checks: dict[str, Callable]) -> int:
    """``dawnchorus config check FILE``: validate the file, print the effective settings, start nothing."""
    for command in TABLES.values():
        mark_required(find_subparser(parser, command))
    results = check_file(args.file, parser, checks)
    print(f"# {args.file}: valid", file=sys.stdout)
    print_effective(results)
    for table, command_parser, settings, _ in results:
        missing = [action.option_strings[0] for key, action in option_actions(command_parser).items()
                   if (_was_required(action) or key in NEEDED_TO_START.get(table, ())) and key not in settings]
        if missing:
            pronoun = "it" if len(missing) == 1 else "them"
            print(f"warning: [{table}] does not set {', '.join(missing)}; pass {pronoun} on the command line of "
                  f"'dawnchorus {' '.join(TABLES[table])}'", file=sys.stderr)
    return 0


# Checks beyond the options' type functions ------------------------------------


def _species_context(namespace: argparse.Namespace):
    """Return the labels and range model that species specs resolve against, and the range threshold."""
    from dawnchorus.models import birdnet
    from dawnchorus.models.species import DEFAULT_RANGE_THRESHOLD

    files = birdnet.locate_birdnet_files()
    labels_path = getattr(namespace, "labels", None) or files.labels
    labels = birdnet.read_labels(labels_path)
    range_model = files.range_model if getattr(namespace, "model", None) is None else None
    threshold = getattr(namespace, "range_threshold", None)
    return labels, range_model, DEFAULT_RANGE_THRESHOLD if threshold is None else threshold


def _check_species_thresholds(namespace: argparse.Namespace, labels: list[str]) -> list[str]:
    from dawnchorus.models.species import SpeciesListError, load_species_thresholds

    try:
        thresholds = load_species_thresholds(getattr(namespace, "species_thresholds", None))
        if thresholds is not None:
            thresholds.resolve(labels)
    except SpeciesListError as error:
        # A table's errors already name their source, e.g. "recorder.species_thresholds: ...".
        message = str(error)
        for table in TABLES:
            message = message.removeprefix(f"{table}.species_thresholds: ")
        return [f"species_thresholds: {message}"]
    return []


def check_recorder(namespace: argparse.Namespace) -> list[str]:
    """Check the recorder's ids, species list and thresholds; return the problems, each starting with its key."""
    from dawnchorus.models.species import SpeciesListError, SpeciesSpec
    from dawnchorus.protocol import topics

    problems = []
    for key in ("device", "site"):
        value = getattr(namespace, key, None)
        if value is not None:
            try:
                topics.validate_id(value, f"{key} id")
            except ValueError as error:
                problems.append(f"{key}: {error}")
    labels, range_model, threshold = _species_context(namespace)
    species_file = getattr(namespace, "species_file", None)
    spec = SpeciesSpec(species_file) if species_file is not None else getattr(namespace, "species", None)
    key = "species_file" if species_file is not None else "species"
    if spec is not None:
        try:
            spec.resolve(labels, range_model, threshold)
        except SpeciesListError as error:
            problems.append(f"{key}: {error}")
    return problems + _check_species_thresholds(namespace, labels)


def check_base_station(namespace: argparse.Namespace) -> list[str]:
    """Check the base station's species lists; return the problems, each starting with its key."""
    from dawnchorus.models.species import SpeciesListError

    problems = []
    labels, range_model, threshold = _species_context(namespace)
    specs = [("default_species", getattr(namespace, "default_species", None))]
    specs += [(f"site_species.{entry.site}", entry.spec) for entry in getattr(namespace, "site_species", [])]
    for key, spec in specs:
        if spec is None:
            continue
        try:
            spec.resolve(labels, range_model, threshold)
        except SpeciesListError as error:
            problems.append(f"{key}: {error}")
    return problems


CHECKS = {"recorder": check_recorder, "base_station": check_base_station}
