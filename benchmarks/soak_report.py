"""Counting and reporting for the soak (benchmarks/soak.py): windows, heads and memory.

Windows are counted per recorder against its sequence counter: a recorder
that allocated n numbers sent windows 0 to n - 1. The base station's
accepted ranges and buffer duplicates come from ``dawnchorus server
inspect --json``. The audit subscriber's deliveries show whether a loss
happened in the broker or in the base station.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

MIB = 2**20


def summarize_memory(samples: list[tuple[float, str, int, int, float]], roles: list[str], send_end_s: float,
                     warmup_s: float, flat_mib: float,
                     expected_growth: dict[str, Callable[[float, float], float]],
                     edge_s: float = 60.0) -> dict[str, dict]:
    """Summarize each role's RSS over the sending phase [0, send_end_s].

    A restarted process is a new incarnation (a new pid). Growth is measured
    on the incarnation with the longest stretch after its warm-up, which
    starts ``warmup_s`` after the incarnation's first sample and ends with
    its last sample in the sending phase. Growth is the median RSS of the
    stretch's last ``edge_s`` seconds minus that of its first ``edge_s``
    seconds, and the slope is the Theil-Sen estimate over the stretch. Both
    are medians, so a peak of one sample (several recorders loading a head
    at once, freed by the next sample) moves neither. ``expected_growth``
    gives, per role, the bytes that the process is meant to add between two
    times, such as a buffer that fills. A role is flat when its growth
    beyond that is at most ``flat_mib``.
    """
    from scipy.stats import theilslopes

    summary = {}
    for role in roles:
        mine = [sample for sample in samples if sample[1] == role and 0 <= sample[0] <= send_end_s]
        if not mine:
            continue
        incarnations: dict[int, list[tuple[float, int]]] = {}
        for time_s, _, pid, rss, _ in mine:
            incarnations.setdefault(pid, []).append((time_s, rss))
        cpu_s = sum(max(sample[4] for sample in samples if sample[1] == role and sample[2] == pid)
                    for pid in {sample[2] for sample in samples if sample[1] == role})

        def nearest(target: float) -> int:
            return min(mine, key=lambda sample: abs(sample[0] - target))[3]

        best = None
        for pid, series in incarnations.items():
            steady = [point for point in series if point[0] >= series[0][0] + warmup_s]
            span = steady[-1][0] - steady[0][0] if steady else 0.0
            if len(steady) >= 3 and span > 0 and (best is None or span > best[1][-1][0] - best[1][0][0]):
                best = (pid, steady)
        entry = {
            "incarnations": len(incarnations),
            "rss_start_mib": round(mine[0][3] / MIB, 1),
            "rss_middle_mib": round(nearest(send_end_s / 2) / MIB, 1),
            "rss_end_mib": round(mine[-1][3] / MIB, 1),
            "rss_peak_mib": round(max(sample[3] for sample in mine) / MIB, 1),
            "cpu_s": round(cpu_s, 1),
        }
        if best is not None:
            pid, steady = best
            times = np.array([point[0] for point in steady])
            rss = np.array([point[1] for point in steady], dtype=np.float64) / MIB
            slope = float(theilslopes(rss, times).slope) * 3600
            first = times <= times[0] + edge_s
            last = times >= times[-1] - edge_s
            growth = float(np.median(rss[last]) - np.median(rss[first]))
            expected = (expected_growth[role](float(np.median(times[first])), float(np.median(times[last]))) / MIB
                        if role in expected_growth else 0.0)
            entry.update({
                "measured_pid": pid,
                "measured_from_s": float(times[0]),
                "measured_to_s": float(times[-1]),
                "rss_after_warmup_mib": round(float(np.median(rss[first])), 1),
                "rss_at_end_mib": round(float(np.median(rss[last])), 1),
                "growth_mib": round(growth, 1),
                "slope_mib_per_hour": None if np.isnan(slope) else round(slope, 1),
                "expected_growth_mib": round(expected, 1),
                "flat": bool(growth - expected <= flat_mib),
            })
        summary[role] = entry
    return summary


def station_buffer_bytes(from_s: float, to_s: float, sites: int, hop_s: float, recorders_per_site: int,
                         capacity: int | None = None) -> float:
    """Estimate the bytes that the base station's neighbour buffers fill between two times of the sending phase.

    The buffer allocates its arrays for full capacity at once, and the
    operating system backs pages only once windows are written into them. So
    RSS grows by about two float32 vectors per window (the raw and the unit
    embedding) until a site's buffer is full. The candidate lists add under
    3 % and are left out.
    """
    from dawnchorus.server.adaptation import AdaptationConfig

    capacity = capacity or AdaptationConfig().buffer_capacity
    site_rate = recorders_per_site / hop_s

    def windows_by(time_s: float) -> float:
        return min(capacity, site_rate * time_s)

    return sites * 2 * 1024 * 4 * (windows_by(to_s) - windows_by(from_s))



def count_in_ranges(ranges: list[list[int]], end: int) -> tuple[int, int]:
    """Return how many numbers of the [start, stop) ranges fall in [0, end), and how many fall outside."""
    inside = sum(max(0, min(stop, end) - start) for start, stop in ranges)
    total = sum(stop - start for start, stop in ranges)
    return inside, total - inside


def station_counts(inspected: dict, sent: dict[str, int]) -> dict[str, dict[str, int]]:
    """Per device: windows accepted by the base station, lost, duplicated in its buffer, and accepted unsent."""
    by_device = {}
    for site in inspected["sites"]:
        for device, entry in site["devices"].items():
            by_device[device] = entry
    counts = {}
    for device, windows_sent in sent.items():
        entry = by_device.get(device, {"accepted_ranges": [], "buffer_duplicates": 0})
        accepted, unexpected = count_in_ranges(entry["accepted_ranges"], windows_sent)
        counts[device] = {"received": accepted, "lost": windows_sent - accepted,
                          "duplicated": int(entry["buffer_duplicates"]), "unexpected": unexpected}
    return counts



def tally(devices: list[tuple[str, str]], sent: dict[str, int], drained: dict[str, dict], final: dict[str, dict],
          inspected: dict | None, windows_delivered: dict[str, list[int]],
          manifests: dict[str, dict[int, tuple[int, float]]], acks: list[dict]) -> dict:
    """Count windows and heads per device, per site and in total.

    Args:
        devices: (device, site) of every simulated recorder.
        sent: windows each device sent (its sequence counter after the drain).
        drained, final: the recorder processes' reports after the drain and at the end.
        inspected: output of ``dawnchorus server inspect --json``, or None to count
            at the audit subscriber instead.
        windows_delivered, manifests, acks: what the audit subscriber received.
    """
    if inspected is not None:
        counts = station_counts(inspected, sent)
    else:
        counts = {device: {"received": len(set(windows_delivered.get(device, [])) & set(range(n))),
                           "lost": n - len(set(windows_delivered.get(device, [])) & set(range(n))),
                           "duplicated": None, "unexpected": 0} for device, n in sent.items()}
    per_device = {}
    for device, site in devices:
        delivered = windows_delivered.get(device, [])
        delivered_unique = set(delivered)
        per_device[device] = {
            "site": site,
            "sent": sent.get(device, 0),
            **counts.get(device, {}),
            "dropped_by_outbox": drained.get(device, {}).get("dropped_windows"),
            "queue_depth_after_drain": drained.get(device, {}).get("queue_depth"),
            "broker_delivered_unique": len(delivered_unique),
            "broker_redelivered": len(delivered) - len(delivered_unique),
            "broker_lost": len(set(range(sent.get(device, 0))) - delivered_unique),
            "head_version": final.get(device, {}).get("head_version"),
            "max_lag_s": final.get(device, {}).get("max_lag_s"),
        }

    per_site = {}
    accepted_acks = {(ack["device"], ack["version"]) for ack in acks if ack["accepted"]}
    for site in sorted({site for _, site in devices}):
        members = [device for device, device_site in devices if device_site == site]
        versions = sorted({version for version, _ in manifests.get(site, {}).values()})
        newest = manifests[site][max(manifests[site])][0] if manifests.get(site) else 0
        rows = [per_device[device] for device in members]
        per_site[site] = {
            "recorders": len(members),
            "sent": sum(row["sent"] for row in rows),
            "received": sum(row.get("received", 0) for row in rows),
            "lost": sum(row.get("lost", 0) for row in rows),
            "duplicated": None if any(row.get("duplicated") is None for row in rows)
            else sum(row["duplicated"] for row in rows),
            "heads_pushed": len(manifests.get(site, {})),
            "versions": versions,
            "acks_accepted": len({(device, version) for device, version in accepted_acks if device in members}),
            "acks_rejected": sum(1 for ack in acks if ack["site"] == site and not ack["accepted"]),
            "recorders_on_newest": sum(1 for row in rows if row["head_version"] == newest and newest),
            "newest_version": newest,
        }

    def total(key):
        values = [site[key] for site in per_site.values()]
        return None if any(value is None for value in values) else sum(values)

    totals = {key: total(key) for key in ("sent", "received", "lost", "duplicated", "heads_pushed", "acks_accepted",
                                          "acks_rejected", "recorders_on_newest")}
    totals.update({
        "dropped_by_outbox": sum(row["dropped_by_outbox"] or 0 for row in per_device.values()),
        "broker_lost": sum(row["broker_lost"] for row in per_device.values()),
        "broker_redelivered": sum(row["broker_redelivered"] for row in per_device.values()),
        "unexpected": sum(row.get("unexpected", 0) for row in per_device.values()),
        "rejection_reasons": sorted({ack["reason"] for ack in acks if not ack["accepted"]}),
    })
    return {"totals": totals, "per_site": per_site, "per_device": per_device}



def markdown_report(result: dict) -> str:
    settings = result["settings"]
    totals = result["totals"]
    lines = [
        f"Soak: {settings['recorders']} recorders in {settings['sites']} sites, {settings['minutes']:g} min of "
        f"sending at {settings['speed']:g}x the field rate (one window per recorder every {settings['hop_s']:.2f} s), "
        f"counted at the {result['counted_at']}.",
        "",
        "| time | event |",
        "|---:|---|",
        *[f"| {event['at_s'] / 60:.1f} min | {event['event']} |" for event in result["timeline"]],
        "",
        "| site | windows sent | received (unique) | lost | duplicated | heads pushed | (recorder, head) acks "
        "| acks rejected | recorders on newest head |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for site, row in result["per_site"].items():
        lines.append(f"| {site} | {row['sent']} | {row['received']} | {row['lost']} | {_show(row['duplicated'])} | "
                     f"{row['heads_pushed']} | {row['acks_accepted']} | {row['acks_rejected']} | "
                     f"{row['recorders_on_newest']}/{row['recorders']} (v{row['newest_version']}) |")
    lines.append(f"| all | {totals['sent']} | {totals['received']} | {totals['lost']} | {_show(totals['duplicated'])} "
                 f"| {totals['heads_pushed']} | {totals['acks_accepted']} | {totals['acks_rejected']} | "
                 f"{totals['recorders_on_newest']}/{settings['recorders']} |")
    lines += [
        "",
        f"Dropped by recorder outboxes: {totals['dropped_by_outbox']}. Audit subscriber: {totals['broker_lost']} "
        f"windows never delivered, {totals['broker_redelivered']} delivered twice (QoS 1 redelivery).",
        "",
        "| process | RSS start | middle | end | peak | growth after warm-up | slope | CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for role, entry in result["memory"].items():
        growth = "n/a"
        if "growth_mib" in entry:
            growth = (f"{entry['growth_mib']:+.1f} MiB ({entry['measured_from_s'] / 60:.1f}-"
                      f"{entry['measured_to_s'] / 60:.1f} min)")
            if entry["expected_growth_mib"]:
                growth += f", of which buffer fill about {entry['expected_growth_mib']:.1f} MiB"
        slope = "n/a" if entry.get("slope_mib_per_hour") is None else f"{entry['slope_mib_per_hour']:+.1f} MiB/h"
        lines.append(f"| {role} ({entry['incarnations']} pid{'s' if entry['incarnations'] > 1 else ''}) | "
                     f"{entry['rss_start_mib']:.1f} MiB | {entry['rss_middle_mib']:.1f} MiB | "
                     f"{entry['rss_end_mib']:.1f} MiB | {entry['rss_peak_mib']:.1f} MiB | {growth} | {slope} | "
                     f"{entry['cpu_s']:.0f} s |")
    targets = result["targets"]
    lines += ["", f"Targets: 0 lost {_met(targets['lost_zero'])}, 0 duplicated {_met(targets['duplicated_zero'])}, "
                  f"memory flat (growth at most {settings['flat_mib']:g} MiB) {_met(targets['memory_flat'])}."]
    return "\n".join(lines)


def _show(value) -> str:
    return "n/a" if value is None else str(value)


def _met(flag: bool | None) -> str:
    if flag is None:
        return "not measured"
    return "met" if flag else "NOT met"
