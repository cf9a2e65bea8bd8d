"""The recorder's store-and-forward pieces on their own: the SQLite outbox, the reconnect
backoff and the queue fields of the status message."""

from __future__ import annotations

import json
import random
import sqlite3

import paho.mqtt.client as mqtt
import pytest

from dawnchorus.edge.backoff import Backoff
from dawnchorus.edge.outbox import Outbox
from dawnchorus.edge.uplink import Uplink
from dawnchorus.protocol.embeddings import PayloadError
from dawnchorus.protocol.messages import Receipt, Status

TOPIC = "dawnchorus/v1/site/rec/embeddings"


def _fill(outbox: Outbox, count: int, size: int = 100, windows: int = 4) -> None:
    for index in range(count):
        outbox.put(TOPIC, bytes([index % 256]) * size, windows=windows, first_sequence=index * windows)


def test_backoff_delays_stay_within_bounds():
    backoff = Backoff(min_delay_s=0.5, max_delay_s=30.0, rng=random.Random(7))
    for attempt in range(40):
        ceiling = min(30.0, 0.5 * 2**attempt)
        delay = backoff.next_delay()
        assert 0.0 <= delay <= ceiling, (attempt, delay)


def test_backoff_delays_grow_to_cap():
    backoff = Backoff(min_delay_s=0.5, max_delay_s=30.0, rng=random.Random(11))
    delays = [backoff.next_delay() for _ in range(200)]
    first, late = delays[:3], delays[100:]
    assert max(first) <= 0.5 * 2**2
    # Uniform on [0, 30]: the mean of 100 draws is 15 +- about 2.6 (three standard errors).
    assert 12.0 < sum(late) / len(late) < 18.0
    assert max(late) <= 30.0
    assert max(late) > 25.0


def test_backoff_seeded_sequence_reproducible():
    first = Backoff(rng=random.Random(3))
    second = Backoff(rng=random.Random(3))
    assert [first.next_delay() for _ in range(10)] == [second.next_delay() for _ in range(10)]


def test_backoff_reset_restarts_sequence():
    backoff = Backoff(min_delay_s=1.0, max_delay_s=60.0, rng=random.Random(5))
    for _ in range(10):
        backoff.next_delay()
    assert backoff.ceiling(backoff.attempts) == 60.0
    backoff.reset()
    assert backoff.attempts == 0
    assert backoff.next_delay() <= 1.0


def test_backoff_rejects_invalid_delays():
    with pytest.raises(ValueError, match="above 0"):
        Backoff(min_delay_s=0.0)
    with pytest.raises(ValueError, match="below the minimum"):
        Backoff(min_delay_s=10.0, max_delay_s=5.0)


def test_outbox_drains_in_order_after_reopen(tmp_path):
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    _fill(outbox, 5)
    outbox.close()

    reopened = Outbox(tmp_path / "outbox.sqlite3")
    assert reopened.stats().depth == 5
    entries = reopened.take(3) + reopened.take(10)
    assert [entry.first_sequence for entry in entries] == [0, 4, 8, 12, 16]
    assert reopened.take(10) == []
    reopened.remove([entry.id for entry in entries[:2]])
    assert reopened.stats().depth == 3
    reopened.close()

    # Entries handed out but not acknowledged before a restart are sent again.
    third = Outbox(tmp_path / "outbox.sqlite3")
    assert [entry.first_sequence for entry in third.take(10)] == [8, 12, 16]
    third.close()


def test_outbox_quota_drops_oldest_unsent(tmp_path):
    outbox = Outbox(tmp_path / "outbox.sqlite3", max_bytes=None, max_entries=4)
    _fill(outbox, 2)
    in_flight = outbox.take(1)
    _fill(outbox, 5)

    stats = outbox.stats()
    assert stats.depth == 4
    assert stats.dropped == 3
    assert stats.dropped_windows == 12
    # The entry handed to the MQTT client is kept, and the oldest unsent ones were dropped.
    outbox.rewind(in_flight[0].id)
    assert [entry.first_sequence for entry in outbox.take(10)] == [0, 8, 12, 16]
    outbox.close()


