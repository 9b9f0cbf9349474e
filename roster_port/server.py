"""The stdio loop: the only place where the program touches its pipes.

ejabberd's shim writes request frames to our stdin and reads response frames from our stdout.
Before anything else, `serve()` moves the protocol channel to a private file descriptor and
points fd 1 at stderr, so a stray print() from any library can never corrupt a frame.

Requests are served in the order they arrive; all responses completed by one read are written
with one write, so a pipelined burst costs one system call each way. EOF on stdin: the requests
already read are answered, the store is closed, and the program exits 0.

When the shim's hello asks for it (`change_feed`), the loop also watches the store's change
feed (a LISTEN socket, or a poll timer) and writes `roster_changed` notifications between
responses, never inside one.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import sys

from .config import Config
from .dispatcher import Dispatcher
from .framing import FrameDecoder, encode_frame
from .roster import Rules
from .store.factory import open_store

log = logging.getLogger(__name__)

READ_SIZE = 1 << 16


def claim_stdout() -> int:
    """Keep fd 1 for frames only: return a private copy of it, and send fd 1 to stderr."""
    sys.stdout.flush()
    frames_fd = os.dup(1)
    os.dup2(2, 1)
    return frames_fd


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class Terminated(Exception):
    pass


def _terminate(signum: int, frame: object) -> None:
    raise Terminated(signal.Signals(signum).name)


def serve(config: Config, *, stdin_fd: int = 0) -> int:
    frames_fd = claim_stdout()
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
            out: list[bytes] = []
            if "stdin" in ready:
                data = os.read(stdin_fd, READ_SIZE)
                if not data:
                    break
                out += [payload for event in decoder.feed(data) if (payload := dispatcher.handle(event))]
            if feed is not None and ("feed" in ready or polled):
                out += dispatcher.notifications(feed.read())
            if out:
                write_all(frames_fd, b"".join(encode_frame(payload) for payload in out))
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
