"""A work queue of keys with a fixed pool of workers, like controller-runtime's.

* A key is queued at most once however often it is added (a burst of watch events
  costs one pass), and is never handed to two workers at once: a key added while a
  worker holds it is queued again when that worker is done with it.
* Keys added as `new` wait behind the other keys, but not forever: while both
  lanes hold keys, every NEW_KEY_EVERY-th key taken is a new one, so a steady
  stream of follow-ups (progress polls of thousands of running jobs) cannot keep a
  new job from ever starting.
* `add_after` queues a key later (a requeue time, a progress poll, a backoff); of
  several pending delays the earliest wins, and taking the key from the queue
  cancels its pending delay (the pass that follows sets the next one).
* The workers call one handler per key; what the handler raises is logged and
  otherwise ignored: retrying is the handler's business (it knows the backoff).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

# While follow-ups and new keys both wait, one take in this many goes to a new key.
NEW_KEY_EVERY = 4

log = logging.getLogger("lorajob_operator.workqueue")


class WorkQueue(Generic[K]):
    """Deduplicated, per-key serialized work with delayed re-adds (see the module)."""

    def __init__(self) -> None:
        # Two lanes: keys seen before (follow-ups) are taken before new keys.
        self._ready: deque[K] = deque()
        self._new: deque[K] = deque()
        self._items = asyncio.Semaphore(0)  # keys in the two lanes
        self._queued: set[K] = set()  # in a lane, not yet taken
        self._active: set[K] = set()  # held by a worker
        self._again: set[K] = set()  # added while held: queue once released
        self._timers: dict[K, tuple[float, asyncio.TimerHandle]] = {}
        self._workers: list[asyncio.Task[None]] = []
        self._ready_streak = 0  # follow-ups taken in a row while new keys waited

    def __len__(self) -> int:
        """Keys waiting to be worked on now (not the delayed ones)."""
        return len(self._queued)

    def add(self, key: K, *, new: bool = False) -> None:
        """Work on `key` as soon as a worker is free (once, however often added).

        `new`: a key never worked on; it waits until no follow-up of a known key is
        queued, so in a burst the known keys' passes (e.g. a status update) do not
        queue behind every new key's first pass.
        """
        if key in self._active:
            self._again.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            (self._new if new else self._ready).append(key)
            self._items.release()

    def add_after(self, key: K, delay: float) -> None:
        """Add `key` in `delay` seconds, unless it is already due sooner."""
        if delay <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        pending = self._timers.get(key)
        if pending is not None:
            if pending[0] <= when:
                return
            pending[1].cancel()
        self._timers[key] = (when, loop.call_at(when, self._fire, key))

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def forget(self, key: K) -> None:
        """Drop `key`'s pending delay and re-add (a queued key is still handed out once)."""
        pending = self._timers.pop(key, None)
        if pending is not None:
            pending[1].cancel()
        self._again.discard(key)

    def scheduled(self, key: K) -> float | None:
        """The loop time at which `key`'s pending delay ends, if it has one."""
        pending = self._timers.get(key)
        return pending[0] if pending else None

    async def get(self) -> K:
        """The next key; the caller holds it until `done(key)`."""
        await self._items.acquire()
        if self._ready and (not self._new or self._ready_streak < NEW_KEY_EVERY - 1):
            key = self._ready.popleft()
            self._ready_streak = self._ready_streak + 1 if self._new else 0
        else:
            key = self._new.popleft()
            self._ready_streak = 0
        self._queued.discard(key)
        self._active.add(key)
        pending = self._timers.pop(key, None)
        if pending is not None:
            pending[1].cancel()
        return key

    def done(self, key: K) -> None:
        """Release `key`; it is queued again if it was added meanwhile."""
        self._active.discard(key)
        if key in self._again:
            self._again.discard(key)
            self.add(key)

    # -- workers

    def start(self, handler: Callable[[K], Awaitable[None]], workers: int) -> None:
        """Run `workers` tasks that take keys and await `handler(key)` for each."""
        self._workers.extend(
            asyncio.create_task(self._work(handler), name=f"workqueue-{i}") for i in range(workers)
        )

    async def _work(self, handler: Callable[[K], Awaitable[None]]) -> None:
        while True:
            key = await self.get()
            try:
                await handler(key)
            except Exception:  # a bug in the handler must not stop the worker
                log.exception("work on %s failed", key)
            finally:
                self.done(key)

    async def stop(self) -> None:
        """Cancel the workers and every pending delay."""
        for _, timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
