"""Append what the extension asked of the WebUI to $FAKE_WEBUI_LOG (JSON lines) for the tests to read."""

import json
import os
import threading
import time


def record(call, **data):
    path = os.environ.get("FAKE_WEBUI_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"call": call, "time": time.time(), "thread": threading.current_thread().name,
                                 **data}) + "\n")
