"""The fever-clinic triage screen: a local web page fed by the appliances' MQTT verdicts (server.py, static/).

`start_display(cfg)` runs it in this process; `spawn_display(...)` runs `ctriage display` as a subprocess.
"""
from appliance.display.server import DisplayProcess, DisplayServer, spawn_display, start_display

__all__ = ["DisplayProcess", "DisplayServer", "spawn_display", "start_display"]