def test_outbox_quota_releases_delivered_before_dropping_unsent(tmp_path):
    outbox = Outbox(tmp_path / "outbox.sqlite3", max_bytes=None, max_entries=4)
    _fill(outbox, 3)
    handed_out = outbox.take(3)
    # The broker acknowledged the first two; they wait for the base station's receipt.
    outbox.mark_delivered(handed_out[:2])
    _fill(outbox, 4)

    stats = outbox.stats()
    assert stats.depth == 4
    assert (stats.released, stats.released_windows) == (2, 8)
    # One unsent entry went only after both delivered ones; the handed-out one stays.
    assert (stats.dropped, stats.dropped_windows) == (1, 4)
    assert outbox.released_ids() == [entry.id for entry in handed_out[:2]]
    assert outbox.released_ids() == []
    assert outbox.get(handed_out[0].id) is None
    assert outbox.get(handed_out[2].id) == handed_out[2]
    outbox.close()
    reopened = Outbox(tmp_path / "outbox.sqlite3", max_bytes=None, max_entries=4)
    assert (reopened.stats().released, reopened.stats().released_windows) == (2, 8)
    reopened.close()


def test_outbox_confirmed_entries_are_not_released(tmp_path):
    outbox = Outbox(tmp_path / "outbox.sqlite3", max_bytes=None, max_entries=3)
    _fill(outbox, 2)
    handed_out = outbox.take(2)
    outbox.mark_delivered(handed_out)
    outbox.remove([handed_out[0].id])
    _fill(outbox, 3)

    stats = outbox.stats()
    assert stats.depth == 3
    assert stats.released == 1
    assert outbox.released_ids() == [handed_out[1].id]
    outbox.close()


def test_outbox_byte_quota(tmp_path):
    outbox = Outbox(tmp_path / "outbox.sqlite3", max_bytes=1000, max_entries=None)
    _fill(outbox, 25, size=100)
    stats = outbox.stats()
    assert stats.bytes <= 1000
    assert stats.depth == 10
    assert stats.dropped == 15
    outbox.close()


def test_outbox_drop_count_survives_reopen(tmp_path):
    outbox = Outbox(tmp_path / "outbox.sqlite3", max_entries=2)
    _fill(outbox, 5)
    outbox.close()
    reopened = Outbox(tmp_path / "outbox.sqlite3", max_entries=2)
    assert reopened.stats().dropped == 3
    assert reopened.stats().dropped_windows == 12
    reopened.close()


def test_outbox_full_disk_drops_oldest(tmp_path):
    outbox = Outbox(tmp_path / "outbox.sqlite3", max_bytes=None)
    # SQLite reports SQLITE_FULL, as on a full disk, once the file reaches max_page_count pages.
    pages = outbox._db.execute("PRAGMA page_count").fetchone()[0]
    outbox._db.execute(f"PRAGMA max_page_count = {pages + 12}")
    for index in range(40):
        outbox.put(TOPIC, bytes(3000), windows=2, first_sequence=2 * index)

    stats = outbox.stats()
    assert stats.dropped > 0
    assert stats.depth + stats.dropped == 40
    assert stats.dropped_windows == 2 * stats.dropped
    remaining = [entry.first_sequence for entry in outbox.take(100)]
    assert remaining[-1] == 78
    assert remaining == sorted(remaining)
    outbox.close()


def test_outbox_sequence_numbers_never_repeat(tmp_path):
    legacy = tmp_path / "next_sequence"
    legacy.write_text("1000")
    outbox = Outbox(tmp_path / "outbox.sqlite3", legacy_sequence_path=legacy)
    assert outbox.allocate_sequence(3).tolist() == [1000, 1001, 1002]
    outbox.close()

    reopened = Outbox(tmp_path / "outbox.sqlite3", legacy_sequence_path=legacy)
    assert reopened.allocate_sequence(2).tolist() == [1003, 1004]
    assert reopened.next_sequence == 1005
    reopened.close()


