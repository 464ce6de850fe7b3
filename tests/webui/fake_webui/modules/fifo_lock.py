"""As modules/fifo_lock.py: a lock that serves waiters in arrival order."""

import collections
import threading


class FIFOLock:
    def __init__(self):
        self._lock = threading.Lock()
        self._inner_lock = threading.Lock()
        self._pending_threads = collections.deque()
        self.owner = None  # stand-in only: lets the tests see who holds it

    def acquire(self, blocking=True):
        with self._inner_lock:
            lock_acquired = self._lock.acquire(False)
            if lock_acquired:
                self.owner = threading.get_ident()
                return True
            elif not blocking:
                return False
            release_event = threading.Event()
            self._pending_threads.append(release_event)
        release_event.wait()
        acquired = self._lock.acquire()
        self.owner = threading.get_ident()
        return acquired

    def release(self):
        with self._inner_lock:
            self.owner = None
            if self._pending_threads:
                release_event = self._pending_threads.popleft()
                release_event.set()
            self._lock.release()

    __enter__ = acquire

    def __exit__(self, t, v, tb):
        self.release()
