"""A stand-in for `roster-port serve`, for the pool's EUnit tests only.

It speaks the protocol's framing and message shapes (4-byte length + one
msgpack value; [0, id, op, args] in, [1, id, error, result] and
[2, name, params] out) with real msgpack, and serves test ops:
  hello, ping          as protocol.md says (argv "--protocol N" changes the
                       protocol it claims; "--refuse" answers
                       unsupported_protocol); capabilities.notifications
                       is the hello's change_feed
  hello_args           result {"effects": [], "hello": the hello's args}
  out_subscription {"ms"}  a writing op: answers after ms (default 0)
                       milliseconds, in a thread
  echo                 result {"effects": [], "args": args}
  sleep {"ms"}         answers after ms milliseconds, in a thread, so later
                       requests overtake it
  die {"status"}       exits at once with that status
  hang                 stops answering anything (pings included)
  close_stdin          closes its stdin, then answers, and runs on reading
                       nothing: the shim's next write fails with epipe, as
                       when it writes to a program that has just died
  notify {"user"}      sends a roster_changed notification, then answers
  garbage {"bytes"}    writes these bytes (a msgpack bin) to stdout as they
                       are, as a stray print or a corrupt writer would, and
                       answers nothing
  dribble              answers like echo, one byte per write, so the answer
                       reaches the shim split across many reads
argv "--tag WORD" is ignored: a test finds its own programs by it in
/proc/*/cmdline.
"""
import os
import struct
import sys
import threading
import time

import msgpack

out_lock = threading.Lock()
hanging = threading.Event()
args = sys.argv[1:]
protocol = int(args[args.index("--protocol") + 1]) if "--protocol" in args else 1
refuse = "--refuse" in args
hello_args = {}


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


def serve(msgid, op, a):
    if op == "hello":
        if refuse:
            answer(msgid, error={"code": "unsupported_protocol",
                                 "message": "this program speaks protocol 99",
                                 "stanza_error": None})
        else:
            hello_args.update(a)
            answer(msgid, {"protocol": protocol, "program": "fake",
                           "capabilities": {"versioning": True,
                                            "notifications": bool(a.get("change_feed"))},
                           "effects": []})
    elif op == "hello_args":
        answer(msgid, {"effects": [], "hello": hello_args})
    elif op == "ping":
        answer(msgid, {"effects": []})
    elif op == "echo":
        answer(msgid, {"effects": [], "args": a, "pid": os.getpid()})
    elif op == "out_subscription":
        def written():
            time.sleep(a.get("ms", 0) / 1000)
            answer(msgid, {"effects": [], "route": True})
        threading.Thread(target=written, daemon=True).start()
    elif op == "sleep":
        def later():
            time.sleep(a["ms"] / 1000)
            answer(msgid, {"effects": [], "slept": a["ms"]})
        threading.Thread(target=later, daemon=True).start()
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
    elif op == "dribble":
        body = msgpack.packb([1, msgid, None, {"effects": [], "args": a}], use_bin_type=True)
        with out_lock:
            for byte in struct.pack(">I", len(body)) + body:
                sys.stdout.buffer.write(bytes([byte]))
                sys.stdout.buffer.flush()
    elif op == "notify":
        write([2, "roster_changed", {"user": a["user"], "effects": [{"type": "test"}]}])
        answer(msgid, {"effects": []})
    else:
        answer(msgid, error={"code": "unknown_op", "message": op, "stanza_error": None})


def main():
    stdin = sys.stdin.buffer
    while True:
        head = stdin.read(4)
        if len(head) < 4:
            return
        (size,) = struct.unpack(">I", head)
        message = msgpack.unpackb(stdin.read(size), raw=False)
        _, msgid, op, a = message
        serve(msgid, op, a)


if __name__ == "__main__":
    main()
