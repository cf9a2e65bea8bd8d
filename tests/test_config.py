"""Configuration files: keys map onto the options of edge run and server run, errors name the key and the fix."""

from __future__ import annotations

import argparse
import io
import pathlib
import re
import subprocess
import sys
import time

import pytest

from dawnchorus.cli import build_parser
from dawnchorus.config import (CHECKS, TABLES, ConfigError, ConfigurableParser, check_file, find_subparser,
                               load_table, option_actions, print_effective, read_document)
from dawnchorus.models.species import SiteSpecies, SpeciesSpec, SpeciesThresholds
from dawnchorus.protocol.signing import generate_key_files

REPO = pathlib.Path(__file__).resolve().parents[1]
SOUNDSCAPE = REPO.parent / "shared" / "data" / "soundscapes" / "birdnet-example" / "soundscape.flac"


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dawnchorus", *args], capture_output=True, text=True,
                          timeout=timeout)


def _write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.write_text(text, encoding="utf-8")
    return path


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def _problems(path: pathlib.Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        check_file(path, build_parser(), CHECKS)
    return caught.value.problems


@pytest.mark.parametrize("name", ["recorder.toml", "base-station.toml"])
def test_config_check_accepts_deploy_examples(name):
    result = _run("config", "check", str(REPO / "deploy" / name))
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout


def test_config_check_prints_effective_settings():
    result = _run("config", "check", str(REPO / "deploy" / "recorder.toml"))
    assert 'device = "rec-01"  # file' in result.stdout
    assert "min_conf = 0.7  # file" in result.stdout
    assert "windows_per_message = 16  # default" in result.stdout
    assert '"Corvus brachyrhynchos" = 0.9' in result.stdout


def test_config_check_invalid_value_names_key_and_fix(tmp_path):
    path = _write(tmp_path / "rec.toml", '[recorder]\ndevice = "rec-01"\nsite = "s"\nmin_conf = 1.5\n')
    result = _run("config", "check", str(path))
    assert result.returncode == 2
    assert "recorder.min_conf = 1.5: 1.5 is not in (0, 1]; for example min_conf = 0.7" in result.stderr


def test_unknown_key_suggests_nearest(tmp_path):
    path = _write(tmp_path / "rec.toml", '[recorder]\nmin_cnf = 0.5\n')
    problems = _problems(path)
    assert len(problems) == 1
    assert "recorder.min_cnf is not a setting (did you mean min_conf?)" in problems[0]


def test_unknown_table_suggests_nearest(tmp_path):
    path = _write(tmp_path / "bs.toml", '[base_statoin]\nbuffer = 10\n')
    problems = _problems(path)
    assert "unknown table [base_statoin] (did you mean base_station?)" in problems[0]


def test_key_outside_table_rejected(tmp_path):
    path = _write(tmp_path / "rec.toml", 'device = "rec-01"\n')
    assert "device is outside a table" in _problems(path)[0]


def test_invalid_toml_gives_line(tmp_path):
    path = _write(tmp_path / "rec.toml", '[recorder]\ndevice = rec-01\n')
    problems = _problems(path)
    assert "invalid TOML" in problems[0]
    assert "line 2" in problems[0]


def test_missing_file_rejected(tmp_path):
    assert _problems(tmp_path / "none.toml") == ["file not found"]


def test_every_invalid_key_reported(tmp_path):
    path = _write(tmp_path / "rec.toml", '[recorder]\nwindows_per_message = 1.5\nstay = "yes"\n'
                                         'precision = "fp16"\nbroker = "host:99999"\n')
    problems = _problems(path)
    assert len(problems) == 4
    assert "recorder.windows_per_message = 1.5: must be a whole number" in problems[0]
    assert "recorder.stay = \"yes\": must be true or false; write stay = true or stay = false" in problems[1]
    assert "recorder.precision is not a setting" in problems[2]
    assert "invalid broker 'host:99999'" in problems[3]


def test_check_reports_all_problems_in_one_pass(tmp_path):
    # Invalid keys and values, and the checks of ids and species files, which need the valid values.
    path = _write(tmp_path / "rec.toml", '[recorder]\ndevice = "rec 01"\nsite = "forest-a"\nmin_cnf = 0.7\n'
                                         'sensitivity = 3.0\noverlap = "x"\nspecies = "all"\n'
                                         'species_file = "nowhere.txt"\n'
                                         '[recorder.species_thresholds]\n"Nonexistus birdus" = 0.9\n')
    problems = _problems(path)

    assert len(problems) == 7, problems
    assert "recorder.min_cnf is not a setting" in problems[0]
    assert "recorder.sensitivity = 3.0" in problems[1]
    assert "recorder.overlap = \"x\": must be a number" in problems[2]
    assert "species and species_file exclude each other" in problems[3]
    assert problems[4].startswith("recorder.device: invalid device id 'rec 01'")
    assert problems[5].startswith("recorder.species_file: cannot read species file")
    assert problems[6].startswith("recorder.species_thresholds: 1 species match no model label")


def test_unknown_table_does_not_hide_others(tmp_path):
    path = _write(tmp_path / "rec.toml", '[basestation]\nbuffer = 10\n[recorder]\ndevice = "rec 01"\n'
                                         'min_cnf = 0.7\n')
    problems = _problems(path)

    assert len(problems) == 3, problems
    assert "unknown table [basestation] (did you mean base_station?)" in problems[0]
    assert "recorder.min_cnf is not a setting" in problems[1]
    assert problems[2].startswith("recorder.device: invalid device id 'rec 01'")


def test_thresholds_problem_names_key_once(tmp_path):
    path = _write(tmp_path / "rec.toml", '[recorder.species_thresholds]\n"Nonexistus birdus" = 0.9\n')
    (problem,) = _problems(path)

    assert problem.startswith("recorder.species_thresholds: 1 species match no model label")
    assert problem.count("species_thresholds:") == 1


def test_check_prints_range_threshold_default(tmp_path):
    path = _write(tmp_path / "rec.toml", '[recorder]\ndevice = "rec-01"\nsite = "forest-a"\n')
    stream = io.StringIO()
    print_effective(check_file(path, build_parser(), CHECKS), stream)

    assert "range_threshold = 0.03  # default" in stream.getvalue().splitlines()


def test_choices_checked(tmp_path):
    path = _write(tmp_path / "bs.toml", '[base_station]\nprecision = "int8"\n')
    assert "must be one of fp16, fp32" in _problems(path)[0]


def test_semantic_check_names_key(tmp_path):
    path = _write(tmp_path / "rec.toml", '[recorder]\ndevice = "rec/1"\nsite = "s"\n')
    problems = _problems(path)
    assert "recorder.device: invalid device id 'rec/1'" in problems[0]


def test_file_values_become_options(tmp_path):
    path = _write(tmp_path / "rec.toml", '[recorder]\ndevice = "rec-01"\nsite = "forest-a"\n'
                                         'broker = "broker.local:1884"\nmin_conf = 0.6\nstay = true\n'
                                         'input = ["a.wav", "/data/b.wav"]\n')
    args = _parse("edge", "run", "--config", str(path))
    assert args.device == "rec-01"
    assert args.broker == ("broker.local", 1884)
    assert args.min_conf == 0.6
    assert args.stay is True
    assert args.input == [tmp_path / "a.wav", pathlib.Path("/data/b.wav")]


def test_command_line_overrides_file(tmp_path):
    path = _write(tmp_path / "rec.toml", '[recorder]\ndevice = "rec-01"\nsite = "forest-a"\nmin_conf = 0.6\n')
    args = _parse("edge", "run", "--min-conf", "0.9", "--config", str(path), "--site", "meadow")
    assert args.min_conf == 0.9
    assert args.site == "meadow"
    assert args.device == "rec-01"


@pytest.mark.parametrize("line, option, dest, expected", [
    ("stay = true", "--no-stay", "stay", False),
    ("receipts = false", "--receipts", "await_receipts", True),
    ("home_assistant = true", "--no-home-assistant", "home_assistant", None),
])
def test_command_line_turns_off_file_flag(tmp_path, line, option, dest, expected):
    path = _write(tmp_path / "rec.toml", f'[recorder]\ndevice = "rec-01"\nsite = "forest-a"\n{line}\n')

    from_file = _parse("edge", "run", "--config", str(path))
    overridden = _parse("edge", "run", "--config", str(path), option)

    assert getattr(from_file, dest) != expected
    assert getattr(overridden, dest) == expected


def test_home_assistant_key_takes_prefix_or_flag(tmp_path):
    header = '[recorder]\ndevice = "rec-01"\nsite = "forest-a"\n'
    path = _write(tmp_path / "rec.toml", header + 'home_assistant = "ha"\n')
    assert _parse("edge", "run", "--config", str(path)).home_assistant == "ha"

    path = _write(tmp_path / "rec.toml", header + 'home_assistant = true\n')
    assert _parse("edge", "run", "--config", str(path)).home_assistant == "homeassistant"

    path = _write(tmp_path / "rec.toml", header + 'home_assistant = false\n')
    assert _parse("edge", "run", "--config", str(path)).home_assistant is None


@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_file_flag_has_negation(table):
    """A flag that a file can turn on must have a command-line form that turns it off."""
    parser = find_subparser(build_parser(), TABLES[table])
    for key, action in option_actions(parser).items():
        is_flag = isinstance(action, (argparse._StoreConstAction, argparse.BooleanOptionalAction))
        takes_optional_value = action.nargs == "?" and action.const is not None
        if not (is_flag or takes_optional_value) or isinstance(action, argparse.BooleanOptionalAction):
            continue
        negations = [other for other in parser._actions if other is not action and other.dest == action.dest]
        assert negations, f"{table}.{key}: {action.option_strings[0]} has no --no- form on the command line"


def test_required_option_may_come_from_command_line(tmp_path):
    path = _write(tmp_path / "rec.toml", '[recorder]\nsite = "forest-a"\n')
    args = _parse("edge", "run", "--config", str(path), "--device", "rec-07")
    assert args.device == "rec-07"


def test_config_check_warns_about_missing_required_key(tmp_path):
    path = _write(tmp_path / "rec.toml", '[recorder]\nsite = "forest-a"\n')
    result = _run("config", "check", str(path))
    assert result.returncode == 0
    assert "# device = ...  # required, not set: set it here or pass --device" in result.stdout
    assert "[recorder] does not set --device" in result.stderr


def test_config_check_warns_about_missing_signing_key(tmp_path):
    path = _write(tmp_path / "bs.toml", '[base_station]\nbroker = "127.0.0.1:1883"\n')
    result = _run("config", "check", str(path))
    assert result.returncode == 0
    assert "[base_station] does not set --signing-key; pass it on the command line" in result.stderr


def test_edge_run_without_table_rejected(tmp_path):
    path = _write(tmp_path / "bs.toml", '[base_station]\nbuffer = 100\n')
    result = _run("edge", "run", "--config", str(path))
    assert result.returncode == 2
    assert "no [recorder] table" in result.stderr


def test_abbreviated_config_option_rejected(tmp_path):
    path = _write(tmp_path / "rec.toml", '[recorder]\ndevice = "rec-01"\nsite = "forest-a"\n')
    result = _run("edge", "run", "--conf", str(path))
    assert result.returncode == 2
    assert "write --config in full" in result.stderr


def test_relative_species_paths_follow_file(tmp_path):
    path = _write(tmp_path / "bs.toml", '[base_station]\ndefault_species = "@all.txt-@never.txt"\n'
                                        '[base_station.site_species]\nforest-a = "47.68,-122.29,20+@extra.txt"\n')
    args = _parse("server", "run", "--config", str(path))
    assert args.default_species == SpeciesSpec(tmp_path / "all.txt", (), (tmp_path / "never.txt",))
    assert args.site_species == [SiteSpecies("forest-a", SpeciesSpec.parse(f"47.68,-122.29,20+@{tmp_path}/extra.txt"))]


def test_site_species_command_line_adds_to_file(tmp_path):
    path = _write(tmp_path / "bs.toml", '[base_station]\nsite_species = ["forest-a=all"]\n')
    args = _parse("server", "run", "--config", str(path), "--site-species", "meadow=1,2")
    assert [entry.site for entry in args.site_species] == ["forest-a", "meadow"]


def test_boolean_optional_option_from_file(tmp_path):
    path = _write(tmp_path / "bs.toml", '[base_station]\nprior_shift = false\n')
    assert _parse("server", "run", "--config", str(path)).prior_shift is False


def test_species_thresholds_table_from_file(tmp_path):
    path = _write(tmp_path / "rec.toml", '[recorder]\ndevice = "r"\nsite = "s"\n'
                                         '[recorder.species_thresholds]\n"Turdus merula" = 0.85\n')
    args = _parse("edge", "run", "--config", str(path))
    assert args.species_thresholds == SpeciesThresholds({"Turdus merula": 0.85}, "recorder.species_thresholds")


def test_exclusive_keys_rejected(tmp_path):
    path = _write(tmp_path / "rec.toml", '[recorder]\nspecies = "all"\nspecies_file = "s.txt"\n')
    assert "species and species_file exclude each other" in _problems(path)[0]


def test_species_file_missing_names_key(tmp_path):
    path = _write(tmp_path / "bs.toml", '[base_station.site_species]\nforest-a = "@nowhere.txt"\n')
    problems = _problems(path)
    assert problems[0].startswith("base_station.site_species.forest-a: cannot read species file")
    assert "nowhere.txt" in problems[0]


def test_new_option_gets_key_for_free(tmp_path):
    """An option added to a command later can be set in a file with no change to the loader."""
    parser = ConfigurableParser(prog="test", config_table="recorder")
    parser.add_argument("--web-port", type=int, default=8080)
    parser.add_argument("--home-assistant", action="store_true")
    path = _write(tmp_path / "rec.toml", "[recorder]\nweb_port = 9090\nhome_assistant = true\n")
    settings = load_table(path, read_document(path), "recorder", parser)
    assert settings["web_port"].value == 9090
    assert settings["home_assistant"].value is True
    args = parser.parse_args(["--config", str(path)])
    assert args.web_port == 9090


def test_edge_and_server_run_from_config(mosquitto, observe, programs, tmp_path, data_dir):
    """A base station and a recorder start from their files and the recorder's data reach the station."""
    generate_key_files(tmp_path / "keys")
    _write(tmp_path / "species.txt", "Poecile atricapillus\nHaemorhous mexicanus\nTurdus migratorius\n")
    _write(tmp_path / "base-station.toml", f'[base_station]\nbroker = "{mosquitto.address}"\n'
                                           'state_dir = "server"\nsigning_key = "keys/head-signing.key"\n'
                                           '[base_station.site_species]\nconfig-site = "@species.txt"\n')
    _write(tmp_path / "recorder.toml", f'[recorder]\ndevice = "rec-config"\nsite = "wrong-site"\n'
                                       f'broker = "{mosquitto.address}"\ninput = ["{SOUNDSCAPE}"]\nspeed = 0\n'
                                       'state_dir = "edge"\nhead_public_key = "keys/head-signing.pub"\n'
                                       'species = "@species.txt"\n')
    observer = observe(mosquitto)
    station = programs.start("server", "run", "--config", str(tmp_path / "base-station.toml"), log="station.log")
    deadline = time.monotonic() + 120
    while "base station ready" not in programs.log("station.log") and time.monotonic() < deadline:
        assert station.poll() is None, programs.log("station.log")
        time.sleep(0.2)

    recorder = programs.start("edge", "run", "--config", str(tmp_path / "recorder.toml"), "--site", "config-site",
                              log="recorder.log")
    assert observer.wait_for(lambda: len(observer.embedding_versions.get("rec-config", [])) >= 2, 120), \
        programs.log("recorder.log")
    assert recorder.wait(timeout=120) == 0, programs.log("recorder.log")
    assert observer.statuses["rec-config"]["site"] == "config-site"
    assert (tmp_path / "edge" / "rec-config").is_dir()
    deadline = time.monotonic() + 60
    while "site config-site: 3 classes" not in programs.log("station.log") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "site config-site: 3 classes" in programs.log("station.log")
    assert (tmp_path / "server").is_dir()


def test_species_thresholds_file_follows_config(tmp_path):
    path = _write(tmp_path / "rec.toml", '[recorder]\ndevice = "r"\nsite = "s"\nspecies_thresholds = "t.txt"\n')
    assert _parse("edge", "run", "--config", str(path)).species_thresholds == tmp_path / "t.txt"


def _documented_keys(table: str) -> set[str]:
    """Return the keys in the first column of the key table of ``table`` in docs/deployment.md."""
    text = (REPO / "docs" / "deployment.md").read_text()
    heading = f"`[{table}]` (`dawnchorus {' '.join(TABLES[table])}`):"
    assert heading in text, f"docs/deployment.md has no key table headed {heading}"
    rows = text.split(heading, 1)[1].lstrip("\n").split("\n\n", 1)[0]
    keys = set()
    for row in rows.splitlines():
        first_cell = row.split("|")[1]
        keys |= set(re.findall(r"`(\w+)`", first_cell))
    return keys


@pytest.mark.parametrize("table", sorted(TABLES))
def test_docs_list_every_key(table):
    keys = set(option_actions(find_subparser(build_parser(), TABLES[table])))
    documented = _documented_keys(table)

    assert keys - documented == set(), f"docs/deployment.md does not list these [{table}] keys"
    assert documented - keys == set(), f"docs/deployment.md lists [{table}] keys that are no options"
