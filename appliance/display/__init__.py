"""The fever-clinic triage screen: a local web page fed by the appliances' MQTT verdicts (server.py, static/).

`DisplayServer(cfg).start()` runs it in this process (threads); `ctriage display` runs it on its own.
"""
from appliance.display.server import DisplayServer

__all__ = ["DisplayServer"]
