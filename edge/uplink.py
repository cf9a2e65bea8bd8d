"""The recorder's MQTT connection: reconnects with jittered backoff and drains the outbox in order.

Two threads run here. The network thread owns the connection: it connects,
runs paho's loop until the connection drops, waits a delay drawn from
``Backoff`` and tries again. The sender thread publishes outbox entries at
QoS 1, at most ``window`` at a time.

paho keeps an unacknowledged QoS 1 message across a reconnect and sends it
again after the new CONNACK. After a reconnect the sender therefore waits
until those messages are acknowledged before it hands out newer entries,
which keeps each device's messages in queue order at the broker.

A PUBACK means that the broker has the message, not that it will deliver
it: Mosquitto saves its queues to disk only every ``autosave_interval``, so
a broker that crashes loses what it acknowledged since. With receipts on,
an embeddings entry is therefore deleted only when a receipt from the base
station covers its first sequence number (detections are still deleted at
the PUBACK). An entry whose PUBACK came is "delivered" and waits for its
receipt. The sender sends such an entry again in two cases:

- Loss seen: a receipt covers an entry whose PUBACK came later. The broker
  passes one client's messages on in the order it acknowledged them, and
  the station handles and confirms them in that order, so the earlier
  entry was lost (or rejected by the station). It is sent again, at most
  ``MAX_RESENDS`` times; after that it is deleted, counted and logged.
- Silence: no receipt has confirmed anything for ``receipt_timeout_s``
  while entries wait. The station may be down, so only the oldest waiting
  entry is sent again, as a probe. When the probe's receipt comes back,
  every entry acknowledged before it that is still waiting was lost, and
  the first rule sends it again. A station that is down for a day costs
  one duplicate message per timeout, which the station drops by sequence
  number.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Callable

import paho.mqtt.client as mqtt

from dawnchorus.edge.backoff import Backoff
from dawnchorus.edge.outbox import Outbox, OutboxEntry
from dawnchorus.protocol.messages import Receipt

_LOGGER = logging.getLogger(__name__)

# Unacknowledged messages handed to paho at a time. 16 messages of 16 windows
# keep loopback and LAN links busy while the drain waits for PUBACKs. The
# quota cannot evict these entries, so the queue can exceed its quota by this
# many messages.
DEFAULT_WINDOW = 16

# Seconds without a confirming receipt, while entries wait for one, before the oldest is sent again as a probe.
DEFAULT_RECEIPT_TIMEOUT_S = 120.0

# Times an entry is sent again after a loss was seen. An entry that a running
# station still does not confirm was rejected by it (the station logs why),
# and sending it for ever would not change that.
MAX_RESENDS = 5


@dataclasses.dataclass
class _Delivered:
    """An entry that the broker acknowledged and that waits for the base station's receipt.

    Attributes:
        first_sequence: the sequence number of its first window.
        order: position of its PUBACK among all PUBACKs of this uplink.
        resends: times it was sent again after a loss was seen.
        windows: embedding windows in it.
    """

    first_sequence: int
    order: int
    resends: int = 0
    windows: int = 0


def _rejection_hint(reason_code) -> str:
    """Return what to check after the broker rejected the connection, for the log line."""
    text = str(reason_code).lower()
    if "authorized" in text or "user name or password" in text:
        return ("; check --mqtt-user and the password in DAWNCHORUS_MQTT_PASSWORD, or --mqtt-cert and --mqtt-key, "
                "against the broker's password file or certificate authority")
    if "identifier" in text:
        return "; the broker rejected the client id, which is dawnchorus-recorder-<device id>"
    return ""


class Uplink:
    """Connects a paho client with jittered backoff and publishes an ``Outbox`` through it.

    Args:
        client: a configured paho client (credentials, last will, message
            callbacks). The uplink sets its ``on_connect``, ``on_disconnect``
            and ``on_publish``.
        host, port, keepalive_s: the broker and the MQTT keepalive.
        outbox: the queue to drain.
        backoff: the reconnect delays.
        name: the recorder's device id, for logs.
        on_connecting: called on the network thread before every connection
            attempt, for example to update the last will.
        on_connected: called on paho's network thread after every accepted connection.
        on_delivered: called on the sender thread when entries leave the
            outbox as delivered (confirmed by a receipt, or by the broker's
            PUBACK where no receipt is awaited), with the embedding windows in
            them and the delivered entries without windows (detections).
        window: unacknowledged messages at a time.
        receipts: keep embeddings entries until the base station's receipt
            covers them; False deletes them at the broker's PUBACK, for a
            recorder whose messages no dawnchorus base station receives.
        receipt_timeout_s: seconds without a confirming receipt before the
            oldest waiting entry is sent again as a probe.
    """

    def __init__(
        self,
        client: mqtt.Client,
        host: str,
        port: int,
        keepalive_s: int,
        outbox: Outbox,
        backoff: Backoff,
        name: str,
        on_connecting: Callable[[mqtt.Client], None] | None = None,
        on_connected: Callable[[mqtt.Client], None] | None = None,
        on_delivered: Callable[[int, list[OutboxEntry]], None] | None = None,
        window: int = DEFAULT_WINDOW,
        receipts: bool = False,
        receipt_timeout_s: float = DEFAULT_RECEIPT_TIMEOUT_S,
    ):
        if receipt_timeout_s <= 0:
            raise ValueError(f"receipt timeout of {receipt_timeout_s} s is invalid: use a positive number of seconds")
        self._client = client
        self._host = host
        self._port = port
        self._keepalive_s = keepalive_s
        self._outbox = outbox
        self._backoff = backoff
        self._name = name
        self._on_connecting = on_connecting
        self._on_connected = on_connected
        self._on_delivered = on_delivered
        self._window = window
        self._receipts = receipts
        self._receipt_timeout_s = receipt_timeout_s
        # Counts of the receipt mechanism, for the recorder's status. Every key exists from the start, so
        # that another thread can read the counter while the sender updates it.
        self.counters: collections.Counter[str] = collections.Counter(dict.fromkeys(
            ("receipts", "confirmed", "probes", "resent", "unconfirmed", "unconfirmed_windows"), 0))

        self.connected = threading.Event()
        self.connections = 0
        self._connected_since: float | None = None
        self._stopping = threading.Event()
        self._sender_done = threading.Event()
        self._wake = threading.Event()
        # Message ids of PUBACKs, appended on the network thread and matched to entries on the sender thread.
        self._acknowledged_mids: collections.deque[int] = collections.deque()
        self._resend_pending = False
        self._threads: list[threading.Thread] = []
        # Receipts, appended on the network thread and applied on the sender thread.
        self._receipts_in: collections.deque[Receipt] = collections.deque()
        # The rest belongs to the sender thread. Delivered entries by id, in id order, and the ids to send again.
        self._delivered: dict[int, _Delivered] = {}
        self._resend: list[int] = []
        # Ids that a receipt confirmed before the sender saw their PUBACK.
        self._confirmed_early: set[int] = set()
        self._puback_order = 0
        self._last_confirmation = time.monotonic()
        self._last_probe = 0.0
        # Monotonic times at which the network and sender threads last went round their loops.
        self._network_beat = time.monotonic()
        self._sender_beat = time.monotonic()

        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish

    def start(self) -> None:
        self._client.connect_async(self._host, self._port, keepalive=self._keepalive_s)
        for target, label in ((self._run_network, "mqtt"), (self._run_sender, "outbox")):
            thread = threading.Thread(target=target, name=f"{self._name}-{label}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def wait_drained(self, timeout_s: float, cancel: threading.Event | None = None) -> bool:
        """Wait until every queued entry is acknowledged; return False after ``timeout_s`` seconds or on ``cancel``."""
        deadline = time.monotonic() + timeout_s
        while self._outbox.stats().depth > 0:
            if time.monotonic() > deadline or (cancel is not None and cancel.is_set()):
                return False
            self._wake.set()
            time.sleep(0.1)
        return True

    def health(self, stall_s: float) -> str | None:
        """Return None while both threads run and go round their loops, else what is stuck.

        A broker that cannot be reached is no fault here: the network thread
        still goes round its backoff loop, and the outbox keeps the data.
        """
        now = time.monotonic()
        for thread in self._threads:
            if not thread.is_alive() and not self._stopping.is_set():
                return f"the MQTT thread {thread.name} has ended"
        for label, beat in (("network", self._network_beat), ("outbox sender", self._sender_beat)):
            if self._threads and now - beat > stall_s:
                return f"the MQTT {label} thread has made no progress for {now - beat:.0f} s"
        return None

    def publish_now(self, topic: str, payload: bytes, retain: bool = False, when_offline: bool = True) -> None:
        """Publish at QoS 1 outside the outbox (status, acks).

        With ``when_offline`` False the message is skipped while the broker
        is unreachable. Otherwise paho keeps it in memory and sends it after
        the next CONNACK.
        """
        if not when_offline and not self.connected.is_set():
            return
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            _LOGGER.error("recorder %s: publish to %s failed: %s", self._name, topic, mqtt.error_string(info.rc))

    def on_receipt(self, receipt: Receipt) -> None:
        """Hand a decoded receipt from the base station to the sender; called on paho's network thread."""
        self._receipts_in.append(receipt)
        self._wake.set()

    def stop(self) -> None:
        """Stop sending, disconnect cleanly and join the threads. Queued entries stay in the outbox."""
        self._stopping.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=30)

    # paho callbacks, on the network thread -----------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            _LOGGER.error("recorder %s: the broker at %s:%d rejected the connection: %s%s", self._name, self._host,
                          self._port, reason_code, _rejection_hint(reason_code))
            return
        self.connections += 1
        self._connected_since = time.monotonic()
        self._resend_pending = True
        self.connected.set()
        self._wake.set()
        if self._on_connected is not None:
            self._on_connected(client)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if not self._stopping.is_set():
            _LOGGER.warning("recorder %s: disconnected from %s:%d (%s)", self._name, self._host, self._port,
                            reason_code)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._acknowledged_mids.append(mid)
        self._wake.set()

    # Network thread -------------------------------------------------------------------

    def _run_network(self) -> None:
        while not self._stopping.is_set():
            try:
                self._connect_and_loop()
            except Exception:
                # A failure in a callback must not end the thread that reconnects for months.
                _LOGGER.exception("recorder %s: the MQTT connection failed; reconnecting", self._name)
            self.connected.clear()

            # Only a connection that lasted as long as the maximum delay restarts the backoff sequence.
            if self._connected_since is not None:
                if time.monotonic() - self._connected_since >= self._backoff.max_delay_s:
                    self._backoff.reset()
                self._connected_since = None
            if self._stopping.is_set():
                break
            delay = self._backoff.next_delay()
            _LOGGER.info("recorder %s: reconnecting in %.1f s (attempt %d)", self._name, delay,
                         self._backoff.attempts)
            # Waited in slices, so that the watchdog finds the thread alive through a long delay.
            resume = time.monotonic() + delay
            while not self._stopping.wait(max(0.0, min(1.0, resume - time.monotonic()))):
                self._network_beat = time.monotonic()
                if time.monotonic() >= resume:
                    break

    def _connect_and_loop(self) -> None:
        self._network_beat = time.monotonic()
        if self._on_connecting is not None:
            self._on_connecting(self._client)
        try:
            self._client.reconnect()
        except OSError as error:
            _LOGGER.warning("recorder %s: could not connect to the broker at %s:%d: %s", self._name,
                            self._host, self._port, error)
            return
        self._loop_until_disconnected()

    def _loop_until_disconnected(self) -> None:
        disconnect_sent = False
        rc = mqtt.MQTT_ERR_SUCCESS
        while rc == mqtt.MQTT_ERR_SUCCESS:
            self._network_beat = time.monotonic()
            if self._sender_done.is_set() and not disconnect_sent:
                self._client.disconnect()
                disconnect_sent = True
            rc = self._client.loop(timeout=0.2)

    # Sender thread ----------------------------------------------------------------------

    def _run_sender(self) -> None:
        # Entries handed to paho, by message id, in queue order.
        in_flight: dict[int, OutboxEntry] = {}
        while not self._stopping.is_set():
            self._sender_beat = time.monotonic()
            self._wake.wait(0.5)
            self._wake.clear()
            try:
                self._send_step(in_flight)
            except Exception:
                # Queued messages stay on disk, and the next step tries again.
                _LOGGER.exception("recorder %s: sending from the outbox failed; retrying", self._name)
                self._stopping.wait(1.0)
        try:
            self._collect_acknowledged(in_flight)
        except Exception:
            _LOGGER.exception("recorder %s: recording the last PUBACKs failed; those messages are sent again "
                              "after a restart", self._name)
        finally:
            self._sender_done.set()

    def _send_step(self, in_flight: dict[int, OutboxEntry]) -> None:
        self._collect_acknowledged(in_flight)
        self._apply_receipts(in_flight)
        if not self.connected.is_set():
            return
        if self._resend_pending and in_flight:
            return  # paho sends these again first, so newer entries wait to keep the order
        self._resend_pending = False
        self._probe_if_silent(in_flight)
        self._send_again(in_flight)
        self._hand_out(in_flight)

    def _collect_acknowledged(self, in_flight: dict[int, OutboxEntry]) -> None:
        """Handle the PUBACKs that arrived; PUBACKs of status and ack messages match no entry.

        Without receipts, or for a detections entry, the PUBACK deletes the
        entry. An embeddings entry otherwise becomes delivered and waits for
        its receipt, unless one already covered it.
        """
        removed: list[OutboxEntry] = []
        delivered = []
        while self._acknowledged_mids:
            entry = in_flight.pop(self._acknowledged_mids.popleft(), None)
            if entry is None:
                continue
            if not self._receipts or entry.windows == 0 or entry.id in self._confirmed_early:
                self._confirmed_early.discard(entry.id)
                removed.append(entry)
                continue
            self._puback_order += 1
            previous = self._delivered.get(entry.id)
            self._delivered[entry.id] = _Delivered(entry.first_sequence, self._puback_order,
                                                   previous.resends if previous is not None else 0, entry.windows)
            delivered.append(entry)
        self._outbox.remove([entry.id for entry in removed])
        if removed and self._on_delivered is not None:
            self._on_delivered(sum(entry.windows for entry in removed),
                               [entry for entry in removed if entry.windows == 0])
        if delivered:
            self._outbox.mark_delivered(delivered)
            if min(entry.id for entry in delivered) < max(self._delivered):
                self._delivered = dict(sorted(self._delivered.items()))

    def _apply_receipts(self, in_flight: dict[int, OutboxEntry]) -> None:
        """Delete the entries that receipts confirm, and queue again those that a receipt shows were lost."""
        for entry_id in self._outbox.released_ids():
            self._delivered.pop(entry_id, None)
        # Ids in the order found. Receipts are cumulative, so two of them often confirm the same entry.
        confirmed: dict[int, None] = {}
        while self._receipts_in:
            receipt = self._receipts_in.popleft()
            self.counters["receipts"] += 1
            confirmed.update((entry_id, None) for entry_id, waiting in self._delivered.items()
                             if receipt.covers(waiting.first_sequence))
            # The station can commit a message before the sender has seen the broker's PUBACK for it.
            self._confirmed_early.update(entry.id for entry in in_flight.values()
                                         if entry.windows and receipt.covers(entry.first_sequence))
        if not confirmed:
            return
        newest = max(self._delivered[entry_id].order for entry_id in confirmed)
        confirmed_windows = sum(self._delivered[entry_id].windows for entry_id in confirmed)
        for entry_id in confirmed:
            del self._delivered[entry_id]
        self._outbox.remove(list(confirmed))
        if self._on_delivered is not None:
            self._on_delivered(confirmed_windows, [])
        self.counters["confirmed"] += len(confirmed)
        self._last_confirmation = time.monotonic()
        # An entry sent again and still without its new PUBACK is not lost again.
        skip = set(self._resend) | {entry.id for entry in in_flight.values()}
        for entry_id, waiting in self._delivered.items():
            if waiting.order < newest and entry_id not in skip:
                self._resend.append(entry_id)
        self._resend.sort()

    def _probe_if_silent(self, in_flight: dict[int, OutboxEntry]) -> None:
        """Send the oldest delivered entry again when no receipt has confirmed anything for the timeout."""
        if not self._delivered or self._resend or len(in_flight) >= self._window:
            return
        now = time.monotonic()
        if min(now - self._last_confirmation, now - self._last_probe) < self._receipt_timeout_s:
            return
        self._last_probe = now
        oldest = next(iter(self._delivered))
        _LOGGER.info("recorder %s: no receipt from the base station for %.0f s while %d messages wait for one; "
                     "sending the oldest again as a probe", self._name, self._receipt_timeout_s, len(self._delivered))
        self.counters["probes"] += 1
        self._publish_again(oldest, in_flight, probe=True)

    def _send_again(self, in_flight: dict[int, OutboxEntry]) -> None:
        """Send again, oldest first, the delivered entries that a receipt showed were lost."""
        while self._resend and len(in_flight) < self._window:
            entry_id = self._resend.pop(0)
            waiting = self._delivered.get(entry_id)
            if waiting is None:
                continue  # confirmed or released meanwhile
            if waiting.resends >= MAX_RESENDS:
                self._give_up(entry_id, waiting)
                continue
            waiting.resends += 1
            self.counters["resent"] += 1
            self._publish_again(entry_id, in_flight)

    def _publish_again(self, entry_id: int, in_flight: dict[int, OutboxEntry], probe: bool = False) -> None:
        entry = self._outbox.get(entry_id)
        if entry is None:
            self._delivered.pop(entry_id, None)
            return
        if not probe:
            _LOGGER.warning("recorder %s: the base station confirmed later messages but not the one from sequence "
                            "%d, which the broker had acknowledged; sending it again", self._name,
                            entry.first_sequence)
        info = self._client.publish(entry.topic, entry.payload, qos=1)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            _LOGGER.error("recorder %s: publishing again to %s failed (%s); it stays queued", self._name,
                          entry.topic, mqtt.error_string(info.rc))
            return
        # Its PUBACK makes it delivered again, with a newer PUBACK position.
        in_flight[info.mid] = entry

    def _give_up(self, entry_id: int, waiting: _Delivered) -> None:
        entry = self._outbox.get(entry_id)
        del self._delivered[entry_id]
        if entry is None:
            return
        self._outbox.remove([entry_id])
        self.counters["unconfirmed"] += 1
        self.counters["unconfirmed_windows"] += entry.windows
        _LOGGER.error("recorder %s: the base station did not confirm the message from sequence %d (%d windows) "
                      "after %d resends, while it confirmed later ones; it probably rejects it (see its log). "
                      "The message was deleted", self._name, entry.first_sequence, entry.windows, waiting.resends)

    def _hand_out(self, in_flight: dict[int, OutboxEntry]) -> None:
        room = self._window - len(in_flight)
        if room <= 0:
            return
        for entry in self._outbox.take(room):
            info = self._client.publish(entry.topic, entry.payload, qos=1)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                # paho did not keep the message: it goes back to the queue, with everything after it.
                _LOGGER.error("recorder %s: publish to %s failed (%s); it stays queued", self._name, entry.topic,
                              mqtt.error_string(info.rc))
                self._outbox.rewind(entry.id)
                break
            # paho keeps a message published while the connection drops (MQTT_ERR_NO_CONN) and sends it
            # after the next CONNACK, so it is in flight either way.
            in_flight[info.mid] = entry
