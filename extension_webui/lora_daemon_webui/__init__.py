"""The lora-daemon WebUI tab's parts. Only the standard library, PIL, PyYAML and `websockets` are used
here (all present in an AUTOMATIC1111 or Forge install), never torch: training runs in the daemon."""
