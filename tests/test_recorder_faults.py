"""Faults around the recorder, with real ``dawnchorus edge run`` processes replaying real
recordings into a real Mosquitto that the tests kill, cut off and restart.

A receiver takes the place of the base station. It keeps a persistent MQTT
session, as the base station does, but sends no receipts, so the recorders
run with ``--no-receipts`` (tests/test_broker_kill.py has the real base
station and receipts). The receiver records the (device, sequence number)
of every embedding window it receives. Each test prints the lost and
duplicated counts (run pytest with -s to see them). QoS 1 may deliver a
message twice, so duplicates are counted but allowed; after deduplication by
(device, sequence number) nothing may be missing.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pytest

from support import wait as _wait

from dawnchorus.protocol import topics
from dawnchorus.protocol.embeddings import decode_embeddings
from dawnchorus.protocol.messages import Status

SITE = "faults"

pytestmark = pytest.mark.slow


class EmbeddingsReceiver:
    """A persistent MQTT session that records every embedding window and the latest status of each device."""

    def __init__(self, broker):
        self._condition = threading.Condition()
        self.windows: dict[str, list[tuple[int, float]]] = {}
        self.statuses: dict[str, Status] = {}
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"receiver-{uuid.uuid4().hex[:8]}",
                                  clean_session=False)
        self.client.reconnect_delay_set(min_delay=0.2, max_delay=1)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self.subscribed.wait(20), "the receiver could not subscribe"

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        client.subscribe([(topics.device_wildcard("embeddings"), 1), (topics.device_wildcard("status"), 1)])

    def _on_message(self, client, userdata, message) -> None:
        with self._condition:
            if message.topic.endswith("/embeddings"):
                batch = decode_embeddings(message.payload)
                received = self.windows.setdefault(batch.device, [])
                received.extend(zip(batch.sequence.tolist(), batch.start_time.tolist()))
            elif message.topic.endswith("/status") and message.payload:
                status = Status.decode(message.payload)
                self.statuses[status.device] = status
            self._condition.notify_all()

    def wait_for(self, condition, timeout: float) -> bool:
        with self._condition:
            return bool(self._condition.wait_for(condition, timeout=timeout))

    def sequences(self, device: str) -> list[int]:
        """Sequence numbers of the device's windows in arrival order, duplicates included."""
        with self._condition:
            return [sequence for sequence, _ in self.windows.get(device, [])]

    def first_arrivals(self, device: str) -> list[tuple[int, float]]:
        """(sequence, start time) of the device's windows in arrival order, without redeliveries."""
        seen = set()
        unique = []
        with self._condition:
            for sequence, start_time in self.windows.get(device, []):
                if sequence not in seen:
                    seen.add(sequence)
                    unique.append((sequence, start_time))
        return unique

    def report(self, device: str, expected: set[int], case: str) -> tuple[set[int], int]:
        """Print and return the missing sequence numbers and the raw duplicate count."""
        received = self.sequences(device)
        lost = expected - set(received)
        duplicated = len(received) - len(set(received))
        print(f"\n{case}: {device}: {len(expected)} windows expected, {len(set(received))} received, "
              f"lost {len(lost)}, duplicated {duplicated}")
        return lost, duplicated

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()




def _saved_after(broker, moment: float) -> bool:
    database = broker.directory / "mosquitto.db"
    return database.exists() and database.stat().st_mtime > moment


@pytest.fixture()
def receiver(persistent_mosquitto):
    listener = EmbeddingsReceiver(persistent_mosquitto)
    subscribed_at = time.time()
    # A broker restarted after SIGKILL has the session only if its last save contains it.
    assert _wait(lambda: _saved_after(persistent_mosquitto, subscribed_at + 0.01), 20)
    yield listener
    listener.close()


def _start_recorder(programs, broker, device: str, inputs: list, state_dir, *options: str):
    return programs.start(
        "edge", "run", "--device", device, "--site", SITE, "--broker", broker.address,
        "--input", *map(str, inputs), "--threads", "1", "--windows-per-message", "2",
        "--state-dir", str(state_dir), "--reconnect-min-delay", "0.2", "--reconnect-max-delay", "2",
        # The receiver sends no receipts, so entries go at the broker's PUBACK, as with no base station.
        "--drain-timeout", "300", "--no-receipts", *options, log=f"{device}.log",
    )


def _windows_analysed(log: str) -> int:
    match = re.search(r"source finished after (\d+) windows", log)
    assert match, log[-3000:]
    return int(match.group(1))


