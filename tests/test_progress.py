"""Progress bars: shown on a terminal's stderr, off with --no-progress and when stderr is not a terminal."""

from __future__ import annotations

import fcntl
import os
import pathlib
import pty
import struct
import subprocess
import sys
import termios

import pytest

from dawnchorus.edge import progress

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
FOCAL = DATA / "focal" / "birdnet-go"


def _analyze_on_terminal(tmp_path: pathlib.Path, *options: str) -> tuple[int, str]:
    """Run ``analyze`` on a folder with stderr on a pseudo-terminal; return the exit code and what it showed."""
    controller, terminal = pty.openpty()
    # A new pseudo-terminal has 0 columns, and tqdm draws no bar in 0 columns.
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "dawnchorus", "analyze", str(FOCAL), "--out", str(tmp_path / "out.csv"), *options],
        stdout=subprocess.DEVNULL, stderr=terminal)
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the terminal closes when the process exits
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    return process.wait(timeout=120), shown.decode(errors="replace")


@pytest.mark.skipif(not FOCAL.is_dir(), reason=f"real recordings not found at {FOCAL}")
def test_analyze_folder_shows_bar_on_terminal(tmp_path):
    code, shown = _analyze_on_terminal(tmp_path)
    assert code == 0
    assert "100%" in shown
    assert "window" in shown


@pytest.mark.skipif(not FOCAL.is_dir(), reason=f"real recordings not found at {FOCAL}")
def test_analyze_no_progress_hides_bar(tmp_path):
    code, shown = _analyze_on_terminal(tmp_path, "--no-progress")
    assert code == 0
    assert "100%" not in shown
    assert "wrote" in shown


@pytest.mark.skipif(not FOCAL.is_dir(), reason=f"real recordings not found at {FOCAL}")
def test_analyze_piped_stderr_has_no_bar(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dawnchorus", "analyze", str(FOCAL), "--out",
                             str(tmp_path / "out.csv")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "100%" not in result.stderr


def test_progress_bar_off_when_disabled():
    bar = progress.progress_bar(range(3), total=3, enabled=False)
    assert list(bar) == [0, 1, 2]
    bar.update(1)
    bar.close()


@pytest.mark.parametrize("command", [["bench", "build", "x.toml"], ["bench", "run", "--domain", "x.toml",
                                                                      "--out", "r.json"]])
def test_bench_commands_accept_no_progress(command):
    from dawnchorus.cli import build_parser

    args = build_parser().parse_args([*command, "--no-progress"])
    assert args.progress is False
    assert build_parser().parse_args([*command, "--quiet"]).progress is False
    assert build_parser().parse_args(command).progress is True
