"""The stdio loop: the only place where the program touches its pipes, and its only threads.

ejabberd's shim writes request frames to our stdin and reads response frames from our stdout.
Before anything else, `serve()` moves the protocol channel to a private file descriptor and
points fd 1 at stderr, so a stray print() from any library can never corrupt a frame.

Two kinds of thread, each with one job:
- the main thread reads stdin, decodes frames (Dispatcher.accept), answers at once what needs
  no store (hello, ping, refusals), and hands every other request to the executor under its
  user's key. It never waits for the store, so a ping is answered whatever the workers are
  doing: an answered ping proves the program reads and writes. It also watches the change feed
  (a LISTEN socket, or a poll timer) and reads it; each user's `roster_changed` notification
  is then made by a worker in that user's order, like a request of the user.
- `[serve] threads` workers run requests (Dispatcher.run), each with a store of its own when
  the adapter's connections cannot be shared (SQLite), one user's requests one at a time in the
  order they arrived (executor.py), different users' side by side;
- whichever thread made a frame writes it, whole, under one lock (FrameWriter): nothing is
  held for a later write.

Bounds: at most `[serve] max_in_flight` requests held (queued or running), at most
`max_in_flight_per_user` of one user; beyond that a request is answered `overloaded` at once,
nothing queued. A request whose `timeout_ms` passed before a worker took it up is answered
`timeout`, never run. Subscription presences and notifications are never refused that way
(refusing them would lose what happened): they have a hard bound of their own (executor.py).

The store. A PostgreSQL database that cannot be reached at start is waited for (the store
tries in the background): hello and ping are answered as ever, requests `store_unavailable`
at once, and the program serves as soon as the database is reached and set up, without a
restart. A database that can be reached and does not fit (a mapping naming a missing table,
a wrong encoding) is no reason to wait: the program logs why and exits 1, at start or when
the store finds it out later. A change feed that reads again after a time it could not
(take_resumed) is followed by a `feed_resumed` notification.

Endings. EOF on stdin: the requests already read are run and answered, the store is closed,
and the program exits 0. SIGTERM only sets a flag (the loop ends between frames, never inside
a write): requests not yet started are dropped (the shim's deadline covers them), those running
are given STOP_GRACE_S to finish, and the program exits 0. No exception a frame or the feed can
cause leaves the loop.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import selectors
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable

from .config import Config
from .dispatcher import Answer, Dispatcher, Job
from .executor import PerKeyExecutor
from .framing import FrameDecoder, encode_frame
from .roster import Rules
from .store.base import ChangeFeed, OutsideChange, RosterStore, StoreError
from .store.factory import open_store

log = logging.getLogger(__name__)

READ_SIZE = 1 << 16
# How long a SIGTERM waits for the requests already running (their transactions commit or roll
# back) before the process exits.
STOP_GRACE_S = 2.0


class NoProtocolChannel(Exception):
    pass


def claim_stdout() -> int:
    """Keep fd 1 for frames only: return a private copy of it (fd 3 or above), and send fd 1
    to stderr.

    Whatever descriptors the process was started with: a closed fd 0 or 2 is opened on
    /dev/null first (or a copy would take its number, and stderr would then be the protocol
    pipe), and a stderr that *is* the protocol pipe (a port opened with stderr_to_stdout) is
    sent to /dev/null too, since every log line would corrupt a frame there.
    """
    sys.stdout.flush()
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            if fd == 1:
                raise NoProtocolChannel("stdout is closed: there is no channel to answer on")
            _point_at_devnull(fd)
    if _same_file(1, 2) and stat.S_ISFIFO(os.fstat(1).st_mode):
        log.error("stderr is the protocol pipe (stderr_to_stdout?); logs go to /dev/null "
                  "unless [log] file is set")
        _point_at_devnull(2)
    frames_fd = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3)
    os.dup2(2, 1)
    return frames_fd


def _point_at_devnull(fd: int) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    if null != fd:
        os.dup2(null, fd)
        os.close(null)


def _same_file(fd_a: int, fd_b: int) -> bool:
    a, b = os.fstat(fd_a), os.fstat(fd_b)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class FrameWriter:
    """Frames from any thread, each written whole by the thread that made it, one at a time.

    Written at once rather than handed to a thread of its own: a hand-over between threads
    costs more (tens of microseconds, the GIL's) than the write itself. A write that fails
    (the shim closed our stdout) is reported once through `on_broken`; later frames are
    dropped. A write blocks only while the shim's VM does not read its pipe.
    """

    def __init__(self, fd: int, on_broken: Callable[[], None]) -> None:
        self._fd = fd
        self._on_broken = on_broken
        self._lock = threading.Lock()
        self._broken = False

    def add(self, payload: bytes | None) -> None:
        if not payload:
            return
        frame = encode_frame(payload)
        with self._lock:
            if self._broken:
                return
            try:
                write_all(self._fd, frame)
            except OSError as exc:  # EPIPE: the shim is gone
                self._broken = True
                log.warning("writing to the shim failed (%s); exiting", exc)
                self._on_broken()


def _read_feed(feed: ChangeFeed, dispatcher: Dispatcher) -> list[OutsideChange]:
    try:
        return feed.read()
    except Exception:  # noqa: BLE001 - a feed's failure must not end the serving of requests
        log.exception("reading the change feed failed; trying again at the next wake-up")
        dispatcher.metrics.feed_error()
        return []


@dataclasses.dataclass(frozen=True)
class _Notify:
    """A job: the `roster_changed` notification of one user's outside changes."""

    user: str
    changes: list[OutsideChange]


class _ThreadStores:
    """The store each worker thread runs its requests on: the main one when its adapter's
    connections may be shared by threads (a pool), or one opened per thread."""

    def __init__(self, config: Config, main: RosterStore) -> None:
        self._config = config
        self._main = main
        self._local = threading.local()
        self._opened: list[RosterStore] = []
        self._lock = threading.Lock()

    def current(self) -> RosterStore:
        if self._main.threads_share:
            return self._main
        store = getattr(self._local, "store", None)
        if store is None:
            # StoreUnavailable: this request fails, not the thread. (Its origin, the node
            # that stamps its writes, is set by Dispatcher.run.)
            store = open_store(self._config)
            self._local.store = store
            with self._lock:
                self._opened.append(store)
        return store

    def close(self) -> None:
        with self._lock:
            opened, self._opened = self._opened, []
        for store in opened:
            try:
                store.close()
            except Exception:  # noqa: BLE001 - closing must not stop the exit
                log.exception("closing a worker's store failed")


def serve(config: Config, *, stdin_fd: int = 0) -> int:
    try:
        frames_fd = claim_stdout()
    except NoProtocolChannel as exc:
        log.error("%s; exiting", exc)
        return 1
    try:
        # A PostgreSQL database that cannot be reached yet is waited for: requests are
        # answered store_unavailable meanwhile, hello and ping as ever.
        store = open_store(config, wait_for_database=True)
    except StoreError as exc:
        # Reached, and it does not fit (a mapping naming a missing table...), or SQLite's file
        # cannot be opened: nothing to serve. A clear line, no traceback.
        log.error("cannot serve rosters: %s; exiting", exc)
        return 1
    serving = config.serve
    log.info("serving rosters from %s (pid %d, %d threads, at most %d requests in flight)",
             store.describe(), os.getpid(), serving.threads, serving.max_in_flight)
    dispatcher = Dispatcher(store, Rules(config.roster, config.limits))
    decoder = FrameDecoder(config.limits.max_frame_bytes)
    # Wakes the main thread out of select(): a failed write, or a signal (set_wakeup_fd).
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    broken = threading.Event()
    failures: list[StoreError] = []  # the store found it can never serve (set_failure_handler)

    def wake() -> None:
        try:
            os.write(wake_write, b"x")
        except OSError:  # full (already awake) or closed (exiting)
            pass

    def on_broken() -> None:
        broken.set()
        wake()

    def on_store_failure(exc: StoreError) -> None:
        failures.append(exc)
        wake()

    writer = FrameWriter(frames_fd, on_broken)
    stores = _ThreadStores(config, store)

    def run(job: Job | _Notify) -> None:
        try:
            job_store = stores.current()
        except Exception as exc:  # noqa: BLE001 - StoreUnavailable, mostly: answer it
            if isinstance(job, Job):
                writer.add(dispatcher.failed(job, exc))
            else:
                log.error("changes to %s made outside XMPP not pushed: %s", job.user, exc)
            return
        if isinstance(job, Job):
            writer.add(dispatcher.run(job, job_store, time.monotonic()))
        else:
            writer.add(dispatcher.notification(job.user, job.changes, job_store))

    executor = PerKeyExecutor(run, threads=serving.threads, max_in_flight=serving.max_in_flight,
                              max_per_key=serving.max_in_flight_per_user)

    def status() -> dict[str, int]:
        in_flight, running = executor.counts()
        return {"in_flight": in_flight, "running": running}

    dispatcher.status = status
    dispatcher.metrics.watch_held(lambda: executor.counts()[0])
    store.set_failure_handler(on_store_failure)
    # ejabberd stops its ports by closing the pipe; a TERM from an operator stops us too. The
    # handler only sets a flag: the loop ends between two frames, never inside a write.
    terminated = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: terminated.set())
    previous_wakeup_fd = signal.set_wakeup_fd(wake_write)
    selector = selectors.DefaultSelector()
    selector.register(stdin_fd, selectors.EVENT_READ, "stdin")
    selector.register(wake_read, selectors.EVENT_READ, "wake")
    feed_fd: int | None = None  # the feed's descriptor as registered (it changes on reconnect)
    eof = False
    try:
        while not (terminated.is_set() or broken.is_set() or failures):
            feed = dispatcher.feed
            if (fd := feed.fileno() if feed is not None else None) != feed_fd:
                if feed_fd is not None:
                    selector.unregister(feed_fd)
                if fd is not None:
                    selector.register(fd, selectors.EVENT_READ, "feed")
                feed_fd = fd
            polled = feed is not None and feed_fd is None
            ready = {key.data for key, _ in selector.select(feed.poll_interval if polled else None)}
            if "wake" in ready:
                os.read(wake_read, 512)
                continue  # the loop's condition says whether to stop
            if "stdin" in ready:
                data = os.read(stdin_fd, READ_SIZE)
                if not data:
                    eof = True
                    break
                now = time.monotonic()
                for event in decoder.feed(data):
                    accepted = dispatcher.accept(event, now)  # never raises
                    if isinstance(accepted, Answer):
                        writer.add(accepted.payload)
                    elif not executor.submit(accepted.user, accepted,
                                             must_run=accepted.operation.must_run):
                        writer.add(dispatcher.overloaded(accepted, _full_because(executor, serving)))
            if feed is not None and ("feed" in ready or polled):
                # Read here; each user's notification is made in that user's order, like a
                # request of the user (never with a state older than an answer before it).
                for user, changes in dispatcher.changes_by_user(_read_feed(feed, dispatcher)).items():
                    if not executor.submit(user, _Notify(user, changes), must_run=True):
                        log.error("changes to %s made outside XMPP not pushed: %d requests in "
                                  "flight", user, executor.counts()[0])
                if feed.take_resumed():
                    writer.add(dispatcher.feed_resumed())
    finally:
        if terminated.is_set():
            log.info("stopped by SIGTERM")
        for failure in failures[:1]:
            log.error("cannot serve rosters: %s; exiting", failure)
        if decoder.buffered:
            log.warning("EOF inside a frame: %d bytes of an incomplete frame dropped", decoder.buffered)
        if eof:
            executor.drain()
        dropped = executor.stop(timeout=None if eof else STOP_GRACE_S)
        if dropped:
            log.warning("%d requests not started when the program stopped; not answered", dropped)
        signal.set_wakeup_fd(previous_wakeup_fd)
        dispatcher.close()
        selector.close()
        still_running = executor.counts()[1]
        if still_running:
            # Their threads hold their stores: closing one would wait for its request. The
            # process exits anyway, and the database rolls back what they had not committed.
            log.warning("%d requests still running after %g s; exiting without them",
                        still_running, STOP_GRACE_S)
        else:
            stores.close()
            store.close()
            log.info("store closed; exiting")
    return 1 if failures else 0


def _full_because(executor: PerKeyExecutor, serving) -> str:
    in_flight, _ = executor.counts()
    if in_flight >= serving.max_in_flight:
        return f"{in_flight} requests in flight already ([serve] max_in_flight)"
    return (f"{serving.max_in_flight_per_user} requests of this user in flight already "
            "([serve] max_in_flight_per_user)")
