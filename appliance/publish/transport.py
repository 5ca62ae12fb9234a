"""Getting messages out: the small `Transport` interface the daemon, the outbox pump and the display use (MQTT
implements it in appliance.publish.mqtt; another transport implements the same few calls)."""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

log = logging.getLogger("ctriage.mqtt")

AckCallback = Callable[[str | None], None]  # None: acknowledged; else why the broker refused it
Handler = Callable[..., None]  # (topic, payload), or (topic, payload, retained) when subscribed with_retain
LinkListener = Callable[[bool, str | None], None]  # (connected, why not: "refused: …", "connection lost", …)


class Transport(ABC):
    """A way out for the appliance's messages (MQTT here; another transport implements the same few calls).

    `send` is asynchronous: `on_ack` is called (on any thread) once the far end has taken the message.
    `generation` changes whenever messages handed over earlier may have been lost (a new connection object), so
    the outbox pump knows to send its in-flight message again.
    """

    name = "transport"
    generation = 0
    _link_listeners: tuple[LinkListener, ...] = ()

    @property
    @abstractmethod
    def connected(self) -> bool: ...

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stop(self, offline_payload: bytes | None = None) -> None:
        """Leave cleanly; publish `offline_payload` as the final retained status first when given."""

    @abstractmethod
    def send(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, expiry: int | None = None,
             on_ack: AckCallback | None = None) -> None: ...

    @abstractmethod
    def subscribe(self, topic: str, handler: Handler, *, with_retain: bool = False) -> None:
        """Call `handler(topic, payload)` for each message matching `topic`; with_retain: also pass the message's
        retain flag (a retained message is old state, a live one news)."""

    @abstractmethod
    def set_status(self, payload: bytes) -> None:
        """The retained status message: sent now when connected, and again on every (re)connect."""

    def health(self) -> dict[str, Any]:
        return {"transport": self.name, "connected": self.connected}

    def add_link_listener(self, listener: LinkListener) -> None:
        """`listener(connected, why)` on every change of the link (on any thread); why is None when connected,
        else "refused: <reason>", "connection lost" or "broker unreachable"."""
        self._link_listeners = (*self._link_listeners, listener)

    def _link(self, connected: bool, why: str | None = None) -> None:
        for listener in self._link_listeners:
            try:
                listener(connected, why)
            except Exception:
                log.exception("link listener failed")
