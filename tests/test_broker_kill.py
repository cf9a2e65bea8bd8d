"""Fault test: the broker SIGKILLed mid-stream, counted in the real base station's buffers.

Mosquitto acknowledges a recorder's QoS 1 message as soon as the message is
in its memory, and saves its queues to disk only every ``autosave_interval``
and on a clean stop. A broker that crashes in between loses every message it
had acknowledged but not yet passed on. Here the base station is stopped
while two ``dawnchorus edge run`` processes keep replaying real recordings,
so the broker queues their messages for the station's session; then the
broker is SIGKILLed before its next save and restarted, and the station
comes back.

One recorder waits for the base station's receipts (the default); the other
runs with ``--no-receipts`` and deletes its messages at the broker's PUBACK.
The second recorder's losses show that the crash did destroy queued
messages; the first must lose nothing and duplicate nothing in the buffers
that ``dawnchorus server inspect`` reads from the station's state.
"""

from __future__ import annotations

import os
import pwd

import pytest
from support import accepted_windows, generate_keys, inspect_station, recorder_sent, wait, write_species

SITE = "kill-broker-site"
WITH_RECEIPTS = "rec-receipts"
WITHOUT_RECEIPTS = "rec-no-receipts"


@pytest.mark.slow
def test_broker_killed_mid_stream_loses_nothing_with_receipts(programs, start_mosquitto, data_dir, tmp_path):
    directory = tmp_path / "broker-data"
    directory.mkdir()
    # Persistence as in deploy/, with a save interval longer than the test, so
    # that the SIGKILL surely comes before the next save.
    broker = start_mosquitto("broker", config=lambda port: (
        f"listener {port} 127.0.0.1\nallow_anonymous true\n"
        f"persistence true\npersistence_location {directory}/\nautosave_interval 3600\n"
        "max_queued_messages 100000\nmax_inflight_messages 0\n"
        f"user {pwd.getpwuid(os.getuid()).pw_name}\n"))
    keys = generate_keys(tmp_path / "keys")
    species = write_species(tmp_path / "species.txt")
    server_state, edge_state = tmp_path / "server", tmp_path / "edge"

    def start_server(log: str):
        process = programs.start(
            "server", "run", "--broker", broker.address, "--state-dir", str(server_state),
            "--signing-key", str(keys / "head-signing.key"), "--default-species", f"@{species}",
            # No adaptation rounds: this test is about delivery.
            "--update-interval", "100000", log=log)
        assert wait(lambda: "base station ready" in programs.log(log) or process.poll() is not None, 180)
        assert process.poll() is None, programs.log(log)[-3000:]
        return process

    server = start_server("server-0.log")
    # 96 files of 10 s (384 windows) at 15 times real time: about 65 s each.
    recordings = [str(data_dir / "soundscapes/maad-24h")]
    recorders = {
        device: programs.start(
            "edge", "run", "--device", device, "--site", SITE, "--broker", broker.address, "--input", *recordings,
            "--speed", "15", "--species-file", str(species), "--head-public-key", str(keys / "head-signing.pub"),
            "--state-dir", str(edge_state), "--threads", "1", "--reconnect-min-delay", "0.2",
            "--reconnect-max-delay", "2", "--receipt-timeout", "5", "--drain-timeout", "300", *options,
            log=f"{device}.log")
        for device, options in ((WITH_RECEIPTS, ()), (WITHOUT_RECEIPTS, ("--no-receipts",)))
    }

    def sent() -> dict[str, int]:
        return {device: recorder_sent(edge_state, device) for device in recorders}

    assert wait(lambda: accepted_windows(server_state, SITE) >= 64, 240, interval=1), \
        programs.log("server-0.log")[-3000:]
    server.terminate()
    assert server.wait(timeout=60) == 0, programs.log("server-0.log")[-3000:]

    # The broker now queues both recorders' messages for the station's session, in memory only.
    sent_at_stop = sent()
    assert wait(lambda: all(count >= sent_at_stop[device] + 48 for device, count in sent().items()), 120)
    assert all(process.poll() is None for process in recorders.values()), "the recorders ended before the crash"
    broker.kill()
    broker.start()
    server = start_server("server-1.log")

    for device, process in recorders.items():
        assert process.wait(timeout=400) == 0, programs.log(f"{device}.log")[-3000:]
    expected = sent()

    def caught_up() -> bool:
        site = inspect_station(server_state).get(SITE)
        return site is not None and site["devices"].get(WITH_RECEIPTS, {}).get("accepted_windows") \
            == expected[WITH_RECEIPTS]

    assert wait(caught_up, 120, interval=2), programs.log("server-1.log")[-3000:]
    server.terminate()
    assert server.wait(timeout=60) == 0, programs.log("server-1.log")[-3000:]
    site = inspect_station(server_state)[SITE]

    counts = {}
    for device, count in expected.items():
        entry = site["devices"][device]
        in_buffer = sum(end - start for start, end in entry["buffer_ranges"])
        counts[device] = (count, count - in_buffer, entry["buffer_duplicates"])
    print("broker SIGKILLed with queued messages: " + ", ".join(
        f"{device} sent {sent_count}, lost {lost}, duplicated {duplicated}"
        for device, (sent_count, lost, duplicated) in counts.items()))

    sent_count, lost, duplicated = counts[WITH_RECEIPTS]
    assert (lost, duplicated) == (0, 0)
    assert site["devices"][WITH_RECEIPTS]["buffer_ranges"] == [[0, sent_count]]
    log = programs.log(f"{WITH_RECEIPTS}.log")
    assert "sending it again" in log or "as a probe" in log, log[-3000:]
    # The control: the crash destroyed messages that the broker had acknowledged.
    assert counts[WITHOUT_RECEIPTS][1] > 0
