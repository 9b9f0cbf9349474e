"""What hostile input costs a real `roster-port serve` process: peak memory (VmHWM), the time
to answer, and whether the process is still serving afterwards.

    .venv/bin/python bench/hostile_input.py                 # the program of this tree
    .venv/bin/python bench/hostile_input.py --tree OLD_DIR  # another checkout, same inputs

Each case runs in a fresh process on a fresh SQLite file with the default limits, after a
warm-up request; the figures are the growth of the peak RSS over the warm process and the
wall time from the first byte written to the last answer read. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from roster_port.client import ProgramProcess  # noqa: E402
from roster_port.framing import encode_frame  # noqa: E402
from roster_port.messages import encode_request  # noqa: E402

ALICE = "alice@example.com"


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def array16(items: bytes, count: int) -> bytes:
    return b"\xdc" + count.to_bytes(2, "big") + items


def request_with_pad(request_id: int, op: str, pad: bytes) -> bytes:
    return (b"\x94\x00" + msgpack.packb(request_id) + msgpack.packb(op) + b"\x82"
            + msgpack.packb("user") + msgpack.packb(ALICE) + msgpack.packb("pad") + pad)


def empty_arrays_2mib() -> list[bytes]:
    outer = array16(array16(b"\x90" * 1024, 1024) * 1024, 1024)  # 1 MiB
    return [request_with_pad(10, "ping", b"\x92" + outer * 2)]


def nested_500() -> list[bytes]:
    return [request_with_pad(10, "roster_get", b"\x91" * 500 + b"\x90"), bytes.fromhex("81910101")]


def status_7mib() -> list[bytes]:
    args = {"user": ALICE, "contact": "bob@example.com", "type": "subscribe",
            "status": "x" * (7 * 1024 * 1024)}
    return [encode_request(10, "in_subscription", args)]


def long_resources() -> list[bytes]:
    resource = "r" * (1024 * 1024)
    return [encode_request(10 + n, "jid_info", {"user": ALICE, "contact": f"c{n}@example.com/{resource}"})
            for n in range(6)]


def long_localpart() -> list[bytes]:
    return [encode_request(10, "jid_info", {"user": ALICE, "contact": "a" * (2 * 1024 * 1024) + "@example.com"})]


def nfkc_expansion() -> list[bytes]:
    # U+FDFA expands to 18 characters under NFKC.
    return [encode_request(10, "jid_info", {"user": ALICE, "contact": "\ufdfa" * 300_000 + "@example.com"})]


def groups_json_reads(database: str) -> list[bytes]:
    connection = sqlite3.connect(database)
    with connection:
        for index in range(100):
            groups = json.dumps([f"{index}-{n}-" + "g" * 500 for n in range(1000)])  # ~0.5 MB
            connection.execute("INSERT INTO roster_items (user, contact, groups) VALUES (?, ?, ?)",
                               (f"u{index}@example.com", "c@example.com", groups))
    connection.close()
    return [encode_request(10 + index, "roster_get", {"user": f"u{index}@example.com"}) for index in range(100)]


CASES = {
    "2 MiB frame of empty arrays": empty_arrays_2mib,
    "args 500 arrays deep, then a map keyed by an array": nested_500,
    "7 MiB subscription request text": status_7mib,
    "6 contacts with 1 MiB resources": long_resources,
    "2 MiB localpart": long_localpart,
    "localpart of 300,000 U+FDFA (NFKC x18)": nfkc_expansion,
    "100 rosters with 0.5 MB group lists": groups_json_reads,
}


def run_case(name: str, make, tree: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        config = Path(tmp) / "roster-port.toml"
        config.write_text('[store]\npath = "rosters.sqlite"\n[log]\nfile = "roster-port.log"\n')
        # `python -m roster_port` puts its working directory first on sys.path: start it in
        # the temporary directory, with the tree asked for on PYTHONPATH.
        env_path, cwd = os.environ.get("PYTHONPATH"), os.getcwd()
        os.environ["PYTHONPATH"] = str(tree)
        os.chdir(tmp)
        try:
            program = ProgramProcess(str(config), stderr=subprocess.DEVNULL)
        finally:
            os.chdir(cwd)
            if env_path is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = env_path
        with program:
            program.call("roster_get", {"user": ALICE})  # warm: the store is open and migrated
            frames = make(str(Path(tmp) / "rosters.sqlite")) if name.startswith("100") else make()
            base = peak_rss_kib(program.process.pid)
            started = time.monotonic()
            # A ping after them: requests are served in order, so its answer comes last.
            program.write(b"".join(encode_frame(frame) for frame in frames)
                          + encode_frame(encode_request(999, "ping", {})))
            try:
                while program.read_message(timeout=120)[1] != 999:
                    pass
            except (EOFError, TimeoutError) as exc:
                return {"case": name, "alive": False, "note": type(exc).__name__}
            seconds = time.monotonic() - started
            grown = peak_rss_kib(program.process.pid) - base
            return {"case": name, "alive": program.process.poll() is None,
                    "peak_mib": grown / 1024, "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the checkout whose roster_port to run (default: this one)")
    args = parser.parse_args()
    print(f"tree: {args.tree}")
    print("| input | peak RSS growth | time to answer | still serving |")
    print("|---|---|---|---|")
    for name, make in CASES.items():
        result = run_case(name, make, args.tree.resolve())
        if result["alive"]:
            print(f"| {name} | +{result['peak_mib']:.1f} MiB | {result['seconds']:.2f} s | yes |")
        else:
            print(f"| {name} | - | - | **no** ({result['note']}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
