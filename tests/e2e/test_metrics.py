"""roster-port's metrics end to end: a real ejabberd with mod_roster_port and its HTTP
listener for mod_roster_port_metrics, real programs, real slixmpp clients doing roster gets,
sets and a subscription, a program killed (its restart and exit status counted), a change made
outside XMPP (its feed lag measured), then a scrape over HTTP parsed with prometheus_client's
parser, and the ejabberdctl commands roster_port_metrics and roster_port_status."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import _missing, run
from ejabberd_harness import METRICS_PATH, EjabberdServer, _poll_until

pytestmark = pytest.mark.e2e

HOST = "localhost"


@pytest.fixture
def ejabberd(tmp_path: Path) -> Iterator[EjabberdServer]:
    """conftest's server, with the metrics listener (users and connect use this one)."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    server = EjabberdServer(tmp_path / "ejabberd", metrics_http=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def scrape(server: EjabberdServer) -> tuple[str, dict[tuple[str, tuple], float], str]:
    """GET the metrics: (content type, {(sample name, sorted labels): value}, the text)."""
    url = f"http://{server.ip}:{server.metrics_port}{METRICS_PATH}"
    with urllib.request.urlopen(url, timeout=10) as response:
        content_type = response.headers["Content-Type"]
        text = response.read().decode()
    return content_type, parse(text), text


def parse(text: str) -> dict[tuple[str, tuple], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"sample {key} twice"
            samples[key] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted({"host": HOST, **labels}.items()))), 0)


def summed(samples, name: str, **labels: str) -> float:
    """The sum over the host's programs of a program metric (labelled by worker)."""
    want = {"host": HOST, **labels}
    return sum(v for (n, ls), v in samples.items()
               if n == name and {k: x for k, x in ls if k != "worker"} == want
               and any(k == "worker" for k, _ in ls))


def ctl(server: EjabberdServer, *args: str) -> tuple[int, str]:
    """`ejabberdctl ARGS...` in the server (ejabberd_ctl:process/1, as the script calls it)."""
    argv = ", ".join(json.dumps(a) for a in args)
    out = server.rpc(f"Code = rpc:call(Node, ejabberd_ctl, process, [[{argv}]]), "
                     "io:format(\"~nctl-exit-code:~p~n\", [Code])")
    text, _, code = out.rpartition("ctl-exit-code:")
    return int(code.strip()), text.strip()


