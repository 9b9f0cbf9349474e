#!/usr/bin/env escript
%%! -pa erlang_shim/ebin
%%% What counting costs a caller of roster_port_call (the hot path):
%%% roster_port_metrics:request_started/2 + request_done/2 for one request,
%%% and cache_lookup/3 for one cache lookup, against an empty loop, in one
%%% process and in as many processes as schedulers at once (the counters
%%% are write_concurrency: processes on different schedulers do not contend).
%%%   make -C erlang_shim && bench/metrics_bench.escript [ITERATIONS]
-mode(compile).

main(Args) ->
    N = case Args of [A] -> list_to_integer(A); [] -> 1000000 end,
    Host = <<"bench.example">>,
    ok = roster_port_metrics:start(Host),
    Ok = {ok, #{}},
    Empty = fun() -> ok end,
    Request = fun() ->
                      T = roster_port_metrics:request_started(Host, <<"jid_info">>),
                      roster_port_metrics:request_done(T, Ok)
              end,
    Lookup = fun() -> roster_port_metrics:cache_lookup(Host, jid_info, Ok) end,
    Schedulers = erlang:system_info(schedulers_online),
    io:format("~B iterations; ~B schedulers~n", [N, Schedulers]),
    Base1 = per_op(Empty, N, 1),
    BaseP = per_op(Empty, N, Schedulers),
    [io:format("~-32s ~7.3f us per call alone, ~7.3f us with ~B processes at once~n",
               [Name, per_op(Fun, N, 1) - Base1, per_op(Fun, N, Schedulers) - BaseP,
                Schedulers])
     || {Name, Fun} <- [{"request_started + request_done", Request},
                        {"cache_lookup", Lookup}]],
    ok.

%% Microseconds per call of Fun, each of P processes making N div P calls.
per_op(Fun, N, P) ->
    Each = N div P,
    Self = self(),
    Started = erlang:monotonic_time(nanosecond),
    Pids = [spawn_link(fun() -> loop(Fun, Each), Self ! {done, self()} end)
            || _ <- lists:seq(1, P)],
    [receive {done, Pid} -> ok end || Pid <- Pids],
    (erlang:monotonic_time(nanosecond) - Started) / 1000 / (Each * P) * P.

loop(_Fun, 0) -> ok;
loop(Fun, K) -> Fun(), loop(Fun, K - 1).
