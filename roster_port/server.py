"""The stdio loop: the only place where the program touches its pipes.

ejabberd's shim writes request frames to our stdin and reads response frames from our stdout.
Before anything else, `serve()` moves the protocol channel to a private file descriptor and
points fd 1 at stderr, so a stray print() from any library can never corrupt a frame.

Requests are served in the order they arrive; all responses completed by one read are written
with one write, so a pipelined burst costs one system call each way. EOF on stdin: the requests
already read are answered, the store is closed, and the program exits 0.
"""

from __future__ import annotations

import logging
import os
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


def serve(config: Config, *, stdin_fd: int = 0) -> int:
    frames_fd = claim_stdout()
    # ejabberd stops its ports by closing the pipe; a TERM from an operator means the same.
    signal.signal(signal.SIGTERM, lambda *_: os.close(stdin_fd))
    store = open_store(config)
    log.info("serving rosters from %s (pid %d)", store.describe(), os.getpid())
    dispatcher = Dispatcher(store, Rules(config.roster, config.limits))
    decoder = FrameDecoder(config.limits.max_frame_bytes)
    try:
        while True:
            try:
                data = os.read(stdin_fd, READ_SIZE)
            except OSError:  # stdin closed by the TERM handler
                data = b""
            if not data:
                break
            responses = [dispatcher.handle(event) for event in decoder.feed(data)]
            out = b"".join(encode_frame(payload) for payload in responses if payload is not None)
            if out:
                write_all(frames_fd, out)
    except BrokenPipeError:
        log.warning("the shim closed our stdout; exiting")
    finally:
        if decoder.buffered:
            log.warning("EOF inside a frame: %d bytes of an incomplete frame dropped", decoder.buffered)
        store.close()
        log.info("stdin closed; store closed; exiting")
    return 0