def test_a_scrape_counts_what_clients_and_a_killed_program_did(ejabberd, users, connect):
    alice_jid, bob_jid = users("alice", "bob")

    async def clients_work() -> None:
        alice = await connect(alice_jid)
        bob = await connect(bob_jid)
        await alice.roster_get()
        await alice.roster_set(bob_jid, name="Bob", groups=("Friends",))
        await alice.roster_get()
        alice.send_subscription(bob_jid, "subscribe")
        await bob.wait_for(lambda c: c.presences_from(alice_jid, "subscribe"), timeout=15)
        bob.send_subscription(alice_jid, "subscribed")
        await alice.wait_for(lambda c: any(p.item.subscription == "to"
                                           for p in c.pushes_for(bob_jid)), timeout=15)

    run(clients_work())
    # A program killed: SIGKILL, exit status 128 + 9 as the port reports it.
    offset = ejabberd.log_size()
    killed = ejabberd.program_pids()[0]
    os.kill(killed, signal.SIGKILL)
    ejabberd.wait_for_log("exited with status 137", offset=offset)
    ejabberd.wait_for_log("speaks protocol", offset=offset)
    # A change made outside XMPP, reported by the change feed: its lag is measured.
    ejabberd.store_execute_reported(
        "UPDATE roster_items SET name = 'Robert' WHERE user = ? AND contact = ?",
        (alice_jid, bob_jid))

    async def after_the_restart() -> None:
        alice = await connect(alice_jid, resource="again")
        result = await alice.roster_get()
        assert result.items[bob_jid].name == "Robert"

    run(after_the_restart())

    # Every program up and answering the scrape (the new one has just said hello).
    def all_served() -> bool:
        _, samples, _ = scrape(ejabberd)
        return all(value(samples, name, worker=str(w)) == 1 for w in (1, 2)
                   for name in ("roster_port_program_up", "roster_port_program_metrics_ok"))

    _poll_until(all_served, 15, lambda: f"not every program up and answering: "
                                        f"{scrape(ejabberd)[2]}")
    started = time.monotonic()
    content_type, samples, text = scrape(ejabberd)
    assert time.monotonic() - started < 5
    assert content_type.startswith("text/plain; version=0.0.4")

    # Requests per op, as ejabberd sent them: roster IQs (a set at least, and the first get:
    # the cache was empty), both sides of the subscription, roster_get for presences.
    assert value(samples, "roster_port_requests_total", op="roster_iq") >= 2
    assert value(samples, "roster_port_requests_total", op="out_subscription") >= 2
    assert value(samples, "roster_port_requests_total", op="in_subscription") >= 2
    for op in ("roster_iq", "out_subscription", "in_subscription"):
        # The histogram counts every request that ended, in some bucket.
        count = value(samples, "roster_port_request_duration_seconds_count", op=op)
        assert count == value(samples, "roster_port_requests_total", op=op)
        assert value(samples, "roster_port_request_duration_seconds_bucket", op=op, le="+Inf") == count
        assert value(samples, "roster_port_request_duration_seconds_sum", op=op) > 0
        assert value(samples, "roster_port_requests_in_flight", op=op) == 0
    # The program's side of the same requests (per worker: summed here over both programs;
    # the killed one's counts went with it, so at most the shim's).
    program_iq = summed(samples, "roster_port_program_requests_total", op="roster_iq")
    assert 1 <= program_iq <= value(samples, "roster_port_requests_total", op="roster_iq")
    assert summed(samples, "roster_port_program_request_duration_seconds_count",
                  op="roster_iq") == program_iq

    # The killed program: one exit, status 137, and three starts (two, then the restart).
    assert value(samples, "roster_port_program_exits_total", reason="exit_status") == 1
    assert value(samples, "roster_port_program_exit_status_total", status="137") == 1
    assert value(samples, "roster_port_program_starts_total") == 3

    # The read cache was asked (roster IQ gets, jid_info for presences).
    lookups = sum(value(samples, "roster_port_cache_lookups_total", kind=kind, result=result)
                  for kind in ("roster", "iq", "jid_info") for result in ("hit", "miss"))
    assert lookups >= 2
    # The outside change: notified, with its lag from the change log's entry.
    assert summed(samples, "roster_port_program_outside_changes_total") >= 1
    assert summed(samples, "roster_port_program_change_feed_lag_seconds_count") >= 1
    assert 0 <= summed(samples, "roster_port_program_change_feed_lag_seconds_sum") < 60
    # The journal: every subscription presence applied, none dropped.
    assert ("roster_port_journal_entries", (("host", HOST), ("state", "pending"))) in samples
    assert value(samples, "roster_port_journal_entries", state="pending") == 0
    assert value(samples, "roster_port_journal_dropped_total") == 0
    # No label names a user.
    assert "alice" not in text and "bob" not in text

    # ejabberdctl: the same text, and the same figures for a person.
    code, metrics_text = ctl(ejabberd, "roster_port_metrics")
    assert code == 0
    by_ctl = parse(metrics_text)
    assert {name for name, _ in by_ctl} == {name for name, _ in samples}
    assert by_ctl[("roster_port_program_exit_status_total",
                   (("host", HOST), ("status", "137")))] == 1
    code, status = ctl(ejabberd, "roster_port_status")
    assert code == 0
    assert f"host {HOST}" in status
    assert "status 137: 1" in status
    assert "program 1: up" in status and "program 2: up" in status
    assert "roster_iq" in status and "journal: 0 pending" in status


def test_only_get_and_head_are_served(ejabberd):
    url = f"http://{ejabberd.ip}:{ejabberd.metrics_port}{METRICS_PATH}"
    request = urllib.request.Request(url, data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 405
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(url + "/deeper", timeout=10)
    assert missing.value.code == 404
