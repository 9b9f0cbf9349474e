"""Records tests/transcripts/<scenario>.msgpack from the scenarios of tests/e2e/scenarios.py.

Each scenario runs against a fresh ejabberd 23.01 with mod_roster_port and the real program on
an empty SQLite store, with the shim's transcript on; the server is then stopped (so the file is
complete) and its transcript copied to tests/transcripts/, with a `.jsonl` beside it for people
(`roster-port replay --json`). The scenario's own assertions run while recording, so a
transcript is only written for a behaviour that was checked. Every recorded transcript is
replayed at once against a fresh store; one that does not replay cleanly is reported and the
script exits non-zero (tests/test_transcripts.py would fail on it).

    .venv/bin/python tests/e2e/record_transcripts.py              # every scenario
    .venv/bin/python tests/e2e/record_transcripts.py remove_user  # some
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from ejabberd_harness import REPO, EjabberdServer, roster_port_command  # noqa: E402
from scenarios import SCENARIOS, World  # noqa: E402

# The same comparison as tests/test_transcripts.py makes of the committed files.
from roster_port.replay import replay  # noqa: E402

TRANSCRIPTS = REPO / "tests" / "transcripts"


def record(name: str, out_dir: Path = TRANSCRIPTS) -> Path:
    with tempfile.TemporaryDirectory(prefix=f"record-{name}-") as tmp:
        server = EjabberdServer(Path(tmp) / "ejabberd", transcript=True)
        server.start()
        try:
            async def run() -> None:
                world = World(server)
                try:
                    await SCENARIOS[name](world)
                finally:
                    await world.close()
                    # Let the server finish what the last logouts started (unavailable
                    # broadcasts, jid_info look-ups) so the transcript ends at rest.
                    await asyncio.sleep(0.5)

            asyncio.run(run())
        finally:
            server.stop()
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / f"{name}.msgpack"
        shutil.copyfile(server.transcript_path, target)
    dump = subprocess.run([str(roster_port_command()), "replay", "--json", str(target)],
                          capture_output=True, text=True, check=True)
    target.with_suffix(".jsonl").write_text(dump.stdout)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="*", help=f"default: all of {sorted(SCENARIOS)}")
    args = parser.parse_args(argv)
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}")
    failed = 0
    for name in args.scenarios or sorted(SCENARIOS):
        path = record(name)
        count, differences = replay(path)
        print(f"{path.relative_to(REPO)}: {count} requests, {len(differences)} differences")
        for difference in differences:
            print(difference.describe())
        failed += bool(differences) or count == 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
