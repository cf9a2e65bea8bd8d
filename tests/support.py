"""Helpers that several test modules share: polling, the recorders' sent counts, the station's persisted buffers.

pytest puts this folder on ``sys.path`` (``pythonpath`` in pyproject.toml),
so test modules import it as ``support``.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import sqlite3
import subprocess
import sys
import time

# Ten species of eastern North America that the recordings in ../shared/data/soundscapes hold.
SPECIES = [
    "Hylocichla mustelina", "Setophaga ruticilla", "Setophaga citrina", "Poecile atricapillus",
    "Cardinalis cardinalis", "Baeolophus bicolor", "Haemorhous mexicanus", "Turdus migratorius",
    "Cyanocitta cristata", "Zenaida macroura",
]


def wait(condition, timeout: float = 60.0, interval: float = 0.1):
    """Call ``condition`` until it returns a true value or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def recorder_sent(edge_state: pathlib.Path, device: str) -> int:
    """Return how many sequence numbers a recorder has taken: its next free number, kept in its outbox."""
    path = edge_state / device / "outbox.sqlite3"
    if not path.is_file():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as database:
        row = database.execute("SELECT value FROM counters WHERE name = 'next_sequence'").fetchone()
    return int(row[0]) if row else 0


def inspect_station(server_state: pathlib.Path) -> dict:
    """Return ``dawnchorus server inspect --json`` of a state directory, by site id."""
    result = subprocess.run([sys.executable, "-m", "dawnchorus", "server", "inspect", "--state-dir",
                             str(server_state), "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return {site["site"]: site for site in json.loads(result.stdout)["sites"]}


def accepted_windows(server_state: pathlib.Path, site: str) -> int:
    """Return the windows that the station persisted for ``site``, from every device."""
    entry = inspect_station(server_state).get(site)
    return sum(device["accepted_windows"] for device in entry["devices"].values()) if entry else 0


# /etc/mosquitto/mosquitto.conf as Debian's mosquitto package 2.0.11-1.2+deb12u2 installs it (Ubuntu's
# and Raspberry Pi OS's packages derive from it). The shipped deploy/mosquitto/*.conf files go into its include_dir.
DEBIAN_MOSQUITTO_CONF = """\
# Place your local configuration in /etc/mosquitto/conf.d/
#
# A full description of the configuration file is at
# /usr/share/doc/mosquitto/examples/mosquitto.conf.example

pid_file /run/mosquitto/mosquitto.pid

persistence true
persistence_location /var/lib/mosquitto/

log_dest file /var/log/mosquitto/mosquitto.log

include_dir /etc/mosquitto/conf.d
"""


def config_keys(text: str) -> set[str]:
    """Return the keys that the lines of a Mosquitto configuration set, without comments."""
    keys = set()
    for line in text.splitlines():
        words = line.split()
        if words and not words[0].startswith("#"):
            keys.add(words[0])
    return keys


def debian_layout(directory: pathlib.Path, snippet: str, log_dest: str = "stderr") -> str:
    """Install ``snippet`` as ``directory``/conf.d/dawnchorus.conf and return Debian's main file for it.

    The main file keeps Debian's lines in their order, with only the host
    paths moved into ``directory``: pid file, persistence folder, the log
    (``log_dest``) and the include_dir.
    """
    include_dir = directory / "conf.d"
    include_dir.mkdir(exist_ok=True)
    (include_dir / "dawnchorus.conf").write_text(snippet)
    replacements = [
        ("pid_file /run/mosquitto/mosquitto.pid", f"pid_file {directory / 'mosquitto.pid'}"),
        ("persistence_location /var/lib/mosquitto/", f"persistence_location {directory}/"),
        ("log_dest file /var/log/mosquitto/mosquitto.log", f"log_dest {log_dest}"),
        ("include_dir /etc/mosquitto/conf.d", f"include_dir {include_dir}"),
    ]
    text = DEBIAN_MOSQUITTO_CONF
    for old, new in replacements:
        text = text.replace(old, new)
    return text


def generate_keys(directory: pathlib.Path) -> pathlib.Path:
    """Run ``dawnchorus keys generate DIRECTORY`` and return the folder with head-signing.key and .pub."""
    generated = subprocess.run([sys.executable, "-m", "dawnchorus", "keys", "generate", str(directory)],
                               capture_output=True, text=True, timeout=120)
    assert generated.returncode == 0, generated.stderr
    return directory


def write_species(path: pathlib.Path) -> pathlib.Path:
    """Write SPECIES to ``path`` as a species file, one name per line, and return the path."""
    path.write_text("\n".join(SPECIES) + "\n")
    return path
