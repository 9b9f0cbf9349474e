#!/usr/bin/env escript
%%! -noshell
%%% Prints how long roster_port_msgpack:decode_all/1 takes on a roster IQ
%%% answer of 1,000 and 5,000 items, as the program writes it (~80 bytes an
%%% item), in a process spawned like a pool worker (roster_port_worker's
%%% spawn options) and in a plain process. Figures only: no pass/fail.
%%%   escript erlang_shim/test/decode_bench.escript [EBIN_DIR]
-mode(compile).

main(Args) ->
    Ebin = case Args of
               [Dir | _] -> Dir;
               [] -> filename:join(filename:dirname(escript:script_name()), "../ebin")
           end,
    true = code:add_patha(Ebin),
    {module, _} = code:ensure_loaded(roster_port_msgpack),
    WorkerOpts = worker_spawn_opts(),
    io:format("worker spawn options: ~p~n", [WorkerOpts]),
    lists:foreach(
      fun(N) ->
              Frame = roster_port_msgpack:encode(answer(N)),
              {PMin, PMed} = run(Frame, []),
              {WMin, WMed} = run(Frame, WorkerOpts),
              io:format("~5B items, ~6B bytes: plain process min ~6.2f ms (~5.2f us/item) "
                        "p50 ~6.2f ms; worker-like process min ~6.2f ms (~5.2f us/item) "
                        "p50 ~6.2f ms~n",
                        [N, byte_size(Frame), PMin / 1000, PMin / N, PMed / 1000,
                         WMin / 1000, WMin / N, WMed / 1000])
      end, [100, 1000, 5000]).

worker_spawn_opts() ->
    _ = code:ensure_loaded(roster_port_worker),
    case erlang:function_exported(roster_port_worker, spawn_opts, 0) of
        true -> roster_port_worker:spawn_opts();
        false -> []
    end.

%% {min, p50} of 21 decodes (the machine may be shared: min is the steadier), each in a fresh process that first receives the
%% frame (a refc binary, as a port delivers it) and then decodes it.
run(Frame, SpawnOpts) ->
    Times = [once(Frame, SpawnOpts) || _ <- lists:seq(1, 21)],
    Sorted = lists:sort(Times),
    {hd(Sorted), lists:nth(11, Sorted)}.

once(Frame, SpawnOpts) ->
    Self = self(),
    Pid = spawn_opt(fun() ->
                            receive {frame, F} -> ok end,
                            %% A worker has served requests before: warm heap.
                            _ = [roster_port_msgpack:decode_all(
                                   roster_port_msgpack:encode([1, I, nil, #{}]))
                                 || I <- lists:seq(1, 100)],
                            T0 = erlang:monotonic_time(microsecond),
                            {ok, [1, _, nil, #{<<"items">> := Items}]} =
                                roster_port_msgpack:decode_all(F),
                            T1 = erlang:monotonic_time(microsecond),
                            true = is_list(Items),
                            Self ! {time, self(), T1 - T0}
                    end, [link | SpawnOpts]),
    Pid ! {frame, Frame},
    receive {time, Pid, T} -> T end.

answer(N) ->
    Items = [#{<<"jid">> => <<"contact", (integer_to_binary(I))/binary, "@example.net">>,
               <<"name">> => <<"Contact number ", (integer_to_binary(I))/binary>>,
               <<"subscription">> => <<"both">>, <<"ask">> => nil,
               <<"approved">> => false, <<"groups">> => [<<"Friends">>]}
             || I <- lists:seq(1, N)],
    [1, 42, nil, #{<<"items">> => Items, <<"ver">> => <<"f3a9c1d2">>, <<"effects">> => []}].
