"""The soak benchmark's own logic: adapting the deployed broker configuration and counting windows and memory.

The soak itself runs for minutes (benchmarks/soak.py). These checks run in
milliseconds. They catch a deployed configuration that the soak could no
longer adapt, and counting mistakes that would hide a loss.
"""

from __future__ import annotations

import pathlib
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import soak  # noqa: E402
import soak_report  # noqa: E402

MIB = 2**20


def _settings(config: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in config.splitlines():
        words = line.split(maxsplit=1)
        if words and not words[0].startswith("#"):
            settings.setdefault(words[0], []).append(words[1] if len(words) > 1 else "")
    return settings


def test_broker_config_keeps_deployed_limits(tmp_path):
    template = soak.BROKER_TEMPLATE.read_text()
    adapted = _settings(soak.broker_config(template, 18830, tmp_path))
    deployed = _settings(template)

    assert adapted["listener"] == ["18830 127.0.0.1"]
    assert adapted["persistence_location"] == [f"{tmp_path}/"]
    assert adapted["persistence"] == ["true"]
    assert "password_file" not in adapted
    for key in ("max_queued_messages", "max_inflight_messages", "max_packet_size", "autosave_interval"):
        assert adapted.get(key) == deployed.get(key), key


def test_broker_config_without_listener_rejected(tmp_path):
    with pytest.raises(ValueError, match="listener"):
        soak.broker_config("max_queued_messages 10\n", 18830, tmp_path)


def test_station_counts_lost_and_duplicated():
    inspected = {"sites": [{"devices": {
        "rec-1": {"accepted_ranges": [[0, 10], [12, 20]], "buffer_duplicates": 0},
        "rec-2": {"accepted_ranges": [[0, 5]], "buffer_duplicates": 2},
    }}]}
    counts = soak_report.station_counts(inspected, {"rec-1": 20, "rec-2": 5, "rec-3": 4})

    assert counts["rec-1"] == {"received": 18, "lost": 2, "duplicated": 0, "unexpected": 0}
    assert counts["rec-2"] == {"received": 5, "lost": 0, "duplicated": 2, "unexpected": 0}
    assert counts["rec-3"] == {"received": 0, "lost": 4, "duplicated": 0, "unexpected": 0}


def test_count_in_ranges_numbers_never_sent():
    assert soak_report.count_in_ranges([[0, 10], [15, 25]], 20) == (15, 5)


def test_summarize_memory_measures_longest_incarnation():
    samples = [(float(t), "broker", 100, 50 * MIB + t * 1024, 0.0) for t in range(0, 200, 10)]
    samples += [(float(t), "broker", 200, 60 * MIB, 1.0) for t in range(200, 600, 10)]
    summary = soak_report.summarize_memory(samples, ["broker"], 600.0, 60.0, 16.0, {})["broker"]

    assert summary["incarnations"] == 2
    assert summary["measured_pid"] == 200
    assert summary["growth_mib"] == 0.0
    assert summary["flat"]


def test_summarize_memory_ignores_single_peaks():
    # A flat process whose samples jump by 80 MiB for one sample at a time, the last one included.
    samples = [(float(t), "recorders", 1, 220 * MIB + (80 * MIB if t % 240 == 0 else 0), 0.0)
               for t in range(0, 1210, 10)]
    summary = soak_report.summarize_memory(samples, ["recorders"], 1200.0, 480.0, 16.0, {})["recorders"]

    assert summary["growth_mib"] == 0.0
    assert summary["slope_mib_per_hour"] == 0.0
    assert summary["rss_peak_mib"] == 300.0
    assert summary["flat"]


def test_summarize_memory_sees_steady_growth():
    # 1 MiB a minute: the medians of the first and last minute after warm-up lie 11 minutes apart.
    samples = [(float(t), "recorders", 1, 200 * MIB + t * MIB // 60, 0.0) for t in range(0, 1210, 10)]
    summary = soak_report.summarize_memory(samples, ["recorders"], 1200.0, 480.0, 8.0, {})["recorders"]

    assert summary["growth_mib"] == 11.0
    assert summary["slope_mib_per_hour"] == 60.0
    assert not summary["flat"]


def test_summarize_memory_subtracts_expected_growth():
    samples = [(float(t), "station", 1, 700 * MIB + t * MIB // 10, 0.0) for t in range(0, 600, 10)]
    grows_as_expected = {"station": lambda start, end: (end - start) * MIB / 10}
    summary = soak_report.summarize_memory(samples, ["station"], 600.0, 60.0, 16.0, grows_as_expected)["station"]
    leaking = soak_report.summarize_memory(samples, ["station"], 600.0, 60.0, 16.0, {})["station"]

    assert summary["flat"]
    assert not leaking["flat"]
