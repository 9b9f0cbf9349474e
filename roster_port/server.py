"""The stdio loop: the only place where the program touches its pipes.

ejabberd's shim writes request frames to our stdin and reads response frames from our stdout.
Before anything else, `serve()` moves the protocol channel to a private file descriptor and
points fd 1 at stderr, so a stray print() from any library can never corrupt a frame.

Requests are served in the order they arrive; the responses one read completes are written
with one write (or one per FLUSH_BYTES of them), so a pipelined burst costs one system call each
way. No exception a frame or the feed can cause leaves the loop, and answers already made are
written whatever ends it. EOF on stdin: the requests
already read are answered, the store is closed, and the program exits 0.

When the shim's hello asks for it (`change_feed`), the loop also watches the store's change
feed (a LISTEN socket, or a poll timer) and writes `roster_changed` notifications between
responses, never inside one.
"""

from __future__ import annotations

import fcntl
import logging
import os
import selectors
import signal
import stat
import sys

from .config import Config
from .dispatcher import Dispatcher
from .framing import FrameDecoder, encode_frame
from .roster import Rules
from .store.base import ChangeFeed, OutsideChange
from .store.factory import open_store

log = logging.getLogger(__name__)

READ_SIZE = 1 << 16
# Responses are written together, one write for all those one read completes, unless they
# reach this size first: what is held for writing stays bounded whatever one read asks for.
FLUSH_BYTES = 1 << 18


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


class _Responses:
    """Responses to write: all those one read completes in one write, unless they reach
    FLUSH_BYTES first (64 KiB of requests may ask for gigabytes of answers)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._frames: list[bytes] = []
        self._size = 0

    def add(self, payload: bytes | None) -> None:
        if payload:
            self._frames.append(encode_frame(payload))
            self._size += len(payload)
            if self._size >= FLUSH_BYTES:
                self.flush()

    def flush(self) -> None:
        if self._frames:
            frames, self._frames, self._size = self._frames, [], 0
            write_all(self._fd, b"".join(frames))


def _read_feed(feed: ChangeFeed) -> list[OutsideChange]:
    try:
        return feed.read()
    except Exception:  # noqa: BLE001 - a feed's failure must not end the serving of requests
        log.exception("reading the change feed failed; trying again at the next wake-up")
        return []


class Terminated(BaseException):
    """Raised by the SIGTERM handler wherever the loop is. A BaseException, so that no
    handler that contains a request's or a frame's failure can swallow it."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated(signal.Signals(signum).name)


def serve(config: Config, *, stdin_fd: int = 0) -> int:
    try:
        frames_fd = claim_stdout()
    except NoProtocolChannel as exc:
        log.error("%s; exiting", exc)
        return 1
    # ejabberd stops its ports by closing the pipe; a TERM from an operator stops us too (an
    # open transaction rolls back; the shim's deadline covers the request it was serving).
    signal.signal(signal.SIGTERM, _terminate)
    store = open_store(config)
    log.info("serving rosters from %s (pid %d)", store.describe(), os.getpid())
    dispatcher = Dispatcher(store, Rules(config.roster, config.limits))
    decoder = FrameDecoder(config.limits.max_frame_bytes)
    selector = selectors.DefaultSelector()
    selector.register(stdin_fd, selectors.EVENT_READ, "stdin")
    feed_fd: int | None = None  # the feed's descriptor as registered (it changes on reconnect)
    try:
        while True:
            feed = dispatcher.feed
            if (fd := feed.fileno() if feed is not None else None) != feed_fd:
                if feed_fd is not None:
                    selector.unregister(feed_fd)
                if fd is not None:
                    selector.register(fd, selectors.EVENT_READ, "feed")
                feed_fd = fd
            polled = feed is not None and feed_fd is None
            ready = {key.data for key, _ in selector.select(feed.poll_interval if polled else None)}
            out = _Responses(frames_fd)
            try:
                if "stdin" in ready:
                    data = os.read(stdin_fd, READ_SIZE)
                    if not data:
                        break
                    for event in decoder.feed(data):
                        out.add(dispatcher.handle(event))  # never raises
                if feed is not None and ("feed" in ready or polled):
                    for payload in dispatcher.notifications(_read_feed(feed)):
                        out.add(payload)
            finally:
                # Answers already made are written even when a signal ends the loop here:
                # their writes are committed, and the shim is waiting for them.
                out.flush()
    except BrokenPipeError:
        log.warning("the shim closed our stdout; exiting")
    except Terminated as exc:
        log.info("stopped by %s", exc)
    finally:
        if decoder.buffered:
            log.warning("EOF inside a frame: %d bytes of an incomplete frame dropped", decoder.buffered)
        dispatcher.close()
        selector.close()
        store.close()
        log.info("store closed; exiting")
    return 0
