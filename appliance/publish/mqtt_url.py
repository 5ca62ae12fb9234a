"""The MQTT broker address: mqtt[s]://[user[:pass]@]host[:port] parsed, and the credentials to log in with."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from appliance.config import ConfigError, MQTTConfig

PASSWORD_ENV = "CTRIAGE_MQTT_PASSWORD"


@dataclass(frozen=True)
class BrokerURL:
    host: str
    port: int
    tls: bool
    username: str = ""
    password: str = ""

    def redacted(self) -> str:
        user = f"{self.username}:***@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def parse_url(url: str) -> BrokerURL:
    """mqtt[s]://[user[:pass]@]host[:port] → BrokerURL (default port 1883, or 8883 with TLS)."""
    u = urlsplit(url)
    if u.scheme not in ("mqtt", "mqtts"):
        raise ConfigError(f"[mqtt] url: must start with mqtt:// or mqtts://, got {url!r}")
    try:
        port = u.port
    except ValueError:
        raise ConfigError(f"[mqtt] url: invalid port in {url!r}") from None
    if not u.hostname:
        raise ConfigError(f"[mqtt] url: no host in {url!r}")
    tls = u.scheme == "mqtts"
    return BrokerURL(u.hostname, port or (8883 if tls else 1883), tls, unquote(u.username or ""),
                     unquote(u.password or ""))


def credentials(cfg: MQTTConfig, url: BrokerURL) -> tuple[str, str]:
    """(username, password): the URL's, else config username and CTRIAGE_MQTT_PASSWORD or password_file."""
    user = url.username or cfg.username
    pw = url.password
    if not pw:
        pw = os.environ.get(PASSWORD_ENV, "")
    if not pw and cfg.password_file:
        pw = Path(cfg.password_file).expanduser().read_text().strip()
    return user, pw