def _queued_entries(state_dir, device: str) -> int:
    path = state_dir / device / "outbox.sqlite3"
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(path, timeout=5) as database:
            return database.execute("SELECT count(*) FROM entries WHERE topic LIKE '%/embeddings'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _exited(process, timeout: float) -> bool:
    return _wait(lambda: process.poll() is not None, timeout)


def test_broker_killed_mid_stream_loses_nothing(persistent_mosquitto, receiver, programs, data_dir, tmp_path):
    broker = persistent_mosquitto
    device = "rec-broker-kill"
    recorder = _start_recorder(programs, broker, device, [data_dir / "soundscapes/birdnet-example/soundscape.flac"],
                               tmp_path / "edge", "--speed", "10")
    assert receiver.wait_for(lambda: len(receiver.windows.get(device, [])) >= 6, 120), programs.log(f"{device}.log")

    broker.kill()
    assert _wait(lambda: "could not connect" in programs.log(f"{device}.log"), 60)
    broker.start()

    assert _exited(recorder, 300), programs.log(f"{device}.log")[-3000:]
    assert recorder.returncode == 0
    log = programs.log(f"{device}.log")
    assert "disconnected from" in log
    windows = _windows_analysed(log)
    assert windows == 40
    assert receiver.wait_for(lambda: set(range(windows)) <= set(receiver.sequences(device)), 60)
    lost, duplicated = receiver.report(device, set(range(windows)), "broker killed mid-stream")
    assert lost == set()
    assert duplicated >= 0


def test_recorder_cut_off_delivers_in_order(persistent_mosquitto, receiver, programs, data_dir, tmp_path):
    broker = persistent_mosquitto
    device = "rec-cut-off"
    inputs = [data_dir / "soundscapes/birdnet-example/soundscape.flac", data_dir / "soundscapes/opensoundscape"]
    recorder = _start_recorder(programs, broker, device, inputs, tmp_path / "edge", "--speed", "20")
    assert receiver.wait_for(lambda: len(receiver.windows.get(device, [])) >= 4, 120), programs.log(f"{device}.log")

    broker.stop()
    # Cut off until the recorder has queued at least 10 messages (20 windows, a minute of audio).
    assert _wait(lambda: _queued_entries(tmp_path / "edge", device) >= 10, 120), programs.log(f"{device}.log")
    queued_while_cut_off = _queued_entries(tmp_path / "edge", device)
    broker.start()

    assert _exited(recorder, 300), programs.log(f"{device}.log")[-3000:]
    assert recorder.returncode == 0
    windows = _windows_analysed(programs.log(f"{device}.log"))
    assert windows == 40 + 24
    assert receiver.wait_for(lambda: set(range(windows)) <= set(receiver.sequences(device)), 60)
    lost, duplicated = receiver.report(device, set(range(windows)), "recorder cut off")
    print(f"recorder cut off: {queued_while_cut_off} messages were queued when the broker came back")
    assert lost == set()
    arrival = [sequence for sequence, _ in receiver.first_arrivals(device)]
    assert arrival == sorted(arrival)
    assert queued_while_cut_off >= 10


def test_queue_quota_drops_oldest_and_reports(persistent_mosquitto, receiver, programs, data_dir, tmp_path):
    broker = persistent_mosquitto
    device = "rec-quota"
    broker.kill()
    recorder = _start_recorder(programs, broker, device, [data_dir / "soundscapes/birdnet-example/soundscape.flac"],
                               tmp_path / "edge", "--speed", "0", "--queue-max-entries", "4")
    # The recorder analyses the whole file while the broker is down and the queue overflows.
    assert _wait(lambda: "source finished" in programs.log(f"{device}.log"), 180), programs.log(f"{device}.log")
    windows = _windows_analysed(programs.log(f"{device}.log"))
    assert windows == 40
    assert "the queue quota was reached" in programs.log(f"{device}.log")
    broker.start()

    assert _exited(recorder, 300), programs.log(f"{device}.log")[-3000:]
    assert recorder.returncode == 0
    assert receiver.wait_for(lambda: receiver.statuses.get(device) is not None
                             and receiver.statuses[device].state == "offline", 60)
    status = receiver.statuses[device]
    received = set(receiver.sequences(device))
    print(f"\nqueue quota: {len(received)} of {windows} windows delivered, {status.queue_dropped} messages "
          f"({status.queue_dropped_windows} windows) dropped and reported")
    assert status.queue_dropped > 0
    assert status.queue_depth == 0
    assert status.windows == windows
    # Every window was either delivered or counted as dropped, and the newest ones arrived.
    assert len(received) + status.queue_dropped_windows == windows
    assert received == set(range(windows - len(received), windows))
    assert windows - 1 in received


@pytest.fixture()
def small_disk(tmp_path):
    """A 4 MiB tmpfs file system, for a recorder state folder that fills up; skipped where mounting is not allowed."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip() or mounted.returncode}); "
                    "the full-disk path is also covered by tests/test_outbox.py")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_full_disk_drops_oldest_and_reports(persistent_mosquitto, receiver, programs, data_dir, small_disk):
    broker = persistent_mosquitto
    device = "rec-full-disk"
    broker.kill()
    # One window per message and no quota: the queue grows until the file system is full.
    recorder = _start_recorder(programs, broker, device, [data_dir / "soundscapes/maad-24h"], small_disk,
                               "--speed", "0", "--windows-per-message", "1", "--queue-max-mb", "0")
    assert _wait(lambda: "source finished" in programs.log(f"{device}.log") or recorder.poll() is not None, 300)
    log = programs.log(f"{device}.log")
    windows = _windows_analysed(log)
    assert windows == 384
    assert "the disk is full, dropped the" in log
    broker.start()

    assert _exited(recorder, 300), programs.log(f"{device}.log")[-3000:]
    assert recorder.returncode == 0
    assert receiver.wait_for(lambda: receiver.statuses.get(device) is not None
                             and receiver.statuses[device].state == "offline", 60)
    status = receiver.statuses[device]
    received = set(receiver.sequences(device))
    print(f"\nfull disk: {len(received)} of {windows} windows delivered, {status.queue_dropped} messages "
          f"({status.queue_dropped_windows} windows) dropped and reported")
    assert status.windows == windows
    assert status.queue_dropped_windows > 0
    assert status.queue_depth == 0
    # Every window was either delivered or counted as dropped, and the dropped ones were the oldest.
    assert len(received) + status.queue_dropped_windows == windows
    assert received == set(range(windows - len(received), windows))


def test_recorder_killed_clock_back_keeps_sequence(persistent_mosquitto, receiver, programs, data_dir, tmp_path):
    broker = persistent_mosquitto
    device = "rec-clock"
    state = tmp_path / "edge"
    broker.kill()

    first = _start_recorder(programs, broker, device, [data_dir / "soundscapes/birdnet-example/soundscape.flac"],
                            state, "--speed", "10")
    assert _wait(lambda: _queued_entries(state, device) >= 4, 120), programs.log(f"{device}.log")
    first.kill()
    first.wait(timeout=10)
    with sqlite3.connect(state / device / "outbox.sqlite3") as database:
        payloads = database.execute("SELECT payload FROM entries WHERE topic LIKE '%/embeddings'").fetchall()
        next_sequence = database.execute("SELECT value FROM counters WHERE name = 'next_sequence'").fetchone()[0]
    queued = {int(sequence) for (payload,) in payloads for sequence in decode_embeddings(payload).sequence}
    assert len(queued) >= 8

    # After the crash the recorder comes back with its clock an hour behind, as a unit without a
    # real-time clock can after a reboot.
    broker.start()
    second = _start_recorder(programs, broker, device, [data_dir / "soundscapes/opensoundscape/birds_10s.wav"],
                             state, "--speed", "0", "--clock-offset", "-3600")
    assert _exited(second, 300), programs.log(f"{device}.log")[-3000:]
    assert second.returncode == 0
    second_run = set(range(next_sequence, next_sequence + _windows_analysed(programs.log(f"{device}.log"))))
    expected = queued | second_run
    assert receiver.wait_for(lambda: expected <= set(receiver.sequences(device)), 60)
    lost, duplicated = receiver.report(device, expected, "recorder killed, clock an hour back")
    assert lost == set()

    arrivals = receiver.first_arrivals(device)
    times = dict(arrivals)
    assert min(times[s] for s in second_run) > max(times[s] for s in queued) - 3600 - 600
    assert max(times[s] for s in second_run) < min(times[s] for s in queued)
    assert min(second_run) > max(queued)
    # The receiver gets the data in sequence order, which is not the order of the timestamps.
    arrival_order = [sequence for sequence, _ in arrivals]
    assert arrival_order == sorted(arrival_order)
    assert arrival_order != [sequence for sequence, _ in sorted(arrivals, key=lambda item: item[1])]


def test_flapping_broker_no_reconnect_storm(persistent_mosquitto, programs, data_dir, tmp_path):
    broker = persistent_mosquitto
    device = "rec-flap"
    reject_all = "allow_anonymous false\n"
    broker.kill()
    broker.start(reject_all)
    recorder = _start_recorder(programs, broker, device, [data_dir / "soundscapes/opensoundscape/birds_10s.wav"],
                               tmp_path / "edge", "--speed", "0", "--stay", "--reconnect-min-delay", "0.5",
                               "--reconnect-max-delay", "4")
    assert _wait(lambda: "rejected the connection" in programs.log(f"{device}.log"), 120)
    attempts_before = programs.log(f"{device}.log").count("reconnecting in")

    # Flap for 16 s: two seconds rejecting every connection, then two seconds down, four times.
    for _ in range(4):
        time.sleep(2)
        broker.kill()
        time.sleep(2)
        broker.start(reject_all)
    log = programs.log(f"{device}.log")
    attempts = log.count("reconnecting in") - attempts_before
    rejected = broker.log_path.read_text().count("disconnected, not authorised")
    delays = [float(value) for value in re.findall(r"reconnecting in ([0-9.]+) s", log)]
    print(f"\nflapping broker: {attempts} reconnect attempts in 16 s, {rejected} CONNECTs rejected by the broker")
    # Without backoff a client retries every few milliseconds. With a 4 s cap and full jitter the
    # expected count over 16 s is about 10.
    assert 2 <= attempts <= 30
    assert rejected <= 30
    assert max(delays) <= 4.0

    broker.kill()
    broker.start()
    assert _wait(lambda: programs.log(f"{device}.log").count("connected to") >= 1, 60)
    assert recorder.poll() is None
