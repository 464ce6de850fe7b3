"""As modules/call_queue.py: the lock every generation holds."""

import threading

from modules import fifo_lock

queue_lock = fifo_lock.FIFOLock()


def held_by_me() -> bool:  # stand-in only
    return queue_lock.owner == threading.get_ident()
