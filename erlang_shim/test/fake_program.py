"""A stand-in for `roster-port serve`, for the pool's EUnit tests only.

It speaks the protocol's framing and message shapes (4-byte length + one
msgpack value; [0, id, op, args] in, [1, id, error, result] and
[2, name, params] out) with real msgpack, and protocol 2's concurrency:
requests of one user run one at a time, in order, in that user's thread;
different users' run at the same time. A request whose args lack an integer
"timeout_ms" is answered bad_request; one whose deadline (read time +
timeout_ms) has passed when its turn comes is answered "timeout"; one that
arrives while --max-in-flight N (default 1000) requests are in flight is
answered "overloaded".

Answered at once by the reading loop:
  hello, ping          as protocol.md says (argv "--protocol N" changes the
                       protocol it claims; "--refuse" answers
                       unsupported_protocol); capabilities.notifications
                       is the hello's change_feed; ping's result has
                       in_flight and running; "--hello-delay MS" answers
                       the hello MS ms after reading it (a slow start),
                       "--hello-gate PATH" only once the file PATH exists
                       (a start that lasts until the test says),
                       "--hello-ticket PATH" only once it has taken (deleted)
                       the file PATH, so that each file the test writes lets
                       one program through, "--exit-at-hello" exits with
                       status 1 instead (a program that never comes up)
  hello_args           result {"effects": [], "hello": the hello's args}
  seen                 result {"effects": [], "seen": [[op, timeout_ms]] of
                       every request read so far}
  order                result {"effects": [], "order": [[op, args' "n"]] of
                       every request read so far}
  die {"status"}       exits at once with that status
  hang                 stops answering anything (pings included)
  close_stdin          closes its stdin, then answers, and reads nothing
                       more: the shim's next write fails with epipe, as
                       when it writes to a program that has just died
  garbage {"bytes"}    writes these bytes (a msgpack bin) to stdout as they
                       are, as a stray print or a corrupt writer would, and
                       answers nothing
Run in the user's thread:
  echo                 result {"effects": [], "args": args, "pid": os pid}
  sleep {"ms"}         answers {"slept": ms} after ms milliseconds (a slow
                       database call: the user's next requests wait)
  out_subscription {"ms"}  a writing op: answers after ms (default 0)
  jid_info {"ms"}      a reading op: answers after ms (default 0), with
                       "pid" (the os pid) besides jid_info's result
  notify               sends a roster_changed notification, then answers
  dribble              answers like echo, one byte per write, so the answer
                       reaches the shim split across many reads
Any of these whose args have "hold" (a path) waits, once its turn has come,
for as long as that file exists (at most 30 s), then runs: a request that
lasts until the test says, and holds its user's next requests meanwhile.
argv "--tag WORD" is ignored: a test finds its own programs by it in
/proc/*/cmdline.
"""
import os
import queue
import struct
import sys
import threading
import time

import msgpack

out_lock = threading.Lock()
count_lock = threading.Lock()
hanging = threading.Event()
args = sys.argv[1:]
protocol = int(args[args.index("--protocol") + 1]) if "--protocol" in args else 2
max_in_flight = int(args[args.index("--max-in-flight") + 1]) if "--max-in-flight" in args else 1000
refuse = "--refuse" in args
hello_delay = int(args[args.index("--hello-delay") + 1]) if "--hello-delay" in args else 0
exit_at_hello = "--exit-at-hello" in args
hello_gate = args[args.index("--hello-gate") + 1] if "--hello-gate" in args else None
hello_ticket = args[args.index("--hello-ticket") + 1] if "--hello-ticket" in args else None
hello_args = {}
seen = []
order = []
counts = {"in_flight": 0, "running": 0}
users = {}


def write(message):
    body = msgpack.packb(message, use_bin_type=True)
    with out_lock:
        try:
            sys.stdout.buffer.write(struct.pack(">I", len(body)) + body)
            sys.stdout.buffer.flush()
        except BrokenPipeError:
            # The shim closed the port (it is stopping this program): no
            # traceback in the test output.
            os._exit(0)


def answer(msgid, result=None, error=None):
    if not hanging.is_set():
        write([1, msgid, error, result])


def error(code, message=""):
    return {"code": code, "message": message, "stanza_error": None}


def count(key, n):
    with count_lock:
        counts[key] += n


