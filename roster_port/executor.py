"""Per-user ordered execution on a fixed set of threads: the program's only concurrency.

Invariants:
- Jobs submitted with the same key run one at a time, in the order they were submitted; a
  job's completion callback returns before the next job of its key starts, so whatever the
  callback emits (a response frame) is emitted in submission order too.
- Jobs of different keys run concurrently, up to the number of threads; no key waits for
  another key's job, except for a free thread.
- Admission is bounded: at most `max_in_flight` jobs (queued and running) in all, and at most
  `max_per_key` of one key. `submit()` refuses beyond either bound at once, never blocks and
  never queues without bound: the caller answers the request itself (back-pressure), so one
  user flooding the program cannot crowd out the others. (A job that must run, since refusing
  it would lose what happened, has a hard bound of its own: MUST_RUN_FACTOR x max_in_flight.)
- Keys with work wait in one FIFO for a thread; a key whose job ends goes to the back of it
  if it has more work, so a busy key never starves the others.
- The thread that went idle last is woken first: when requests come one at a time, one thread
  serves them all, and its store connection keeps its caches warm (a SQLite connection drops
  its page cache when another connection has written).

What it must never do: know what a job is (it calls `run(job)` and nothing else), or let an
exception from `run` kill a thread (it is logged; `run` is expected to contain its own).
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Hashable
from typing import Any

log = logging.getLogger(__name__)

MUST_RUN_FACTOR = 4


class PerKeyExecutor:
    def __init__(self, run: Callable[[Any], None], *, threads: int, max_in_flight: int,
                 max_per_key: int, name: str = "worker") -> None:
        if threads < 1 or max_in_flight < 1 or max_per_key < 1:
            raise ValueError("threads, max_in_flight and max_per_key must be positive")
        self._run = run
        self._max_in_flight = max_in_flight
        self._max_per_key = max_per_key
        self._lock = threading.Lock()
        self._idle_threads: list[threading.Condition] = []  # waiting for work, last idle last
        self._idle = threading.Condition(self._lock)
        self._queues: dict[Hashable, collections.deque] = {}  # keys with jobs queued or running
        self._ready: collections.deque[Hashable] = collections.deque()  # keys waiting for a thread
        self._in_flight = 0
        self._running = 0
        self._stopping = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{index}", daemon=True)
                         for index in range(1, threads + 1)]
        for thread in self._threads:
            thread.start()

    def submit(self, key: Hashable, job: Any, *, must_run: bool = False) -> bool:
        """Queue `job` behind the earlier jobs of `key`; False (nothing queued) when full.

        A job that `must_run` (refusing it would lose something that happened) is admitted
        beyond both bounds, up to a hard bound of MUST_RUN_FACTOR times `max_in_flight`.
        """
        with self._lock:
            limit = self._max_in_flight * (MUST_RUN_FACTOR if must_run else 1)
            if self._stopping or self._in_flight >= limit:
                return False
            queue = self._queues.get(key)
            if queue is None:
                self._queues[key] = collections.deque((job,))
                self._ready.append(key)
                self._wake_one()
            elif len(queue) >= self._max_per_key and not must_run:
                return False
            else:
                queue.append(job)  # the key is ready or running already
            self._in_flight += 1
            return True

    def counts(self) -> tuple[int, int]:
        """(jobs in flight, jobs running): for pings and logs."""
        with self._lock:
            return self._in_flight, self._running

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every job submitted has run; False if `timeout` passed first."""
        with self._lock:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def stop(self, timeout: float | None = None) -> int:
        """Refuse new jobs, drop the queued ones that have not started, wait up to `timeout`
        for the running ones, and end the threads. Returns how many queued jobs were dropped."""
        with self._lock:
            self._stopping = True
            dropped = 0
            for key, queue in self._queues.items():
                # A running key's first job is the one running: keep it.
                keep = 1 if key not in self._ready else 0
                while len(queue) > keep:
                    queue.pop()
                    dropped += 1
            self._in_flight -= dropped
            self._ready.clear()
            while self._idle_threads:
                self._wake_one()
            self._idle.wait_for(lambda: self._running == 0, timeout)
        for thread in self._threads:
            thread.join(timeout=0 if timeout is not None else None)
        return dropped

    def _wake_one(self) -> None:
        """Wake the thread that went idle last (the lock is held)."""
        if self._idle_threads:
            self._idle_threads.pop().notify()

    def _work(self) -> None:
        woken = threading.Condition(self._lock)
        while True:
            with self._lock:
                while not self._ready:
                    if self._stopping:
                        return
                    if woken not in self._idle_threads:
                        self._idle_threads.append(woken)
                    woken.wait()
                key = self._ready.popleft()
                job = self._queues[key][0]
                self._running += 1
            try:
                self._run(job)
            except Exception:  # noqa: BLE001 - a thread must outlive any job
                log.exception("a job of %r failed", key)
            with self._lock:
                self._running -= 1
                self._in_flight -= 1
                queue = self._queues[key]
                queue.popleft()
                if queue and not self._stopping:
                    self._ready.append(key)
                else:
                    del self._queues[key]
                if self._in_flight == 0 or self._running == 0:
                    self._idle.notify_all()
