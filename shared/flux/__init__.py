"""Flux.1 (dev and schnell): the files users have, the pieces a Flux training task calls, memory levers."""
