"""The outbox pump: drains the store's durable outbox through a transport, in order, one acknowledged message at a
time (at least once: the transport re-sends after a reconnect, the outbox after a restart)."""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from appliance.publish.transport import Transport

log = logging.getLogger("ctriage.mqtt")


class OutboxPump:
    """Drains the store's outbox through a transport: oldest first, one message in flight, deleted only when
    acknowledged. Survives disconnects (the transport re-sends) and restarts (the outbox is durable)."""

    def __init__(self, store: Any, transport: Transport, retry_seconds: float = 30.0) -> None:
        self.store, self.transport, self.retry_seconds = store, transport, retry_seconds
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._inflight: int | None = None
        self._sent_at = 0.0
        self._generation = -1
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.delivered = 0
        self.dropped = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)

    def kick(self) -> None:
        self._wake.set()

    def drain(self, timeout: float) -> bool:
        """Wait until the outbox is empty (True) or timeout / no connection (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.store.outbox_count() == 0:
                return True
            if not self.transport.connected:
                return False
            self._wake.set()
            time.sleep(0.05)
        return self.store.outbox_count() == 0

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception:
                log.exception("outbox: send failed; retrying")
                time.sleep(1.0)
            self._wake.wait(0.5)
            self._wake.clear()

    def _step(self) -> None:
        while not self._stop.is_set() and self.transport.connected:
            with self._lock:
                inflight = self._inflight
            if inflight is not None:
                stale = self.transport.generation != self._generation
                if not stale and time.monotonic() - self._sent_at < self.retry_seconds:
                    return  # waiting for the acknowledgement
                msg = self.store.outbox_next(inflight - 1)
                if msg is None or msg.id != inflight:
                    with self._lock:
                        self._inflight = None
                    continue
            else:
                msg = self.store.outbox_next()
                if msg is None:
                    return
            with self._lock:
                self._inflight = msg.id
            self._sent_at = time.monotonic()
            self._generation = self.transport.generation
            self.store.outbox_attempt(msg.id)
            self.transport.send(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain, expiry=msg.expiry,
                                on_ack=lambda refused, mid=msg.id: self._acked(mid, refused))
            return

    def _acked(self, msg_id: int, refused: str | None) -> None:
        if refused:
            log.error("outbox: message %d refused (%s); dropped so later messages are not held up", msg_id, refused)
            self.dropped += 1
        else:
            self.delivered += 1
        self.store.outbox_done(msg_id)
        with self._lock:
            if self._inflight == msg_id:
                self._inflight = None
        self._wake.set()