def serve_inline(msgid, op, a):
    """The reading loop's own ops; False when op is not one of them."""
    if op == "hello":
        time.sleep(hello_delay / 1000)
        gate_until = time.monotonic() + 10  # never left behind by a test that failed
        while hello_gate and not os.path.exists(hello_gate):
            if time.monotonic() > gate_until:
                os._exit(1)
            time.sleep(0.005)
        if hello_ticket:
            take_ticket(hello_ticket)
        if exit_at_hello:
            os._exit(1)
        if refuse:
            answer(msgid, error=error("unsupported_protocol", "this program speaks protocol 99"))
        else:
            hello_args.update(a)
            answer(msgid, {"protocol": protocol, "program": "fake",
                           "capabilities": {"versioning": True,
                                            "notifications": bool(a.get("change_feed"))},
                           "effects": []})
    elif op == "ping":
        with count_lock:
            answer(msgid, {"effects": [], **counts})
    elif op == "hello_args":
        answer(msgid, {"effects": [], "hello": hello_args})
    elif op == "seen":
        answer(msgid, {"effects": [], "seen": seen})
    elif op == "order":
        answer(msgid, {"effects": [], "order": order})
    elif op == "die":
        sys.stdout.buffer.flush()
        os._exit(a.get("status", 3))
    elif op == "hang":
        hanging.set()
    elif op == "close_stdin":
        os.close(0)
        answer(msgid, {"effects": []})
        threading.Event().wait()
    elif op == "garbage":
        with out_lock:
            sys.stdout.buffer.write(a["bytes"])
            sys.stdout.buffer.flush()
    else:
        return False
    return True


def take_ticket(path):
    until = time.monotonic() + 10  # never left behind by a test that failed
    while True:
        try:
            os.remove(path)  # one program only takes a given file
            return
        except FileNotFoundError:
            if time.monotonic() > until:
                os._exit(1)
            time.sleep(0.005)


def hold(a):
    path = a.get("hold")
    until = time.monotonic() + 30  # never left behind by a test that failed
    while path and os.path.exists(path) and time.monotonic() < until:
        time.sleep(0.005)


def serve_queued(msgid, op, a):
    if op == "echo":
        answer(msgid, {"effects": [], "args": a, "pid": os.getpid()})
    elif op == "sleep":
        time.sleep(a["ms"] / 1000)
        answer(msgid, {"effects": [], "slept": a["ms"]})
    elif op == "out_subscription":
        time.sleep(a.get("ms", 0) / 1000)
        answer(msgid, {"effects": [], "route": True})
    elif op == "jid_info":
        time.sleep(a.get("ms", 0) / 1000)
        answer(msgid, {"effects": [], "subscription": "none", "ask": "none", "groups": [],
                       "pid": os.getpid()})
    elif op == "notify":
        write([2, "roster_changed", {"user": a["user"], "effects": [{"type": "test"}]}])
        answer(msgid, {"effects": []})
    elif op == "dribble":
        body = msgpack.packb([1, msgid, None, {"effects": [], "args": a}], use_bin_type=True)
        with out_lock:
            for byte in struct.pack(">I", len(body)) + body:
                sys.stdout.buffer.write(bytes([byte]))
                sys.stdout.buffer.flush()
    else:
        answer(msgid, error=error("unknown_op", op))


def user_loop(requests):
    while True:
        msgid, op, a, deadline = requests.get()
        try:
            if time.monotonic() > deadline:
                answer(msgid, error=error("timeout", "deadline passed before its turn"))
            else:
                count("running", 1)
                try:
                    hold(a)
                    serve_queued(msgid, op, a)
                finally:
                    count("running", -1)
        finally:
            count("in_flight", -1)


def dispatch(msgid, op, a, deadline):
    with count_lock:
        full = counts["in_flight"] >= max_in_flight
        if not full:
            counts["in_flight"] += 1
    if full:
        answer(msgid, error=error("overloaded", "%d requests in flight" % max_in_flight))
        return
    user = a.get("user")
    if user not in users:
        users[user] = queue.Queue()
        threading.Thread(target=user_loop, args=(users[user],), daemon=True).start()
    users[user].put((msgid, op, a, deadline))


def main():
    stdin = sys.stdin.buffer
    while True:
        head = stdin.read(4)
        if len(head) < 4:
            return
        (size,) = struct.unpack(">I", head)
        message = msgpack.unpackb(stdin.read(size), raw=False)
        read_at = time.monotonic()
        _, msgid, op, a = message
        timeout_ms = a.get("timeout_ms")
        seen.append([op, timeout_ms])
        order.append([op, a.get("n")])
        if not isinstance(timeout_ms, int) or isinstance(timeout_ms, bool) or timeout_ms < 0:
            answer(msgid, error=error("bad_request", "timeout_ms: %r" % (timeout_ms,)))
        elif not serve_inline(msgid, op, a):
            dispatch(msgid, op, a, read_at + timeout_ms / 1000)


if __name__ == "__main__":
    main()
