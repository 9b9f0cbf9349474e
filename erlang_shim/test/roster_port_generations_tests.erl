%%% EUnit tests of two pools of one host at once (a reload: mod_roster_port
%%% starts the next pool before it stops the running one), against the real
%%% test/fake_program.py: distinct names, callers moved by use/2 only, the
%%% old pool's requests in flight counted, and names that alternate between
%%% two slots.
-module(roster_port_generations_tests).
-include_lib("eunit/include/eunit.hrl").

-define(HOST, <<"generations.test">>).

python() ->
    case os:getenv("ROSTER_PORT_PYTHON") of
        false ->
            case filelib:is_regular("../.venv/bin/python") of
                true -> filename:absname("../.venv/bin/python");
                false -> os:find_executable("python3")
            end;
        Python -> Python
    end.

opts() ->
    #{command => [python(), filename:absname("test/fake_program.py")],
      pool_size => 2, call_timeout => 2000, cache_size => 100}.

two_pools_test_() ->
    {timeout, 60, ?_test(two_pools())}.

two_pools() ->
    process_flag(trap_exit, true),
    {ok, Sup1} = roster_port_pool:start(?HOST, opts()),
    Gen1 = roster_port_pool:settings(?HOST),
    ?assert(wait(fun() -> roster_port_pool:all_up(Gen1) end)),

    {Prepared2, Gen2} = roster_port_pool:prepare(?HOST, opts()),
    ?assertMatch(#{generation := 1, slot := 1}, Gen1),
    ?assertMatch(#{generation := 2, slot := 2}, Gen2),
    Names1 = tuple_to_list(maps:get(names, Gen1)),
    Names2 = tuple_to_list(maps:get(names, Gen2)),
    ?assertEqual([], Names1 -- (Names1 -- Names2)),
    {ok, Sup2} = roster_port_pool:start_link(?HOST, Prepared2),
    ?assert(wait(fun() -> roster_port_pool:all_up(Gen2) end)),
    %% Started, not used: callers still reach the first pool.
    ?assertEqual(Gen1, roster_port_pool:settings(?HOST)),
    ?assert(lists:member(served_by(), os_pids(Gen1))),

    %% A request in flight in the first pool is counted...
    ?assertEqual(0, roster_port_pool:in_flight(Gen1)),
    Self = self(),
    spawn_link(fun() ->
                       Self ! {slept, roster_port_pool:call(?HOST, <<"a@x">>, <<"sleep">>,
                                                            #{<<"ms">> => 500})}
               end),
    ?assert(wait(fun() -> roster_port_pool:in_flight(Gen1) == 1 end)),
    %% ... and answered after the switch, which only new calls follow.
    ok = roster_port_pool:use(?HOST, Gen2),
    ?assert(lists:member(served_by(), os_pids(Gen2))),
    receive {slept, Slept} -> ?assertMatch({ok, #{<<"slept">> := 500}}, Slept)
    after 5000 -> error(no_answer)
    end,
    ?assertEqual(0, roster_port_pool:in_flight(Gen1)),

    %% Once the first pool has stopped, the next generation takes its slot.
    stop_sup(Sup1),
    ?assertEqual(0, roster_port_pool:in_flight(Gen1)),
    ?assertNot(roster_port_pool:all_up(Gen1)),
    {_, Gen3} = roster_port_pool:prepare(?HOST, opts()),
    ?assertMatch(#{generation := 3, slot := 1}, Gen3),
    ?assertEqual(maps:get(names, Gen1), maps:get(names, Gen3)),
    roster_port_pool:stop(?HOST),
    stop_sup(Sup2).

served_by() ->
    {ok, #{<<"pid">> := Pid}} = roster_port_pool:call(?HOST, <<"a@x">>, <<"echo">>, #{}),
    Pid.

os_pids(#{names := Names}) ->
    [maps:get(os_pid, gen_server:call(Name, status)) || Name <- tuple_to_list(Names)].

stop_sup(Sup) ->
    Ref = monitor(process, Sup),
    unlink(Sup),
    exit(Sup, shutdown),
    receive {'DOWN', Ref, _, _, _} -> ok after 10000 -> error(pool_did_not_stop) end.

%% Fun() within 5 s, asked every 20 ms.
wait(Fun) ->
    wait(Fun, erlang:monotonic_time(millisecond) + 5000).

wait(Fun, Until) ->
    case Fun() of
        true -> true;
        false ->
            case erlang:monotonic_time(millisecond) > Until of
                true -> false;
                false -> receive after 20 -> wait(Fun, Until) end
            end
    end.
