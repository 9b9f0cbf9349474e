%%% EUnit tests of the journal of subscription presences, on real files.
%%% Its `apply` function is this module's apply_entry/3: each run asks the
%%% test process what it returns, so a test decides every outcome and sees
%%% every run, in order.
-module(roster_port_journal_tests).
-include_lib("eunit/include/eunit.hrl").
-include_lib("kernel/include/file.hrl").
-export([apply_entry/3]).

-define(HOST, <<"journal.test">>).
-define(OP, <<"out_subscription">>).

apply_entry(Test, Op, Args) ->
    Test ! {run, self(), Op, Args},
    receive {result, R} -> R after 10000 -> {retry, test_gone} end.

dir() ->
    Dir = filename:join(["/tmp", "roster_port_journal_tests", os:getpid()]),
    ok = filelib:ensure_dir(filename:join(Dir, "x")),
    Dir.

file() ->
    filename:join(dir(), "roster_port_journal_" ++ binary_to_list(?HOST) ++ ".LOG").

start(Extra) ->
    process_flag(trap_exit, true),
    Opts = maps:merge(#{dir => dir(), apply => {?MODULE, apply_entry, [self()]}}, Extra),
    {ok, Pid} = roster_port_journal:start_link(?HOST, Opts),
    Pid.

stop(Pid) ->
    unlink(Pid),
    catch gen_server:stop(Pid),
    ok.

%% Each test runs in its own process with a journal on a fresh file, and
%% stops whatever journal is left.
with_journal(Test) ->
    fun() ->
            flush(),
            _ = file:delete(file()),
            Pid = start(#{}),
            try Test(Pid)
            after
                case whereis(roster_port_journal:name(?HOST)) of
                    undefined -> ok;
                    Left -> stop(Left)
                end
            end
    end.

%% An append from another process than the test's (which, holding a user's
%% head entry, would have its own appends for that user run at once).
append_elsewhere(User, Args) ->
    Self = self(),
    spawn(fun() -> Self ! {appended, roster_port_journal:append(?HOST, User, ?OP, Args, 5000)} end),
    receive {appended, Result} -> Result after 5000 -> error(no_append) end.

%% Runs of a journal stopped by an earlier test that failed.
flush() ->
    receive {run, _, _, _} -> flush() after 0 -> ok end.

args(N) -> #{<<"contact">> => <<"c@h">>, <<"type">> => <<"subscribe">>, <<"n">> => N}.

%% The next run the journal starts, answered Result.
expect_run(Result) ->
    receive {run, Runner, Op, Args} -> Runner ! {result, Result}, {Op, Args}
    after 5000 -> error(no_run)
    end.

no_run_within(Ms) ->
    receive {run, _, _, Args} -> error({unexpected_run, Args}) after Ms -> ok end.

pending() ->
    maps:get(pending, roster_port_journal:status(?HOST)).

wait_until(Fun, Ms) ->
    Deadline = erlang:monotonic_time(millisecond) + Ms,
    wait_until1(Fun, Deadline).
wait_until1(Fun, Deadline) ->
    case Fun() of
        true -> ok;
        false ->
            case erlang:monotonic_time(millisecond) > Deadline of
                true -> error(condition_not_met);
                false -> receive after 10 -> wait_until1(Fun, Deadline) end
            end
    end.

journal_test_() ->
    [{timeout, 30, with_journal(T)}
     || T <- [fun caller_runs_first_journal_runs_the_rest/1,
              fun failed_entry_is_retried_and_holds_the_rest/1,
              fun retry_now_runs_what_waits_for_its_retry/1,
              fun users_are_independent/1,
              fun caused_by_the_head_comes_right_after_it/1,
              fun entries_survive_a_restart_in_order/1,
              fun caller_killed_mid_run/1,
              fun refusals_and_bugs/1,
              fun tokens_of_an_instance_before_a_restart_name_nothing/1,
              fun an_append_the_caller_gave_up_on_is_run_by_the_journal/1,
              fun one_user_cannot_fill_the_journal/1,
              fun full/1,
              fun the_file_is_emptied/1]].

caller_runs_first_journal_runs_the_rest(_) ->
    begin
               {run, S1} = roster_port_journal:append(?HOST, <<"u@h">>, ?OP, args(1), 5000),
               queued = append_elsewhere(<<"u@h">>, args(2)),
               queued = append_elsewhere(<<"u@h">>, args(3)),
               %% Nothing runs while the caller holds the user's first entry.
               no_run_within(300),
               roster_port_journal:done(?HOST, S1),
               {?OP, #{<<"n">> := 2}} = expect_run(ok),
               {?OP, #{<<"n">> := 3}} = expect_run(ok),
               ok = wait_until(fun() -> pending() == 0 end, 2000)
           end.

failed_entry_is_retried_and_holds_the_rest(_) ->
    begin
               {run, S1} = roster_port_journal:append(?HOST, <<"u@h">>, ?OP, args(1), 5000),
               queued = append_elsewhere(<<"u@h">>, args(2)),
               roster_port_journal:failed(?HOST, S1, {error, unavailable}),
               %% The failed one again, until it succeeds; the next one only then.
               {_, #{<<"n">> := 1}} = expect_run({retry, store_unavailable}),
               {_, #{<<"n">> := 1}} = expect_run({retry, timeout}),
               {_, #{<<"n">> := 1}} = expect_run(ok),
               {_, #{<<"n">> := 2}} = expect_run(ok),
               ok = wait_until(fun() -> pending() == 0 end, 2000)
           end.

%% The program's store is back (feed_resumed): entries waiting for their
%% retry run at once, not at its time (here a minute away).
retry_now_runs_what_waits_for_its_retry(Pid) ->
    stop(Pid),
    _ = start(#{retry_min_ms => 60000, retry_max_ms => 60000}),
    {run, S1} = roster_port_journal:append(?HOST, <<"u@h">>, ?OP, args(1), 5000),
    queued = append_elsewhere(<<"u@h">>, args(2)),
    roster_port_journal:failed(?HOST, S1, {error, {program, #{<<"code">> => <<"store_unavailable">>}}}),
    ok = wait_until(fun() -> maps:get(retrying, roster_port_journal:status(?HOST)) == 1 end, 5000),
    no_run_within(200),
    roster_port_journal:retry_now(?HOST),
    {_, #{<<"n">> := 1}} = expect_run(ok),
    {_, #{<<"n">> := 2}} = expect_run(ok),
    ok = wait_until(fun() -> pending() == 0 end, 2000).

users_are_independent(_) ->
    begin
               {run, A1} = roster_port_journal:append(?HOST, <<"a@h">>, ?OP, args(1), 5000),
               {run, _B1} = roster_port_journal:append(?HOST, <<"b@h">>, ?OP, args(2), 5000),
               queued = append_elsewhere(<<"b@h">>, args(3)),
               %% a's caller finishes while b's caller still holds b's first.
               roster_port_journal:done(?HOST, A1),
               no_run_within(200),
               {run, _} = roster_port_journal:append(?HOST, <<"a@h">>, ?OP, args(4), 5000),
               ?assertEqual(#{pending => 3, users => 2},
                            maps:with([pending, users], roster_port_journal:status(?HOST)))
           end.

caused_by_the_head_comes_right_after_it(_) ->
    begin
        {run, Head} = roster_port_journal:append(?HOST, <<"u@h">>, ?OP, args(1), 5000),
        queued = append_elsewhere(<<"u@h">>, args(3)),
        %% The process running u's head appends for u: run now, by it.
        {run, Caused} = roster_port_journal:append(?HOST, <<"u@h">>, <<"in_subscription">>, args(2), 5000),
        roster_port_journal:failed(?HOST, Caused, {error, unavailable}),
        roster_port_journal:done(?HOST, Head),
        {<<"in_subscription">>, #{<<"n">> := 2}} = expect_run(ok),
        {?OP, #{<<"n">> := 3}} = expect_run(ok),
        ok = wait_until(fun() -> pending() == 0 end, 2000)
    end.

entries_survive_a_restart_in_order(Pid) ->
    begin
               {run, _} = roster_port_journal:append(?HOST, <<"u@h">>, ?OP, args(1), 5000),
               queued = append_elsewhere(<<"u@h">>, args(2)),
               {run, V1} = roster_port_journal:append(?HOST, <<"v@h">>, ?OP, args(3), 5000),
               roster_port_journal:done(?HOST, V1),
               ok = wait_until(fun() -> pending() == 2 end, 2000),
               %% Killed, as a VM that dies: nothing closed cleanly.
               unlink(Pid),
               exit(Pid, kill),
               ok = wait_until(fun() -> whereis(roster_port_journal:name(?HOST)) == undefined end,
                               2000),
               Pid2 = start(#{}),
               {_, #{<<"n">> := 1}} = expect_run(ok),
               {_, #{<<"n">> := 2}} = expect_run(ok),
               no_run_within(200),
               ok = wait_until(fun() -> pending() == 0 end, 2000),
               stop(Pid2)
           end.

caller_killed_mid_run(_) ->
    begin
               Self = self(),
               Caller = spawn(fun() ->
                                      Self ! {appended, roster_port_journal:append(
                                                          ?HOST, <<"u@h">>, ?OP, args(1), 5000)},
                                      receive never -> ok end
                              end),
               receive {appended, {run, _}} -> ok after 5000 -> error(no_append) end,
               exit(Caller, kill),
               {_, #{<<"n">> := 1}} = expect_run(ok),
               ok = wait_until(fun() -> pending() == 0 end, 2000)
           end.

refusals_and_bugs(_) ->
    begin
               %% Refused by the program for good: forgotten, the next one runs.
               {run, S1} = roster_port_journal:append(?HOST, <<"u@h">>, ?OP, args(1), 5000),
               queued = append_elsewhere(<<"u@h">>, args(2)),
               roster_port_journal:failed(
                 ?HOST, S1, {error, {program, #{<<"code">> => <<"stanza_error">>}}}),
               {_, #{<<"n">> := 2}} = expect_run({dropped, refused}),
               ok = wait_until(fun() -> pending() == 0 end, 2000),
               %% A run that crashes, or a bug in the program, is tried a few times.
               {run, S3} = roster_port_journal:append(?HOST, <<"u@h">>, ?OP, args(3), 5000),
               roster_port_journal:failed(?HOST, S3, {crashed, badarg}),
               [{_, #{<<"n">> := 3}} = expect_run({retry, internal}) || _ <- lists:seq(1, 4)],
               no_run_within(1200),
               ok = wait_until(fun() -> pending() == 0 end, 2000),
               ?assertEqual(2, maps:get(dropped, roster_port_journal:status(?HOST)))
           end.

tokens_of_an_instance_before_a_restart_name_nothing(Pid) ->
    begin
        {run, Old} = roster_port_journal:append(?HOST, <<"u@h">>, ?OP, args(1), 5000),
        unlink(Pid),
        exit(Pid, kill),
        ok = wait_until(fun() -> whereis(roster_port_journal:name(?HOST)) == undefined end, 2000),
        Pid2 = start(#{}),
        %% The new instance runs the entry read back, whatever the old caller says.
        roster_port_journal:done(?HOST, Old),
        {_, #{<<"n">> := 1}} = expect_run(ok),
        ok = wait_until(fun() -> pending() == 0 end, 2000),
        {run, _} = roster_port_journal:append(?HOST, <<"u@h">>, ?OP, args(2), 5000),
        ?assertMatch(#{running := 0, pending := 1}, roster_port_journal:status(?HOST)),
        stop(Pid2)
    end.

an_append_the_caller_gave_up_on_is_run_by_the_journal(Pid) ->
    begin
        ok = sys:suspend(Pid),
        queued = roster_port_journal:append(?HOST, <<"u@h">>, ?OP, args(1), 100),
        ok = sys:resume(Pid),
        {_, #{<<"n">> := 1}} = expect_run(ok),
        ok = wait_until(fun() -> pending() == 0 end, 2000),
        %% And the user's next presence is the caller's to run again.
        {run, _} = roster_port_journal:append(?HOST, <<"u@h">>, ?OP, args(2), 5000)
    end.

one_user_cannot_fill_the_journal(Pid) ->
    begin
        stop(Pid),
        _ = file:delete(file()),
        Pid2 = start(#{max_user_entries => 3}),
        {run, _} = roster_port_journal:append(?HOST, <<"u@h">>, ?OP, args(1), 5000),
        queued = append_elsewhere(<<"u@h">>, args(2)),
        queued = append_elsewhere(<<"u@h">>, args(3)),
        {error, full} = append_elsewhere(<<"u@h">>, args(4)),
        {run, _} = roster_port_journal:append(?HOST, <<"v@h">>, ?OP, args(5), 5000),
        stop(Pid2)
    end.

full(Pid) ->
    begin
               stop(Pid),
               _ = file:delete(file()),
               Pid2 = start(#{max_entries => 2}),
               {run, _} = roster_port_journal:append(?HOST, <<"u@h">>, ?OP, args(1), 5000),
               {run, _} = roster_port_journal:append(?HOST, <<"v@h">>, ?OP, args(2), 5000),
               {error, full} = roster_port_journal:append(?HOST, <<"w@h">>, ?OP, args(3), 5000),
               stop(Pid2)
           end.

the_file_is_emptied(Pid) ->
    begin
               stop(Pid),
               _ = file:delete(file()),
               Pid2 = start(#{compact_records => 50}),
               %% One user's entry held by its caller the whole time: the file
               %% never empties by itself, it is rewritten.
               {run, Held} = roster_port_journal:append(?HOST, <<"held@h">>, ?OP, args(0), 5000),
               [begin
                    {run, S} = roster_port_journal:append(?HOST, <<"u@h">>, ?OP, args(N), 5000),
                    roster_port_journal:done(?HOST, S)
                end || N <- lists:seq(1, 200)],
               ok = wait_until(fun() -> pending() == 1 end, 2000),
               {ok, #file_info{size = Size}} = file:read_file_info(file()),
               ?assert(Size < 60 * 100),
               roster_port_journal:done(?HOST, Held),
               ok = wait_until(fun() -> pending() == 0 end, 2000),
               %% Restarted from that file: nothing to run.
               stop(Pid2),
               ok = wait_until(fun() -> whereis(roster_port_journal:name(?HOST)) == undefined end,
                               2000),
               Pid3 = start(#{}),
               no_run_within(300),
               stop(Pid3)
           end.
