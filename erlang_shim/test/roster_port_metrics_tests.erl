%%% EUnit tests of roster_port_metrics: the counting, the checks of a
%%% program's answer, the rendering (text format 0.0.4), and a scrape of a
%%% real pool whose program (test/fake_program.py, as an old program) does
%%% not know the `metrics` request and whose program is killed.
-module(roster_port_metrics_tests).
-include_lib("eunit/include/eunit.hrl").

-define(HOST, <<"metrics.test">>).
-define(TIMEOUT, 5000).
-define(WAIT, 10000).

text(Figures) ->
    iolist_to_binary(roster_port_metrics:render(Figures)).

lines(Bin) ->
    binary:split(Bin, <<"\n">>, [global, trim_all]).

has_line(Line, Text) ->
    lists:member(Line, lines(Text)).

bucket_test() ->
    ?assertEqual(1, roster_port_metrics:bucket(0)),
    ?assertEqual(1, roster_port_metrics:bucket(500)),
    ?assertEqual(2, roster_port_metrics:bucket(501)),
    ?assertEqual(14, roster_port_metrics:bucket(10000000)),
    ?assertEqual(15, roster_port_metrics:bucket(10000001)).

error_kind_test() ->
    K = fun roster_port_metrics:error_kind/1,
    ?assertEqual(<<"timeout">>, K({error, timeout})),
    ?assertEqual(<<"unavailable">>, K({error, unavailable})),
    ?assertEqual(<<"request_too_large">>, K({error, frame_too_large})),
    ?assertEqual(<<"not_started">>, K({error, {program, #{<<"code">> => <<"timeout">>}}})),
    ?assertEqual(<<"overloaded">>, K({error, {program, #{<<"code">> => <<"overloaded">>}}})),
    ?assertEqual(<<"other">>, K({error, {program, #{<<"code">> => <<"no such code">>}}})),
    ?assertEqual(<<"other">>, K(whatever)).

exit_reason_test() ->
    ?assertEqual(exit_status, roster_port_metrics:exit_reason({exit_status, 137})),
    ?assertEqual(hung, roster_port_metrics:exit_reason({hung, "x"})),
    ?assertEqual(other, roster_port_metrics:exit_reason({nothing_known, 1})),
    ?assertEqual(other, roster_port_metrics:exit_reason(weird)).

format_value_test() ->
    ?assertEqual(<<"3">>, roster_port_metrics:format_value(3)),
    ?assertEqual(<<"2">>, roster_port_metrics:format_value(2.0)),
    ?assertEqual(<<"0.25">>, roster_port_metrics:format_value(0.25)).

%% No counters for a host that never started: counting is a no-op, and
%% a scrape of it renders only what it has (nothing but the cache line).
not_started_host_test() ->
    Host = <<"never.started">>,
    ?assertEqual(undefined, roster_port_metrics:request_started(Host, <<"roster_get">>)),
    ok = roster_port_metrics:request_done(undefined, {ok, #{}}),
    ok = roster_port_metrics:program_down(Host, {exit_status, 1}),
    Text = text(roster_port_metrics:collect([Host], 500)),
    ?assertEqual(nomatch, binary:match(Text, <<"roster_port_requests_total">>)).

counting_and_rendering_test_() ->
    {setup,
     fun() -> roster_port_metrics:start(?HOST) end,
     fun(_) -> roster_port_metrics:stop(?HOST) end,
     fun() ->
             T1 = roster_port_metrics:request_started(?HOST, <<"roster_get">>),
             T2 = roster_port_metrics:request_started(?HOST, <<"roster_get">>),
             T3 = roster_port_metrics:request_started(?HOST, <<"made_up_op">>),
             ok = roster_port_metrics:request_done(T1, {ok, #{}}),
             ok = roster_port_metrics:request_done(T3, {error, timeout}),
             ok = roster_port_metrics:cache_lookup(?HOST, roster, {ok, []}),
             ok = roster_port_metrics:cache_lookup(?HOST, roster, miss),
             ok = roster_port_metrics:cache_lookup(?HOST, jid_info, not_loaded),
             ok = roster_port_metrics:cache_lookup(?HOST, jid_info, off),
             ok = roster_port_metrics:program_started(?HOST),
             ok = roster_port_metrics:program_down(?HOST, {exit_status, 137}),
             ok = roster_port_metrics:program_down(?HOST, {hung, "no answer"}),
             [Figures] = roster_port_metrics:collect([?HOST], 500),
             Text = text([Figures]),
             H = <<"host=\"metrics.test\"">>,
             ?assert(has_line(<<"roster_port_requests_total{", H/binary, ",op=\"roster_get\"} 1">>, Text)),
             %% T2 is still in flight: counted there, not as ended.
             ?assert(has_line(<<"roster_port_requests_in_flight{", H/binary, ",op=\"roster_get\"} 1">>, Text)),
             %% An op outside the fixed set is `other`: no label from the caller.
             ?assert(has_line(<<"roster_port_request_errors_total{", H/binary,
                                ",op=\"other\",kind=\"timeout\"} 1">>, Text)),
             ?assertEqual(nomatch, binary:match(Text, <<"made_up_op">>)),
             ?assert(has_line(<<"roster_port_request_duration_seconds_bucket{", H/binary,
                                ",op=\"roster_get\",le=\"+Inf\"} 1">>, Text)),
             ?assert(has_line(<<"roster_port_request_duration_seconds_count{", H/binary,
                                ",op=\"roster_get\"} 1">>, Text)),
             ?assert(has_line(<<"roster_port_program_exits_total{", H/binary,
                                ",reason=\"exit_status\"} 1">>, Text)),
             ?assert(has_line(<<"roster_port_program_exits_total{", H/binary,
                                ",reason=\"hung\"} 1">>, Text)),
             ?assert(has_line(<<"roster_port_program_exit_status_total{", H/binary,
                                ",status=\"137\"} 1">>, Text)),
             ?assert(has_line(<<"roster_port_program_starts_total{", H/binary, "} 1">>, Text)),
             %% One TYPE line per family, before its samples.
             ?assert(has_line(<<"# TYPE roster_port_requests_total counter">>, Text)),
             ?assert(has_line(<<"# TYPE roster_port_request_duration_seconds histogram">>, Text)),
             Types = [L || L <- lines(Text), binary:match(L, <<"# TYPE ">>) /= nomatch],
             ?assertEqual(length(Types), length(lists:usort(Types))),
             %% The status text has the same figures.
             Status = iolist_to_binary(roster_port_metrics:status_text([Figures])),
             ?assertNotEqual(nomatch, binary:match(Status, <<"status 137: 1">>)),
             ?assertNotEqual(nomatch, binary:match(Status, <<"roster_get">>)),
             ok = roster_port_metrics:request_done(T2, {ok, #{}})
     end}.

family(Name, Samples) ->
    #{<<"name">> => Name, <<"type">> => <<"counter">>, <<"help">> => <<"h">>,
      <<"samples">> => Samples}.

program_answer_checks_test() ->
    Good = family(<<"roster_port_program_requests">>,
                  [[<<"roster_port_program_requests_total">>, #{<<"op">> => <<"roster_get">>}, 2.0]]),
    ?assertMatch({ok, [_]}, roster_port_metrics:check_program_answer([Good])),
    Bad = [
           %% Not under roster_port_program_: it could pass for a shim metric.
           [family(<<"roster_port_requests">>, [])],
           %% A label of the shim's own.
           [family(<<"roster_port_program_x">>,
                   [[<<"roster_port_program_x_total">>, #{<<"host">> => <<"evil">>}, 1]])],
           [family(<<"roster_port_program_x">>,
                   [[<<"roster_port_program_x_total">>, #{<<"Bad-Label">> => <<"v">>}, 1]])],
           [family(<<"roster_port_program_x">>, [[<<"roster_port_program_x_total">>, #{}, <<"1">>]])],
           [family(<<"roster_port_program_x\n# TYPE">>, [])],
           [family(<<"roster_port_program_x">>,
                   [[<<"roster_port_program_x_total">>,
                     #{<<"v">> => binary:copy(<<"a">>, 129)}, 1]])],
           [family(<<"roster_port_program_x">>,
                   [[<<"roster_port_program_x_total">>, #{<<"n">> => integer_to_binary(N)}, 1]
                    || N <- lists:seq(1, 5001)])],
           not_a_list,
           [#{<<"name">> => <<"roster_port_program_x">>}]],
    [?assertMatch({error, _}, roster_port_metrics:check_program_answer(B)) || B <- Bad].

%% Found by review: names the shim renders itself, samples that are not
%% their family's, and text that is not UTF-8 (which spoils a whole scrape)
%% are refused.
program_answers_cannot_pass_for_the_shims_or_break_the_format_test() ->
    Bad = [[family(<<"roster_port_program_starts">>,
                   [[<<"roster_port_program_starts_total">>, #{}, 1]])],
           [family(<<"roster_port_program_up">>, [[<<"roster_port_program_up">>, #{}, 1]])],
           [family(<<"roster_port_program_x">>,
                   [[<<"roster_port_program_requests_total">>, #{}, 1]])],
           [family(<<"roster_port_program_x">>,
                   [[<<"roster_port_program_x_total">>, #{<<"v">> => <<16#ff>>}, 1]])],
           [(family(<<"roster_port_program_x">>, []))#{<<"help">> => <<"caf", 16#e9>>}]],
    [?assertMatch({error, _}, roster_port_metrics:check_program_answer(B)) || B <- Bad],
    ?assertMatch({ok, _}, roster_port_metrics:check_program_answer(
                            [family(<<"roster_port_program_x">>,
                                    [[<<"roster_port_program_x_total">>,
                                      #{<<"v">> => <<"caf", 16#c3, 16#a9>>}, 1]])])).

%% Found by review: summed over a host's programs, a program missing from
%% one scrape (or restarted) made the sum drop, a counter reset for
%% Prometheus. Per worker, each program's series are its own.
program_samples_are_per_worker_test() ->
    {ok, A} = roster_port_metrics:check_program_answer(
                [family(<<"roster_port_program_requests">>,
                        [[<<"roster_port_program_requests_total">>, #{<<"op">> => <<"a">>}, 1]])]),
    Merged = roster_port_metrics:merge_program_samples(
               [roster_port_metrics:with_worker(1, A), roster_port_metrics:with_worker(2, A)]),
    ?assertEqual([{<<"roster_port_program_requests">>, <<"counter">>, <<"h">>,
                   [{<<"roster_port_program_requests_total">>,
                     [{<<"op">>, <<"a">>}, {<<"worker">>, <<"1">>}], 1},
                    {<<"roster_port_program_requests_total">>,
                     [{<<"op">>, <<"a">>}, {<<"worker">>, <<"2">>}], 1}]}],
                 Merged),
    OneMissing = roster_port_metrics:merge_program_samples([roster_port_metrics:with_worker(2, A)]),
    ?assertMatch([{_, _, _, [{_, [_, {<<"worker">>, <<"2">>}], 1}]}], OneMissing).

merge_sums_samples_test() ->
    {ok, A} = roster_port_metrics:check_program_answer(
                [family(<<"roster_port_program_requests">>,
                        [[<<"roster_port_program_requests_total">>, #{<<"op">> => <<"a">>}, 1],
                         [<<"roster_port_program_requests_total">>, #{<<"op">> => <<"b">>}, 5]])]),
    {ok, B} = roster_port_metrics:check_program_answer(
                [family(<<"roster_port_program_requests">>,
                        [[<<"roster_port_program_requests_total">>, #{<<"op">> => <<"a">>}, 2.5]])]),
    ?assertEqual([{<<"roster_port_program_requests">>, <<"counter">>, <<"h">>,
                   [{<<"roster_port_program_requests_total">>, [{<<"op">>, <<"a">>}], 3.5},
                    {<<"roster_port_program_requests_total">>, [{<<"op">>, <<"b">>}], 5}]}],
                 roster_port_metrics:merge_program_samples([A, B])).

%% Label values from a program are escaped: a quote or a newline cannot
%% start a sample of its own.
escaping_test() ->
    {ok, F} = roster_port_metrics:check_program_answer(
                [family(<<"roster_port_program_x">>,
                        [[<<"roster_port_program_x_total">>,
                          #{<<"v">> => <<"a\"b\\c\nd">>}, 1]])]),
    Figures = #{host => ?HOST, counters => undefined, journal => missing, workers => [],
                programs => [], program_families => roster_port_metrics:merge_program_samples([F]),
                cache => #{on => false, live => false, records => 0}},
    Text = text([Figures]),
    ?assert(has_line(<<"roster_port_program_x_total{host=\"metrics.test\",v=\"a\\\"b\\\\c\\nd\"} 1">>,
                     Text)),
    ?assert(has_line(<<"# TYPE roster_port_program_x_total counter">>, Text)).

%%%-------------------------------------------------------------------
%%% A scrape of a real pool
%%%-------------------------------------------------------------------

python() ->
    case os:getenv("ROSTER_PORT_PYTHON") of
        false ->
            case filelib:is_regular("../.venv/bin/python") of
                true -> filename:absname("../.venv/bin/python");
                false -> os:find_executable("python3")
            end;
        Python -> Python
    end.

pool_test_() ->
    {setup,
     fun() ->
             roster_port_metrics:start(?HOST),
             process_flag(trap_exit, true),
             {ok, Sup} = roster_port_pool:start(
                           ?HOST, #{command => [python(), filename:absname("test/fake_program.py")],
                                    pool_size => 2, call_timeout => ?TIMEOUT,
                                    ping_interval => 200, max_backoff => 400,
                                    handler => undefined}),
             ok = wait_until(fun all_up/0, ?WAIT),
             Sup
     end,
     fun(Sup) ->
             roster_port_pool:stop(?HOST),
             unlink(Sup),
             exit(Sup, shutdown),
             roster_port_metrics:stop(?HOST)
     end,
     {timeout, 60, fun scrape_of_old_programs/0}}.

scrape_of_old_programs() ->
    {ok, _} = roster_port_call:call(?HOST, <<"u">>, <<"echo">>, #{}),
    Pid1 = worker_pid(<<"u">>),
    %% The program dies of it (exit status 3): no answer for the caller.
    {error, unavailable} = roster_port_call:call(?HOST, <<"u">>, <<"die">>, #{<<"status">> => 3}),
    ok = wait_until(fun() -> all_up() andalso worker_pid(<<"u">>) /= Pid1 end, ?WAIT),
    Started = erlang:monotonic_time(millisecond),
    [Figures] = roster_port_metrics:collect([?HOST]),
    %% Old programs answer unknown_op at once: the scrape does not wait.
    ?assert(erlang:monotonic_time(millisecond) - Started < 2000),
    ?assertEqual([{1, unknown_op}, {2, unknown_op}], maps:get(programs, Figures)),
    Text = text([Figures]),
    H = <<"host=\"metrics.test\"">>,
    ?assert(has_line(<<"roster_port_program_metrics_ok{", H/binary, ",worker=\"1\"} 0">>, Text)),
    ?assert(has_line(<<"roster_port_program_up{", H/binary, ",worker=\"2\"} 1">>, Text)),
    ?assert(has_line(<<"roster_port_program_exit_status_total{", H/binary, ",status=\"3\"} 1">>, Text)),
    ?assert(has_line(<<"roster_port_program_starts_total{", H/binary, "} 3">>, Text)),
    %% echo and die are not ops of the protocol: `other`; die failed.
    ?assert(has_line(<<"roster_port_requests_total{", H/binary, ",op=\"other\"} 2">>, Text)),
    ?assert(has_line(<<"roster_port_request_errors_total{", H/binary,
                       ",op=\"other\",kind=\"unavailable\"} 1">>, Text)),
    %% The scrape's own requests are not counted as ejabberd's.
    ?assertEqual(nomatch, binary:match(Text, <<"op=\"metrics\"">>)).

%% The os pid of the program serving LUser (roster_port_call's bare JID).
worker_pid(LUser) ->
    Names = roster_port_pool:worker_names(?HOST),
    Name = lists:nth(erlang:phash2(<<LUser/binary, "@", ?HOST/binary>>, length(Names)) + 1, Names),
    maps:get(os_pid, gen_server:call(Name, status)).

all_up() ->
    lists:all(fun(Name) -> (catch maps:get(status, gen_server:call(Name, status))) == up end,
              roster_port_pool:worker_names(?HOST)).

wait_until(Fun, Ms) ->
    Until = erlang:monotonic_time(millisecond) + Ms,
    wait_until1(Fun, Until).

wait_until1(Fun, Until) ->
    case Fun() of
        true -> ok;
        false ->
            case erlang:monotonic_time(millisecond) >= Until of
                true -> timeout;
                false -> receive after 20 -> wait_until1(Fun, Until) end
            end
    end.
