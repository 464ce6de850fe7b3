"""Stand-in for comfy.model_management: the interrupt flag and the calls that free VRAM."""

from __future__ import annotations

import threading

calls: list[str] = []  # test record: which VRAM calls the node made, in order


class InterruptProcessingException(Exception):
    pass


interrupt_processing_mutex = threading.RLock()
interrupt_processing = False


def interrupt_current_processing(value=True):
    """What ComfyUI's /interrupt route (the cancel button) calls."""
    global interrupt_processing
    with interrupt_processing_mutex:
        interrupt_processing = value


def processing_interrupted():
    with interrupt_processing_mutex:
        return interrupt_processing


def throw_exception_if_processing_interrupted():
    global interrupt_processing
    with interrupt_processing_mutex:
        if interrupt_processing:
            interrupt_processing = False  # the flag is consumed by the exception it raises
            raise InterruptProcessingException()


def unload_all_models():
    calls.append("unload_all_models")


def soft_empty_cache(force=False):
    calls.append("soft_empty_cache")
