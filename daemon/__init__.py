"""lora-daemon: the command line (`python -m daemon`) and, later, the trainer daemon itself."""
