"""The example configurations in deploy/ against the systemd units and the deployment walkthrough.

A unit with ProtectSystem=strict can write only to the folders it declares,
so a state directory outside them fails at the first write. The file names
in the examples must be the ones that make-credentials.sh creates and that
docs/deployment.md installs, so that a user who follows both gets a working
configuration.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

REPO = pathlib.Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
WALKTHROUGH = REPO / "docs" / "deployment.md"
MAKE_CREDENTIALS = DEPLOY / "make-credentials.sh"

# The folder that each systemd directory setting creates writable (systemd.exec(5), "RuntimeDirectory=").
DIRECTORY_ROOTS = {
    "StateDirectory": "/var/lib",
    "CacheDirectory": "/var/cache",
    "LogsDirectory": "/var/log",
    "RuntimeDirectory": "/run",
}
# The settings whose paths dawnchorus writes to. It only reads the other paths.
WRITTEN_KEYS = {"state_dir"}
# The settings that name files from make-credentials.sh's clients/ID/ folder.
TLS_KEYS = {"mqtt_ca", "mqtt_cert", "mqtt_key"}


def _unit_settings(path: pathlib.Path) -> dict[str, list[str]]:
    """Return every KEY=VALUE of a unit file, by key, in order (systemd allows a key several times)."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def _writable_folders(settings: dict[str, list[str]]) -> list[pathlib.PurePosixPath]:
    folders = []
    for key, root in DIRECTORY_ROOTS.items():
        for value in settings.get(key, []):
            folders += [pathlib.PurePosixPath(root) / name for name in value.split()]
    for value in settings.get("ReadWritePaths", []):
        folders += [pathlib.PurePosixPath(name.lstrip("-")) for name in value.split()]
    return folders


def _example_settings(path: pathlib.Path) -> dict[str, object]:
    """Return the keys of an example's table, with those of commented-out ``# key = value`` lines.

    The examples show alternatives, such as the TLS files, as comments, and
    those must be as right as the active lines.
    """
    document = tomllib.loads(path.read_text())
    (table,) = document
    settings = {key: value for key, value in document[table].items() if not isinstance(value, dict)}
    for line in path.read_text().splitlines():
        match = re.match(r"^#\s*(\w+\s*=\s*\"[^\"]*\")", line)
        if match is None:
            continue
        try:
            settings.update(tomllib.loads(match.group(1)))
        except tomllib.TOMLDecodeError:
            continue
    return settings


def _config_file(settings: dict[str, list[str]]) -> pathlib.PurePosixPath:
    (exec_start,) = settings["ExecStart"]
    match = re.search(r"--config (\S+)", exec_start)
    assert match, f"ExecStart without --config: {exec_start}"
    return pathlib.PurePosixPath(match.group(1))


def _walkthrough_paths() -> set[str]:
    """Return the absolute paths under /etc/dawnchorus/ that docs/deployment.md names."""
    return set(re.findall(r"/etc/dawnchorus/[\w./-]*\w", WALKTHROUGH.read_text()))


@pytest.fixture(scope="module")
def client_files(tmp_path_factory) -> set[str]:
    """Return the names of the files that make-credentials.sh gives one recorder."""
    folder = tmp_path_factory.mktemp("credentials") / "ca"
    for arguments in (["init", str(folder), "localhost"], ["recorder", str(folder), "forest-a", "rec-01"]):
        subprocess.run(["bash", str(MAKE_CREDENTIALS), *arguments], check=True, capture_output=True, timeout=120)
    return {path.name for path in (folder / "clients" / "rec-01").iterdir()}


@pytest.mark.parametrize("unit", UNITS, ids=lambda path: path.stem)
def test_example_config_matches_unit(unit):
    settings = _unit_settings(unit)
    config = _config_file(settings)
    example = DEPLOY / config.name
    writable = _writable_folders(settings)

    assert example.is_file(), f"{unit.name} reads {config}, but deploy/ has no {config.name}"
    assert settings["ProtectSystem"] == ["strict"]
    assert writable, f"{unit.name} declares no writable folder"
    for key, value in _example_settings(example).items():
        if key not in WRITTEN_KEYS:
            continue
        path = pathlib.PurePosixPath(value)
        assert path.is_absolute(), f"{example.name}: {key} = {value!r} is not absolute"
        assert any(path.is_relative_to(folder) for folder in writable), (
            f"{example.name}: {key} = {value!r} is outside the folders {unit.name} can write: "
            f"{', '.join(map(str, writable))}")


@pytest.mark.parametrize("example", ["recorder.toml", "base-station.toml"])
def test_example_files_match_walkthrough(example, client_files):
    documented = _walkthrough_paths()
    settings = _example_settings(DEPLOY / example)

    assert TLS_KEYS <= settings.keys(), f"{example} no longer shows the TLS settings"
    for key, value in settings.items():
        if isinstance(value, str) and value.startswith("/etc/"):
            assert value in documented, f"{example}: {key} = {value!r} is not a path that {WALKTHROUGH.name} uses"
    for key in TLS_KEYS:
        name = pathlib.PurePosixPath(settings[key]).name
        assert name in client_files, f"{example}: {key} names {name}, which make-credentials.sh does not create"