def test_outbox_is_sqlite_wal(tmp_path):
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    _fill(outbox, 1)
    reader = sqlite3.connect(tmp_path / "outbox.sqlite3")
    assert reader.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert reader.execute("SELECT count(*) FROM entries").fetchone()[0] == 1
    reader.close()
    outbox.close()


def test_outbox_rejects_invalid_quota(tmp_path):
    with pytest.raises(ValueError, match="entries is invalid"):
        Outbox(tmp_path / "outbox.sqlite3", max_entries=0)
    with pytest.raises(ValueError, match="bytes is invalid"):
        Outbox(tmp_path / "outbox.sqlite3", max_bytes=0)


def test_status_queue_fields_round_trip():
    status = Status("rec-01", "forest-a", "online", 3, 100, 1.0, {"windows": 100}, queue_depth=7,
                    queue_bytes=2048, queue_dropped=2, queue_dropped_windows=32)
    decoded = Status.decode(status.encode())
    assert decoded == status


def test_status_without_queue_fields_decodes():
    old = json.dumps({"device": "rec-01", "site": "forest-a", "state": "online", "head_version": 0,
                      "windows": 5, "time": 1.0, "counters": {}}).encode()
    decoded = Status.decode(old)
    assert decoded.queue_depth == 0
    assert decoded.queue_dropped == 0


def test_status_negative_queue_field_rejected():
    bad = json.dumps({"device": "rec-01", "site": "forest-a", "state": "online", "head_version": 0,
                      "queue_dropped": -1}).encode()
    with pytest.raises(PayloadError, match="queue_dropped"):
        Status.decode(bad)


def _uplink_with_delivered(tmp_path, count: int):
    """An uplink that never connects, whose first ``count`` outbox entries the broker has acknowledged.

    The sender's steps run on the test's thread, as they would on the sender thread.
    """
    outbox = Outbox(tmp_path / "outbox.sqlite3", max_bytes=None)
    _fill(outbox, count)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-uplink")
    uplink = Uplink(client, "127.0.0.1", 1, 30, outbox, Backoff(1, 2), "rec", receipts=True)
    in_flight = {mid: entry for mid, entry in enumerate(outbox.take(count), start=1)}
    uplink._acknowledged_mids.extend(in_flight)
    uplink._collect_acknowledged(in_flight)
    return uplink, outbox, in_flight


def test_uplink_applies_overlapping_receipts_once(tmp_path):
    uplink, outbox, in_flight = _uplink_with_delivered(tmp_path, 3)
    assert outbox.stats().depth == 3
    # Receipts are cumulative: the second one confirms the first entry again.
    uplink.on_receipt(Receipt("rec", "site", [(0, 4)]))
    uplink.on_receipt(Receipt("rec", "site", [(0, 8)]))
    uplink._apply_receipts(in_flight)

    assert outbox.stats().depth == 1
    assert uplink.counters["confirmed"] == 2
    assert uplink._resend == []
    outbox.close()


def test_uplink_resends_entry_a_later_receipt_skips(tmp_path):
    uplink, outbox, in_flight = _uplink_with_delivered(tmp_path, 3)
    # Entries hold windows 0-3, 4-7 and 8-11. The station confirmed the first and the third, so the
    # broker lost the second, which it had acknowledged before the third.
    uplink.on_receipt(Receipt("rec", "site", [(0, 4), (8, 12)]))
    uplink._apply_receipts(in_flight)

    assert outbox.stats().depth == 1
    assert [outbox.get(entry_id).first_sequence for entry_id in uplink._resend] == [4]
    outbox.close()


@pytest.mark.parametrize("code, hint", [(135, "DAWNCHORUS_MQTT_PASSWORD"), (134, "--mqtt-user"),
                                        (133, "client id"), (136, "")])
def test_uplink_rejection_names_what_to_check(code, hint):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from dawnchorus.edge.uplink import _rejection_hint

    text = _rejection_hint(ReasonCode(PacketTypes.CONNACK, identifier=code))
    assert hint in text
    assert bool(text) == bool(hint)
