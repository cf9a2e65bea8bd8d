"""The adaptation benchmark end to end on the real survey and a small mixed domain:
``bench run --quick`` writes results in the documented layout and ``bench report`` plots them."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from dawnchorus.evaluation.methods import METHODS

REPO = pathlib.Path(__file__).resolve().parents[1]
REPO_DOMAINS = "benchmarks/domains"
RUN_KEYS = {"seed", "map", "cmap", "top1", "precision", "recall", "false_per_hour", "map_by_round", "blocked_heads"}


@pytest.mark.slow
def test_bench_quick_run_and_report(data_dir, tmp_path):
    results_path = tmp_path / "results.json"
    command = [sys.executable, "-m", "dawnchorus", "bench", "run", "--quick", "--seeds", "1",
               "--domain", f"{REPO_DOMAINS}/western-north-america.toml", f"{REPO_DOMAINS}/monitor-survey.toml",
               "--cache", str(tmp_path / "cache"), "--data-root", str(data_dir), "--out", str(results_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(results_path.read_text())

    assert set(results["domains"]) == {"western-north-america-quick", "monitor-survey"}
    for domain, methods in results["domains"].items():
        assert set(methods) == set(METHODS), domain
        for method, runs in methods.items():
            assert len(runs) == 1
            assert RUN_KEYS <= set(runs[0]), (domain, method)
            assert runs[0]["map"] is not None
            assert 0.0 <= runs[0]["map"] <= 1.0
    streaming = results["domains"]["western-north-america-quick"]["notela-streaming"][0]
    assert streaming["map_by_round"]
    assert "online_map" in streaming
    assert "| notela-streaming |" in result.stdout

    report = subprocess.run([sys.executable, "-m", "dawnchorus", "bench", "report", str(results_path),
                             "--plots", str(tmp_path / "plots")], capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    plot = tmp_path / "plots" / "western-north-america-quick-map-by-round.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
