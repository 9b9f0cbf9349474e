%%% EUnit tests of the port pool against a real program: test/fake_program.py
%%% run by a real Python with real msgpack (the project's .venv by default,
%%% or $ROSTER_PORT_PYTHON). Nothing of the port or the program is mocked.
-module(roster_port_pool_tests).
-include_lib("eunit/include/eunit.hrl").
-export([handle_event/2, log/2]).

-define(HOST, <<"pool.test">>).
%% A loaded machine (two CPU burners on two cores) stalls the VM or a program
%% for half a second at times. So no test races a deadline against an
%% answer: a call that must be answered has seconds to spare (call_timeout,
%% which also bounds hellos and pings: a short one would get healthy programs
%% killed as hung), and a call that must time out is held by the program
%% (fake_program.py's "hold") until the test has its timeout. A bound that a
%% test proves is an order (this came before that), or a margin of seconds.
-define(TIMEOUT, 5000).
%% A caller's own deadline (roster_port_pool:call/5), for requests that must
%% pass theirs: long enough for the program to start them in time, when
%% their late answer is to be carried out.
-define(SHORT, 1000).
%% How long a test waits for a condition before it fails.
-define(WAIT, 10000).
%% EUnit runs setup and tests in different processes: each test registers
%% itself under this name to receive the pool's events.
-define(LISTENER, roster_port_pool_tests_listener).

python() ->
    case os:getenv("ROSTER_PORT_PYTHON") of
        false ->
            case filelib:is_regular("../.venv/bin/python") of
                true -> filename:absname("../.venv/bin/python");
                false -> os:find_executable("python3")
            end;
        Python -> Python
    end.

fake_program() ->
    filename:absname("test/fake_program.py").

start_pool(Extra) ->
    Opts = maps:merge(#{command => [python(), fake_program()],
                        pool_size => 2,
                        call_timeout => ?TIMEOUT,
                        ping_interval => 200,
                        max_backoff => 400,
                        handler => {?MODULE, handle_event, [?LISTENER]}},
                      Extra),
    process_flag(trap_exit, true),
    {ok, Sup} = roster_port_pool:start(?HOST, Opts),
    ok = wait_until(fun() -> all_up() end, ?WAIT),
    Sup.

stop_pool(Sup) ->
    release(),
    roster_port_pool:stop(?HOST),
    unlink(Sup),
    exit(Sup, shutdown),
    wait_dead(Sup).

wait_dead(Pid) ->
    Ref = monitor(process, Pid),
    receive {'DOWN', Ref, _, _, _} -> ok after ?WAIT -> error(pool_did_not_stop) end.

%% The hold file of this VM's programs (make eunit may run twice at once in
%% one tree): a request whose args are held(Args) is not answered while it
%% exists (fake_program.py).
hold_path() ->
    filename:absname(".eunit/hold_" ++ os:getpid()).

held(Args) ->
    Args#{<<"hold">> => unicode:characters_to_binary(hold_path())}.

hold() ->
    ok = file:write_file(hold_path(), <<>>).

release() ->
    _ = file:delete(hold_path()),
    ok.

%% The pool's handler: events with no caller (notifications, replays, late
%% answers) come back to the test process.
handle_event(Listener, Event) ->
    catch Listener ! {pool_event, Event}.

listen() ->
    catch unregister(?LISTENER),
    register(?LISTENER, self()).

worker_status(User) ->
    Names = roster_port_pool:worker_names(?HOST),
    Name = lists:nth(erlang:phash2(User, length(Names)) + 1, Names),
    gen_server:call(Name, status).

all_up() ->
    lists:all(fun(Name) -> (catch maps:get(status, gen_server:call(Name, status))) == up end,
              roster_port_pool:worker_names(?HOST)).

%% ok once Fun() is true, timeout if it is not within Ms.
wait_until(Fun, Ms) ->
    case wait_for(fun() -> Fun() == true end, true, Ms) of
        true -> ok;
        false -> timeout
    end.

%% Fun() until it gives Want, for at most Ms; what it gave last.
wait_for(Fun, Want, Ms) ->
    wait_for1(Fun, Want, now_ms() + Ms).

wait_for1(Fun, Want, Until) ->
    case Fun() of
        Want ->
            Want;
        Got ->
            case now_ms() >= Until of
                true -> Got;
                %% The interval between two looks at the condition.
                false -> receive after 20 -> wait_for1(Fun, Want, Until) end
            end
    end.

call(User, Op, Args) ->
    roster_port_pool:call(?HOST, User, Op, Args).

%% A call with a deadline of its own, Ms from now.
call_within(User, Op, Args, Ms) ->
    roster_port_pool:call(?HOST, User, Op, Args, #{deadline => now_ms() + Ms}).

%% The os pids of the running processes whose command line holds Tag. A
%% process that is gone, or a zombie (its command line is empty), is not.
programs_running(Tag) ->
    lists:sort([list_to_integer(filename:basename(filename:dirname(Path)))
                || Path <- filelib:wildcard("/proc/[0-9]*/cmdline"),
                   {ok, Cmd} <- [file:read_file(Path)],
                   binary:match(Cmd, list_to_binary(Tag)) /= nomatch]).

pool_test_() ->
    {foreach, fun() -> start_pool(#{}) end, fun stop_pool/1,
     [{"hello sets capabilities; echo answers with user added", fun echo/0},
      {"requests are pipelined and matched by id", fun pipelining/0},
      {"a call past its deadline gets timeout, the late answer is dropped",
       fun deadline/0},
      {"one user's request slower than its deadline: the other users' requests are "
       "answered, the program is not restarted", fun slow_user/0},
      {"the hello offers protocol 2; every request carries a sane timeout_ms",
       fun timeout_ms/0},
      {"a write that fails with epipe (no exit status follows): logged as such, "
       "the program killed and restarted", fun closed_stdin/0},
      {"notifications reach the handler", fun notification/0},
      {"program errors come back as errors", fun program_error/0},
      {"one user always goes to the same worker", fun same_worker/0},
      {"a call's own deadline: sooner than call_timeout is used, past is timeout at once",
       fun call_deadline/0},
      {"the late requests of a program that dies are forgotten, logged",
       fun late_forgotten/0},
      {"every request of the program blocked past its deadline (a store lock) "
       "while it answers pings: not killed", fun all_blocked/0},
      {"an answer split across many reads is put back together", fun dribble/0},
      {"a frame of 1 MB, over many reads, comes back whole", fun large_frame/0},
      {"a length prefix of ffffffff on stdout: restarted at once, no memory reserved",
       fun() -> garbage(<<16#ff, 16#ff, 16#ff, 16#ff>>) end},
      {"a traceback line on stdout: restarted at once, no memory reserved",
       fun() -> garbage(<<"Traceback (most recent call last):\n">>) end}]}.

echo() ->
    ?assertMatch(#{<<"versioning">> := true}, roster_port_pool:capabilities(?HOST)),
    {ok, #{<<"args">> := Args}} = call(<<"a@x">>, <<"echo">>, #{<<"k">> => [1, nil]}),
    ?assertEqual(#{<<"k">> => [1, nil], <<"user">> => <<"a@x">>},
                 maps:remove(<<"timeout_ms">>, Args)).

pipelining() ->
    Self = self(),
    %% The slow request goes first, held by the program until the other
    %% users' fast ones, on the same worker, are all answered: they overtook
    %% it, which proves several are in flight at once.
    hold(),
    spawn_link(fun() ->
                       Self ! {slow, call(<<"a@x">>, <<"sleep">>, held(#{<<"ms">> => 0}))}
               end),
    ok = wait_until(fun() -> lists:member([<<"sleep">>, nil], order(<<"a@x">>)) end, ?WAIT),
    [{ok, _} = call(U, <<"echo">>, #{<<"n">> => N})
     || {N, U} <- lists:zip(lists:seq(1, 20), same_worker_users(<<"a@x">>, 20))],
    receive {slow, Early} -> error({slow_answered_first, Early}) after 0 -> ok end,
    release(),
    receive {slow, R} -> ?assertMatch({ok, #{<<"slept">> := 0}}, R)
    after ?WAIT -> error(no_slow_answer)
    end.

%% The request is held by the program until its caller has its timeout, so
%% the answer cannot win the race against the deadline.
deadline() ->
    listen(),
    #{os_pid := Pid} = worker_status(<<"a@x">>),
    hold(),
    T0 = now_ms(),
    ?assertEqual({error, timeout},
                 call_within(<<"a@x">>, <<"sleep">>, held(#{<<"ms">> => 0}), ?SHORT)),
    %% Never before the deadline.
    ?assert(now_ms() - T0 >= ?SHORT),
    release(),
    %% The late answer goes to the handler (its effects must still be carried
    %% out), never to the caller's mailbox.
    receive {pool_event, {late, <<"sleep">>, _, {ok, _}}} -> ok
    after ?WAIT -> error(no_late_event)
    end,
    %% One timeout is not a hang: the same program still serves. This answer
    %% comes from the worker after anything it sent here before, the late
    %% answer included: had that come to the caller, it would be here now.
    ?assertMatch({ok, #{<<"pid">> := Pid}}, call(<<"a@x">>, <<"echo">>, #{})),
    receive Stray when not is_tuple(Stray) orelse element(1, Stray) /= pool_event ->
            error({stray_message, Stray})
    after 0 -> ok
    end.

%% One user's request is slower than its deadline (a row lock held by
%% another application): that caller and the user's requests queued behind
%% it get {error, timeout}; every other user's request on the same worker,
%% sent before and after that deadline, is answered; the program is not
%% restarted. The slow request's late answer is still carried out; its
%% followers' late answers are `timeout` (never started): nothing to carry
%% out. The slow request is held until its followers have their timeouts.
slow_user() ->
    listen(),
    Slow = <<"slow@x">>,
    {Wave1, Wave2} = lists:split(6, same_worker_users(Slow, 10)),
    #{starts := Starts, os_pid := Pid} = worker_status(Slow),
    Self = self(),
    Ask = fun(Tag, User, Op, Args, Ms) ->
                  spawn_link(fun() -> Self ! {Tag, User, call_within(User, Op, Args, Ms)} end)
          end,
    hold(),
    Ask(slow, Slow, <<"sleep">>, held(#{<<"ms">> => 0}), ?SHORT),
    ok = wait_until(fun() -> lists:member([<<"sleep">>, nil], order(Slow)) end, ?WAIT),
    [Ask(follower, Slow, <<"echo">>, #{<<"n">> => N}, ?SHORT) || N <- lists:seq(1, 5)],
    ok = wait_until(fun() -> length([N || [<<"echo">>, N] <- order(Slow)]) == 5 end, ?WAIT),
    [Ask(other, U, <<"sleep">>, #{<<"ms">> => 50 * I}, ?TIMEOUT)
     || {I, U} <- lists:zip(lists:seq(1, length(Wave1)), Wave1)],
    receive {slow, Slow, R} -> ?assertEqual({error, timeout}, R)
    after ?WAIT -> error(no_slow_answer)
    end,
    [receive {follower, Slow, F} -> ?assertEqual({error, timeout}, F)
     after ?WAIT -> error(no_follower_answer)
     end || _ <- lists:seq(1, 5)],
    %% Past the slow request's deadline, while it still runs.
    [Ask(other, U, <<"sleep">>, #{<<"ms">> => 100}, ?TIMEOUT) || U <- Wave2],
    Others = [receive {other, U, A} -> {U, A} after ?WAIT -> error(no_answer) end
              || _ <- Wave1 ++ Wave2],
    ?assertEqual([], [UA || {_, A} = UA <- Others, element(1, A) /= ok]),
    release(),
    receive {pool_event, {late, <<"sleep">>, #{<<"user">> := Slow}, {ok, _}}} -> ok
    after ?WAIT -> error(no_late_event)
    end,
    %% The user's requests are answered in order, and the runner carries out
    %% events in order: once this notification is in, so would be any late
    %% event of the followers.
    {ok, _} = call(Slow, <<"notify">>, #{}),
    receive {pool_event, {notification, _, _}} -> ok after ?WAIT -> error(no_notification)
    end,
    receive {pool_event, {late, <<"echo">>, _, _} = E} -> error({carried_out, E})
    after 0 -> ok
    end,
    ?assertMatch(#{starts := Starts, os_pid := Pid, status := up}, worker_status(Slow)).

%% Protocol 2: the hello offers [2]; every request, hello and pings
%% included, carries timeout_ms, what is left of call_timeout (the fake
%% program answers bad_request to a request without it).
timeout_ms() ->
    {ok, #{<<"hello">> := Hello}} = call(<<"a@x">>, <<"hello_args">>, #{}),
    ?assertMatch(#{<<"protocols">> := [2]}, Hello),
    %% What is left of call_timeout when written: less by no more than the
    %% call took.
    T0 = now_ms(),
    {ok, #{<<"args">> := #{<<"timeout_ms">> := T}}} = call(<<"a@x">>, <<"echo">>, #{}),
    Took = now_ms() - T0,
    ?assert(is_integer(T) andalso T >= ?TIMEOUT - Took andalso T =< ?TIMEOUT),
    Seen = fun() ->
                   {ok, #{<<"seen">> := S}} = call(<<"a@x">>, <<"seen">>, #{}),
                   S
           end,
    ok = wait_until(fun() -> lists:keymember(<<"ping">>, 1, [list_to_tuple(E) || E <- Seen()])
                    end, ?WAIT),
    Ops = lists:usort([Op || [Op, _] <- Seen()]),
    ?assertEqual([<<"echo">>, <<"hello">>, <<"hello_args">>, <<"ping">>, <<"seen">>], Ops),
    ?assertEqual([], [E || [_, Ms] = E <- Seen(),
                           not (is_integer(Ms) andalso Ms >= 0 andalso Ms =< ?TIMEOUT)]).

%% The request in flight (not a read) is unavailable; the next one, made
%% while no program is up (the next one is held `starting`), waits for it.
restart_after_death() ->
    #{os_pid := Pid1} = worker_status(<<"a@x">>),
    close_gate(),
    ?assertEqual({error, unavailable}, call(<<"a@x">>, <<"die">>, #{<<"status">> => 7})),
    ?assertNotEqual(up, maps:get(status, worker_status(<<"a@x">>))),
    [{ok, #{<<"pid">> := Pid2}}] = queued_echos(<<"a@x">>, 1, fun open_gate/0),
    ?assertNotEqual(Pid1, Pid2),
    ?assertMatch(#{status := up, os_pid := Pid2}, worker_status(<<"a@x">>)).

%% The program closes its stdin and runs on: the next write to it (the
%% echo, or a ping before it) fails with epipe, the VM closes the port, and
%% no exit status ever comes, which is what happens when the shim writes to
%% a program that has just died. The echo (a write) in flight then is
%% unavailable; made after a ping found the program gone, it waits for the
%% next one.
closed_stdin() ->
    #{os_pid := Pid1} = worker_status(<<"a@x">>),
    Logged = capture_log(
               fun() ->
                       ?assertMatch({ok, _}, call(<<"a@x">>, <<"close_stdin">>, #{})),
                       case call(<<"a@x">>, <<"echo">>, #{}) of
                           {ok, #{<<"pid">> := P}} -> ?assertNotEqual(Pid1, P);
                           Echo -> ?assertEqual({error, unavailable}, Echo)
                       end,
                       ok = wait_until(fun() -> maps:get(os_pid, worker_status(<<"a@x">>)) /= Pid1
                                                    andalso all_up()
                                       end, ?WAIT)
               end),
    Pid1Text = "program (os pid " ++ integer_to_list(Pid1) ++ ") exited or closed its stdin: "
        "a request written to it failed (epipe)",
    ?assertMatch([_], [L || L <- Logged, string:find(L, Pid1Text) /= nomatch]),
    %% Killed, not left running without its stdin.
    ?assertEqual(false, wait_for(fun() -> filelib:is_dir("/proc/" ++ integer_to_list(Pid1)
                                                         ++ "/fd") end, false, ?WAIT)),
    ?assertMatch({ok, _}, call(<<"a@x">>, <<"echo">>, #{})).

%% The lines roster_port_worker logged while Fun ran. `make eunit` runs with
%% the primary log level at none: the module's level is raised for that time,
%% and the default handler kept quiet.
capture_log(Fun) ->
    Self = self(),
    ok = logger:add_handler(?MODULE, ?MODULE, #{config => #{pid => Self}}),
    Default = logger:get_handler_config(default),
    _ = logger:set_handler_config(default, level, none),
    ok = logger:set_module_level(roster_port_worker, all),
    try
        Fun(),
        %% Logged by the worker, synchronously: what it logged before answering
        %% Fun's last status call is in the mailbox already (one sender, in order).
        collect_log([])
    after
        _ = logger:unset_module_level(roster_port_worker),
        case Default of
            {ok, #{level := Level}} -> logger:set_handler_config(default, level, Level);
            _ -> ok
        end,
        logger:remove_handler(?MODULE)
    end.

collect_log(Acc) ->
    receive {log, Line} -> collect_log([Line | Acc])
    after 0 -> lists:reverse(Acc)
    end.

%% The logger handler of capture_log/1.
log(#{msg := Msg}, #{config := #{pid := Pid}}) ->
    Line = case Msg of
               {report, Report} -> io_lib:format("~p", [Report]);
               {string, String} -> String;
               {Format, Args} -> io_lib:format(Format, Args)
           end,
    Pid ! {log, unicode:characters_to_list(Line)}.

notification() ->
    listen(),
    {ok, _} = call(<<"a@x">>, <<"notify">>, #{}),
    receive
        {pool_event, {notification, <<"roster_changed">>, Params}} ->
            ?assertEqual(<<"a@x">>, maps:get(<<"user">>, Params))
    after ?WAIT -> error(no_notification)
    end.

program_error() ->
    ?assertMatch({error, {program, #{<<"code">> := <<"unknown_op">>}}},
                 call(<<"a@x">>, <<"nope">>, #{})).

same_worker() ->
    Pids = [maps:get(<<"pid">>, element(2, call(<<"u@x">>, <<"echo">>, #{})))
            || _ <- lists:seq(1, 10)],
    ?assertEqual(1, length(lists:usort(Pids))).

dribble() ->
    ?assertMatch({ok, #{<<"args">> := #{<<"k">> := <<"v">>}}},
                 call(<<"a@x">>, <<"dribble">>, #{<<"k">> => <<"v">>})),
    ?assertMatch({ok, _}, call(<<"a@x">>, <<"echo">>, #{})).

large_frame() ->
    Blob = binary:copy(<<"0123456789">>, 100000),
    ?assertMatch({ok, #{<<"args">> := #{<<"blob">> := Blob}}},
                 call(<<"a@x">>, <<"echo">>, #{<<"blob">> => Blob})).

%% Bytes that are not a frame on the program's stdout are read as a length
%% prefix: over max_frame_bytes, the program is killed at once (its stream
%% cannot be read any further), the caller hears so at once (unavailable:
%% past its deadline, it would be timeout), and nothing of the announced
%% length (4 GB, 1.4 GB) is ever reserved.
garbage(Bytes) ->
    #{os_pid := Pid1} = worker_status(<<"a@x">>),
    Before = erlang:memory(total),
    ?assertEqual({error, unavailable},
                 call(<<"a@x">>, <<"garbage">>, #{<<"bytes">> => {bin, Bytes}})),
    ?assert(erlang:memory(total) - Before < 100 * 1024 * 1024),
    ?assertEqual(ok, wait_until(fun() ->
                                        #{status := S, os_pid := P} = worker_status(<<"a@x">>),
                                        S == up andalso P /= Pid1
                                end, ?WAIT)),
    ?assertEqual(false, wait_for(fun() -> filelib:is_dir("/proc/" ++ integer_to_list(Pid1)
                                                         ++ "/fd") end, false, ?WAIT)),
    ?assertMatch({ok, _}, call(<<"a@x">>, <<"echo">>, #{})),
    ?assert(erlang:memory(total) - Before < 100 * 1024 * 1024).

%% A max_frame_bytes too small for the hello: no program can be used, and
%% none of those started is left running.
small_frame_limit_test_() ->
    Tag = "small-frame-limit-" ++ integer_to_list(erlang:unique_integer([positive])),
    {setup,
     fun() ->
             process_flag(trap_exit, true),
             {ok, Sup} = roster_port_pool:start(
                           ?HOST, #{command => [python(), fake_program(), "--tag", Tag],
                                    pool_size => 1, call_timeout => ?TIMEOUT,
                                    max_backoff => 200, max_frame_bytes => 16}),
             Sup
     end,
     fun stop_pool/1,
     fun(_) ->
             {timeout, 30,
              ?_test(begin
                         ?assertEqual(ok, wait_until(fun() -> starts(<<"a@x">>) >= 4 end,
                                                     ?WAIT)),
                         ?assertNotEqual(up, maps:get(status, worker_status(<<"a@x">>))),
                         ?assertEqual({error, unavailable}, call(<<"a@x">>, <<"echo">>, #{})),
                         ?assertEqual([], wait_for(fun() -> programs_running(Tag) end, [], ?WAIT))
                     end)}
     end}.

starts(User) ->
    maps:get(starts, worker_status(User)).

refusal_test_() ->
    {setup,
     fun() ->
             process_flag(trap_exit, true),
             {ok, Sup} = roster_port_pool:start(
                           ?HOST, #{command => [python(), filename:absname("test/fake_program.py"),
                                                "--refuse"],
                                    pool_size => 1, call_timeout => ?TIMEOUT}),
             Sup
     end,
     fun stop_pool/1,
     fun(_) ->
             ?_test(begin
                        %% Down after a start: the first program's hello was
                        %% refused (the worker starts down, with no start).
                        ok = wait_until(fun() ->
                                                #{starts := S, status := St} =
                                                    worker_status(<<"a@x">>),
                                                S >= 1 andalso St == down
                                        end, ?WAIT),
                        ?assertEqual({error, unavailable}, call(<<"a@x">>, <<"echo">>, #{}))
                    end)
     end}.

no_pool_test() ->
    ?assertEqual({error, unavailable},
                 roster_port_pool:call(<<"nowhere">>, <<"a@x">>, <<"echo">>, #{})).

transcript_test_() ->
    Path = filename:absname(".eunit/transcript_test.msgpack"),
    {setup,
     fun() -> file:delete(Path), start_pool(#{transcript => Path, pool_size => 1}) end,
     fun stop_pool/1,
     fun(_) ->
             ?_test(begin
                        {ok, _} = call(<<"a@x">>, <<"echo">>, #{<<"k">> => 1}),
                        %% Workers cast records to the transcript's writer:
                        %% the echo's answer may be in before its record.
                        Records = fun() -> transcript_records(Path) end,
                        ok = wait_until(fun() -> length(Records()) >= 4 end, ?WAIT),
                        %% hello out and back, then the echo out and back
                        %% (after pings, maybe: their ids are skipped).
                        ?assertMatch([[<<"in">>, 1, _, [0, 1, <<"hello">>, _]],
                                      [<<"out">>, 1, _, [1, 1, nil, #{<<"protocol">> := 2}]],
                                      [<<"in">>, 1, _, [0, Echo, <<"echo">>,
                                                        #{<<"k">> := 1, <<"user">> := <<"a@x">>}]],
                                      [<<"out">>, 1, _, [1, Echo, nil, #{<<"args">> := _}]]
                                      | _], Records()),
                        [[_, _, Ts, _] | _] = Records(),
                        ?assert(abs(Ts - erlang:system_time(millisecond)) < 60000)
                    end)
     end}.

%%% The read cache as the workers keep it: hello, liveness, invalidations.

cache_test_() ->
    {foreach, fun() -> Sup = start_pool(#{cache_size => 1000}),
                       ok = wait_until(fun() -> roster_port_cache:is_live(cache()) end, ?WAIT),
                       Sup
              end,
     fun stop_pool/1,
     [{"hello names the node; only worker 1 asks for the change feed", fun hello_args/0},
      {"a write invalidates its user when sent and when answered", fun write_invalidates/0},
      {"a notification invalidates its user before it is carried out",
       fun notification_invalidates/0},
      {"a program restart invalidates everything; off while the feed is down",
       fun restart_invalidates/0}]}.

cache() ->
    roster_port_pool:cache(?HOST).

%% A user served by worker I.
user_of_worker(I) ->
    hd([U || N <- lists:seq(1, 100),
             U <- [<<"u", (integer_to_binary(N))/binary, "@x">>],
             erlang:phash2(U, 2) + 1 == I]).

cached(User) ->
    roster_port_cache:store_roster(cache(), User, roster_port_cache:stamp(), [User]),
    ?assertEqual({ok, [User]}, roster_port_cache:lookup_roster(cache(), User)).

hello_args() ->
    Node = atom_to_binary(node()),
    {ok, #{<<"hello">> := H1}} = call(user_of_worker(1), <<"hello_args">>, #{}),
    {ok, #{<<"hello">> := H2}} = call(user_of_worker(2), <<"hello_args">>, #{}),
    ?assertMatch(#{<<"node">> := Node, <<"change_feed">> := true, <<"host">> := ?HOST}, H1),
    ?assertMatch(#{<<"node">> := Node, <<"change_feed">> := false}, H2).

%% The write is held by the program until the test has looked at the cache
%% while it is in flight.
write_invalidates() ->
    U = user_of_worker(1),
    Other = user_of_worker(2),
    cached(U),
    cached(Other),
    Self = self(),
    hold(),
    spawn_link(fun() ->
                       Self ! {written, call(U, <<"out_subscription">>, held(#{}))}
               end),
    %% Asked of the program for another user of the worker (any request but
    %% a read is a write to the cache).
    [Asker] = same_worker_users(U, 1),
    ok = wait_until(fun() -> lists:member([<<"out_subscription">>, nil], order(Asker)) end,
                    ?WAIT),
    %% Sent: what was read before is void already.
    ?assertEqual(miss, roster_port_cache:lookup_roster(cache(), U)),
    %% A read made while the write is in flight may miss it (were the
    %% program to run requests concurrently): void once the answer is in.
    cached(U),
    release(),
    receive {written, Reply} -> ?assertMatch({ok, _}, Reply)
    after ?WAIT -> error(no_write_answer)
    end,
    ?assertEqual(miss, roster_port_cache:lookup_roster(cache(), U)),
    ?assertEqual({ok, [Other]}, roster_port_cache:lookup_roster(cache(), Other)),
    %% Reads do not invalidate (the fake program does not serve roster_get;
    %% what counts is that the request went through the worker).
    cached(U),
    {error, {program, _}} = call(U, <<"roster_get">>, #{}),
    ?assertEqual({ok, [U]}, roster_port_cache:lookup_roster(cache(), U)).

notification_invalidates() ->
    listen(),
    cached(<<"a@x">>),
    cached(<<"b@x">>),
    {ok, _} = call(<<"a@x">>, <<"notify">>, #{}),
    receive {pool_event, {notification, <<"roster_changed">>, _}} ->
            ?assertEqual(miss, roster_port_cache:lookup_roster(cache(), <<"a@x">>))
    after ?WAIT -> error(no_notification)
    end,
    ?assertEqual({ok, [<<"b@x">>]}, roster_port_cache:lookup_roster(cache(), <<"b@x">>)).

restart_invalidates() ->
    Feed = user_of_worker(1),
    Other = user_of_worker(2),
    cached(Feed),
    cached(Other),
    %% Not the feed worker: everything is void, the cache stays on.
    _ = call(Other, <<"die">>, #{}),
    ?assertEqual(miss, roster_port_cache:lookup_roster(cache(), Feed)),
    ?assert(roster_port_cache:is_live(cache())),
    ok = wait_until(fun() -> all_up() end, ?WAIT),
    cached(Feed),
    %% The feed worker: off until the new program's feed is open.
    _ = call(Feed, <<"die">>, #{}),
    ?assertNot(roster_port_cache:is_live(cache())),
    ?assertEqual(miss, roster_port_cache:lookup_roster(cache(), Feed)),
    ok = wait_until(fun() -> roster_port_cache:is_live(cache()) end, ?WAIT),
    cached(Other).

%% Other users of the worker that serves User.
same_worker_users(User, N) ->
    Names = roster_port_pool:worker_names(?HOST),
    Want = erlang:phash2(User, length(Names)),
    lists:sublist([U || I <- lists:seq(1, 100 * N),
                        U <- [<<"o", (integer_to_binary(I))/binary, "@x">>],
                        U /= User, erlang:phash2(U, length(Names)) == Want], N).

worker_pid(User) ->
    Names = roster_port_pool:worker_names(?HOST),
    whereis(lists:nth(erlang:phash2(User, length(Names)) + 1, Names)).

now_ms() ->
    erlang:monotonic_time(millisecond).

%%% Hang detection with no periodic ping in sight (ping_interval 60 s): a
%%% request past its deadline sends a ping at once. The call_timeout that
%%% finds a hang here is short, and still long enough for a program's start
%%% (its hello) on a loaded machine.

-define(PROBE_TIMEOUT, 2000).

probe_test_() ->
    {foreach, fun() -> start_pool(#{ping_interval => 60000, call_timeout => ?PROBE_TIMEOUT}) end,
     fun stop_pool/1,
     [{"a program that stops answering is killed and restarted within two call "
       "timeouts", fun hung_program/0},
      {"a program that stops reading its stdin: the worker is never suspended, the "
       "program is killed and restarted", fun stopped_program/0}]}.

%% Killed by the probe, well before the periodic ping (60 s) would have
%% found it: within two call timeouts and their sweeps (200 ms each), and
%% seconds to spare for a loaded machine.
hung_program() ->
    #{os_pid := Pid1} = worker_status(<<"a@x">>),
    T0 = now_ms(),
    ?assertEqual({error, timeout}, call(<<"a@x">>, <<"hang">>, #{})),
    %% The probe gets no answer either: killed, then restarted.
    ok = wait_until(fun() -> maps:get(os_pid, worker_status(<<"a@x">>)) /= Pid1 end,
                    2 * ?PROBE_TIMEOUT + ?WAIT - (now_ms() - T0)),
    ok = wait_until(fun() -> maps:get(status, worker_status(<<"a@x">>)) == up end, ?WAIT),
    ?assertEqual(false, wait_for(fun() -> filelib:is_dir("/proc/" ++ integer_to_list(Pid1)
                                                         ++ "/fd") end, false, ?WAIT)),
    ?assertMatch({ok, _}, call(<<"a@x">>, <<"echo">>, #{})).

%% SIGSTOP, then more than the pipe holds (64 KiB): the port's queue grows,
%% the worker keeps answering (a port_command that suspended it would hang
%% it for good: the stopped program never reads, and only the worker could
%% kill it), the callers get errors (the echo is a write: not sent again),
%% and the program is killed for its unread stdin, which comes before any
%% ping of the worker's could go unanswered (the log says which).
%%
%% The worker may be suspended for a moment for other reasons (a
%% persistent_term write after a hello, a spawn): only a suspension in
%% port_command is a failure.
stopped_program() ->
    User = <<"a@x">>,
    W = worker_pid(User),
    #{os_pid := Pid1, starts := Starts} = worker_status(User),
    Blob = binary:copy(<<"x">>, 16384),
    Self = self(),
    Logged =
        capture_log(
          fun() ->
                  [] = os:cmd("kill -STOP " ++ integer_to_list(Pid1)),
                  [spawn_link(fun() ->
                                      Self ! {answer, U, call(U, <<"echo">>, #{<<"blob">> => Blob})}
                              end) || U <- [User | same_worker_users(User, 12)]],
                  Responsive =
                      fun() ->
                              ?assertNotMatch([{status, suspended},
                                               {current_function, {_, port_command, _}}],
                                              process_info(W, [status, current_function])),
                              #{os_pid := P} = gen_server:call(W, status, ?WAIT),
                              P /= Pid1
                      end,
                  ok = wait_until(Responsive, ?PROBE_TIMEOUT + ?WAIT),
                  Answers = [receive {answer, _, R} -> R
                             after ?WAIT -> error(no_answer)
                             end || _ <- lists:seq(1, 13)],
                  ?assertEqual([], [R || R <- Answers, element(1, R) /= error]),
                  ok = wait_until(fun() -> Responsive() andalso all_up() end, ?WAIT)
          end),
    ?assertMatch([_], [L || L <- Logged, string:find(L, "has not read its stdin for") /= nomatch]),
    ?assertEqual(Starts + 1, starts(User)),
    ?assertEqual(false, wait_for(fun() -> filelib:is_dir("/proc/" ++ integer_to_list(Pid1)
                                                         ++ "/fd") end, false, ?WAIT)),
    ?assertMatch({ok, _}, call(User, <<"echo">>, #{})).

%%% The program's refusals: `overloaded` (over its --max-in-flight) and
%%% `timeout` (its deadline passed before its turn) are errors for the
%%% callers, never a reason to restart, and a burst of them is one log line.

refusals_test_() ->
    {setup,
     fun() -> start_pool(#{command => [python(), fake_program(), "--max-in-flight", "2"]}) end,
     fun stop_pool/1,
     fun(_) -> {timeout, 30, ?_test(refusals())} end}.

refusals() ->
    listen(),
    Slow = <<"a@x">>,
    #{starts := Starts, os_pid := Pid} = worker_status(Slow),
    Self = self(),
    Logged =
        capture_log(
          fun() ->
                  %% Held until both have their timeouts.
                  hold(),
                  spawn_link(fun() ->
                                     Self ! {slow, call_within(Slow, <<"sleep">>,
                                                               held(#{<<"ms">> => 0}), ?SHORT)}
                             end),
                  ok = wait_until(fun() -> lists:member([<<"sleep">>, nil], order(Slow)) end,
                                  ?WAIT),
                  %% Queued behind it: the program's second request in flight.
                  spawn_link(fun() ->
                                     Self ! {follower, call_within(Slow, <<"echo">>, #{}, ?SHORT)}
                             end),
                  ok = wait_until(fun() -> lists:member([<<"echo">>, nil], order(Slow)) end,
                                  ?WAIT),
                  Refused = [call(U, <<"echo">>, #{}) || U <- same_worker_users(Slow, 20)],
                  ?assertEqual([], [R || R <- Refused,
                                         not is_code(R, <<"overloaded">>)]),
                  receive {slow, R1} -> ?assertEqual({error, timeout}, R1)
                  after ?WAIT -> error(no_slow_answer)
                  end,
                  receive {follower, R2} -> ?assertEqual({error, timeout}, R2)
                  after ?WAIT -> error(no_follower_answer)
                  end,
                  release(),
                  receive {pool_event, {late, <<"sleep">>, _, {ok, _}}} -> ok
                  after ?WAIT -> error(no_late_event)
                  end,
                  %% The follower's late answer, `timeout`, came before this
                  %% one (one user's answers in order), and was not carried out.
                  {ok, _} = call(Slow, <<"notify">>, #{}),
                  receive {pool_event, {notification, _, _}} -> ok
                  after ?WAIT -> error(no_notification)
                  end,
                  receive {pool_event, {late, <<"echo">>, _, _} = E} -> error({carried_out, E})
                  after 0 -> ok
                  end
          end),
    %% Counted, and logged by a sweep since (one every 100 ms); the next
    %% line may come 10 s later at the earliest.
    ?assertMatch([_], [L || L <- Logged,
                            string:find(L, "refused by the program as overloaded") /= nomatch]),
    ?assertMatch(#{starts := Starts, os_pid := Pid, status := up}, worker_status(Slow)).

is_code({error, {program, #{<<"code">> := Code}}}, Code) -> true;
is_code(_, _) -> false.

%% A program that answers a protocol the shim did not offer is not used,
%% and the log says why.
protocol_1_test_() ->
    {timeout, 30,
     ?_test(begin
                process_flag(trap_exit, true),
                Logged = capture_log(
                           fun() ->
                                   {ok, Sup} = roster_port_pool:start(
                                                 ?HOST, #{command => [python(), fake_program(),
                                                                      "--protocol", "1"],
                                                          pool_size => 1, call_timeout => ?TIMEOUT}),
                                   ok = wait_until(fun() ->
                                                           #{starts := S, status := St} =
                                                               worker_status(<<"a@x">>),
                                                           S >= 1 andalso St == down
                                                   end, ?WAIT),
                                   ?assertEqual({error, unavailable},
                                                call(<<"a@x">>, <<"echo">>, #{})),
                                   stop_pool(Sup)
                           end),
                ?assertMatch([_ | _], [L || L <- Logged,
                                            string:find(L, "does not speak roster-port protocol "
                                                           "[2] (it says: protocol 1)") /= nomatch])
            end)}.

%% A deadline of the caller's own (roster_port_call's budget for a hook):
%% the request carries what is left of it and times out by it; one already
%% past is never sent.
call_deadline() ->
    U = <<"a@x">>,
    Call = fun(Op, Args, Deadline) ->
                   roster_port_pool:call(?HOST, U, Op, Args, #{deadline => Deadline})
           end,
    ?assertEqual({error, timeout}, Call(<<"echo">>, #{<<"n">> => 1}, now_ms() - 1)),
    ?assertEqual({error, timeout}, Call(<<"echo">>, #{<<"n">> => 2}, now_ms())),
    {ok, #{<<"args">> := #{<<"timeout_ms">> := T1}}} =
        Call(<<"echo">>, #{<<"n">> => 3}, now_ms() + ?TIMEOUT div 2),
    ?assert(T1 =< ?TIMEOUT div 2),
    %% Held by the program: only the deadline can answer it, by the
    %% worker's sweep after it, or the pool's own wait (WORKER_GRACE_MS
    %% later); either well before call_timeout.
    hold(),
    T0 = now_ms(),
    ?assertEqual({error, timeout}, Call(<<"sleep">>, held(#{<<"ms">> => 0}), T0 + ?SHORT)),
    ?assert(now_ms() - T0 < ?TIMEOUT),
    release(),
    %% Later than call_timeout: call_timeout, less by no more than the call
    %% took.
    T3 = now_ms(),
    {ok, #{<<"args">> := #{<<"timeout_ms">> := T2}}} =
        Call(<<"echo">>, #{<<"n">> => 4}, now_ms() + 60000),
    ?assert(T2 =< ?TIMEOUT andalso T2 >= ?TIMEOUT - (now_ms() - T3)),
    ?assertEqual([3, 4], [N || [<<"echo">>, N] <- order(U)]).

%% A program's ids start at 1: the late requests of the one before (whose
%% answers will never come) must not wait for an answer of the next one.
late_forgotten() ->
    U = <<"a@x">>,
    #{os_pid := Pid1} = worker_status(U),
    hold(),
    Logged = capture_log(
               fun() ->
                       ?assertEqual({error, timeout},
                                    call_within(U, <<"sleep">>, held(#{<<"ms">> => 0}), ?SHORT)),
                       %% The worker's sweep makes it late; the pool's own
                       %% wait may have answered first.
                       ok = wait_until(fun() -> maps:get(late, worker_status(U)) == 1 end, ?WAIT),
                       kill9(Pid1),
                       ok = wait_until(fun() -> up_again(U, Pid1) end, ?WAIT)
               end),
    ?assertEqual(0, maps:get(late, worker_status(U))),
    ?assertMatch([_], [L || L <- Logged,
                            string:find(L, "1 request past their deadline got no answer "
                                           "before the program ended") /= nomatch]),
    ?assertMatch({ok, _}, call(U, <<"echo">>, #{})).

%% The hang detector tells "waiting for the store" from "hung": every
%% request the program holds is slower than its deadline (their callers get
%% timeout), but its reading loop answers the pings, so it is not killed
%% (a program that answers nothing is: hung_program/0). They are held until
%% the probe sent when they went late has been answered.
all_blocked() ->
    listen(),
    Users = [<<"a@x">> | same_worker_users(<<"a@x">>, 3)],
    #{starts := Starts, os_pid := Pid} = worker_status(<<"a@x">>),
    Self = self(),
    hold(),
    [spawn_link(fun() ->
                        Self ! {blocked, U, call_within(U, <<"sleep">>, held(#{<<"ms">> => 0}),
                                                        ?SHORT)}
                end) || U <- Users],
    [receive {blocked, U, R} -> ?assertEqual({error, timeout}, R)
     after ?WAIT -> error(no_answer)
     end || U <- Users],
    %% Late, and nothing else in flight: the probe ping (sent by the sweep
    %% that made the last one late) is answered.
    ok = wait_until(fun() -> #{late := L, pending := P} = worker_status(<<"a@x">>),
                             L == length(Users) andalso P == 0
                    end, ?WAIT),
    release(),
    [receive {pool_event, {late, <<"sleep">>, #{<<"user">> := U}, {ok, _}}} -> ok
     after ?WAIT -> error(no_late_event)
     end || U <- Users],
    ?assertMatch(#{starts := Starts, os_pid := Pid, status := up}, worker_status(<<"a@x">>)).

%%% Callers wait for a program that is coming (roster_port_worker's module
%%% doc): while a program that served is restarted, and while it starts;
%%% reads in flight when it dies go to the next program, writes do not. The
%%% programs answer their hello only while the gate (a file) is open: a test
%%% closes it to keep the next program `starting` until it says.

-define(LONG, 6000).

coming_test_() ->
    {foreach,
     fun() -> open_gate(),
              start_pool(#{call_timeout => ?LONG,
                           command => [python(), fake_program(), "--hello-gate", gate()]})
     end,
     fun(Sup) -> open_gate(), stop_pool(Sup), close_gate() end,
     [{"a dead program is restarted; calls wait for it meanwhile", fun restart_after_death/0},
      {"a kill -9: the calls made meanwhile wait, and are sent in order to the next program",
       fun kill_waits/0},
      {"a waiting call past its own deadline is unavailable (never sent)",
       fun waiting_deadline/0},
      {"a read in flight when the program dies goes to the next program; a write is "
       "unavailable", fun read_resent/0},
      {"a read is sent again once only", fun read_resent_once/0},
      {"a kill that lands while the replacement starts: the calls still wait",
       fun killed_while_starting/0}]}.

%% The hello gate of this VM's programs (make eunit may run twice at once in
%% one tree).
gate() ->
    filename:absname(".eunit/hello_gate_" ++ os:getpid()).

open_gate() ->
    ok = file:write_file(gate(), <<>>).

close_gate() ->
    _ = file:delete(gate()),
    ok.

%% Kills User's program, the next one held `starting` until open_gate/0.
kill_and_hold(User) ->
    #{os_pid := Pid} = worker_status(User),
    close_gate(),
    kill9(Pid),
    ok = wait_until(fun() -> maps:get(status, worker_status(User)) == starting end, ?WAIT),
    Pid.

kill_waits() ->
    U = <<"a@x">>,
    Pid1 = kill_and_hold(U),
    Answers = queued_echos(U, 3, fun open_gate/0),
    ?assertMatch([{ok, #{<<"pid">> := P}}, {ok, #{<<"pid">> := P}}, {ok, #{<<"pid">> := P}}]
                 when P /= Pid1, Answers),
    ?assertEqual([1, 2, 3], [N || [<<"echo">>, N] <- order(U)]).

%% Count echo calls from as many processes, each made once the one before
%% waits in the worker, then Release(): their answers, in that order.
queued_echos(U, Count, Release) ->
    Self = self(),
    [begin
         spawn_link(fun() -> Self ! {answer, N, call(U, <<"echo">>, #{<<"n">> => N})} end),
         ok = wait_until(fun() -> maps:get(waiting, worker_status(U)) == N end, ?WAIT)
     end || N <- lists:seq(1, Count)],
    Release(),
    [receive {answer, N, R} -> R after ?WAIT -> error(no_answer) end
     || N <- lists:seq(1, Count)].

waiting_deadline() ->
    U = <<"a@x">>,
    kill_and_hold(U),
    T0 = now_ms(),
    ?assertEqual({error, unavailable},
                 roster_port_pool:call(?HOST, U, <<"echo">>, #{<<"n">> => 1},
                                       #{deadline => T0 + 50})),
    %% Waited (never answered before its deadline), and was answered by the
    %% worker at its sweep: the pool's own wait would say timeout.
    ?assert(now_ms() - T0 >= 50),
    open_gate(),
    ?assertMatch({ok, _}, call(U, <<"echo">>, #{<<"n">> => 2})),
    ?assertEqual([2], [N || [<<"echo">>, N] <- order(U)]).

%% Both held by the program until it is killed; the read, sent again, is
%% not held by the next one.
read_resent() ->
    U = <<"a@x">>,
    [W] = same_worker_users(U, 1),
    Self = self(),
    hold(),
    spawn_link(fun() -> Self ! {read, call(U, <<"jid_info">>, held(#{}))} end),
    spawn_link(fun() -> Self ! {write, call(W, <<"out_subscription">>, held(#{}))} end),
    ok = wait_until(fun() -> Ops = [Op || [Op, _] <- order(U)],
                             lists:member(<<"jid_info">>, Ops)
                                 andalso lists:member(<<"out_subscription">>, Ops)
                    end, ?WAIT),
    Pid1 = kill_and_hold(U),
    receive {write, R1} -> ?assertEqual({error, unavailable}, R1)
    after ?WAIT -> error(no_write_answer)
    end,
    ?assertEqual(1, maps:get(waiting, worker_status(U))),
    release(),
    open_gate(),
    receive {read, R2} -> ?assertMatch({ok, #{<<"pid">> := P}} when P /= Pid1, R2)
    after ?WAIT -> error(no_read_answer)
    end.

%% A read that every program dies on takes down two at most. It is held by
%% both programs until they are killed.
read_resent_once() ->
    U = <<"a@x">>,
    Self = self(),
    hold(),
    spawn_link(fun() -> Self ! {read, call(U, <<"jid_info">>, held(#{}))} end),
    ok = wait_until(fun() -> lists:member([<<"jid_info">>, nil], order(U)) end, ?WAIT),
    kill_and_hold(U),
    open_gate(),
    %% Sent after the read that waits (the read first), so read by the next
    %% program after it.
    ?assert(lists:member([<<"jid_info">>, nil], order(U))),
    kill9(maps:get(os_pid, worker_status(U))),
    receive {read, R} -> ?assertEqual({error, unavailable}, R)
    after ?WAIT -> error(no_read_answer)
    end.

%% A program that served is killed, and its replacement too, before its
%% hello: one failure before hello after a program that served is no crash
%% loop, so the calls waiting meanwhile go on waiting for the third program
%% (they were failed at the second kill before).
killed_while_starting() ->
    U = <<"a@x">>,
    Pid1 = kill_and_hold(U),
    Self = self(),
    spawn_link(fun() -> Self ! {read, call(U, <<"jid_info">>, #{})} end),
    ok = wait_until(fun() -> maps:get(waiting, worker_status(U)) == 1 end, ?WAIT),
    #{os_pid := Pid2} = worker_status(U),
    kill9(Pid2),
    ok = wait_until(fun() -> #{status := S, os_pid := P} = worker_status(U),
                             S == starting andalso P /= Pid2 end, ?WAIT),
    ?assertMatch(#{waiting := 1, coming := true}, worker_status(U)),
    open_gate(),
    receive {read, R} -> ?assertMatch({ok, #{<<"pid">> := P}} when P /= Pid1 andalso P /= Pid2, R)
    after 2 * ?LONG -> error(no_read_answer)
    end.

%% ejabberd's first start (issue 10, item 5): clients that log in as soon as
%% the listeners open must get their rosters, not internal-server-error.
first_start_test_() ->
    {setup,
     fun() -> close_gate(),
              start_pool_nowait(#{command => [python(), fake_program(), "--hello-gate", gate()]})
     end,
     fun(Sup) -> open_gate(), stop_pool(Sup), close_gate() end,
     fun(_) ->
             {timeout, 30,
              ?_test(begin
                         U = <<"a@x">>,
                         ?assertNotEqual(up, maps:get(status, worker_status(U))),
                         Answers = queued_echos(U, 5, fun open_gate/0),
                         ?assertEqual([], [R || R <- Answers, element(1, R) /= ok]),
                         ?assertEqual([1, 2, 3, 4, 5], [N || [<<"echo">>, N] <- order(U)])
                     end)}
     end}.

%% Programs that never answer hello: the callers waiting for the first one
%% hear so when the second fails (one failure before hello is forgiven: a
%% kill that lands while a replacement starts), later calls fail fast, and
%% the backoff doubles. Each program waits at its hello for a ticket from
%% the test, then exits: the test says when each one fails.
crash_loop_test_() ->
    {setup,
     fun() -> _ = file:delete(ticket()),
              start_pool_nowait(#{command => [python(), fake_program(), "--hello-ticket", ticket(),
                                              "--exit-at-hello"],
                                  max_backoff => 5000})
     end,
     fun(Sup) -> stop_pool(Sup), file:delete(ticket()) end,
     fun(_) ->
             {timeout, 60,
              ?_test(begin
                         U = <<"a@x">>,
                         Self = self(),
                         T0 = now_ms(),
                         spawn_link(fun() -> Self ! {first, call(U, <<"echo">>, #{})} end),
                         ok = wait_until(fun() -> maps:get(waiting, worker_status(U)) == 1 end,
                                         ?WAIT),
                         %% The first program fails: the caller waits on.
                         ok = give_ticket(),
                         ok = wait_until(fun() -> starting(U, 2) end, ?WAIT),
                         ?assertMatch(#{waiting := 1}, worker_status(U)),
                         receive {first, Early} -> error({answered, Early}) after 0 -> ok end,
                         %% The second fails: the caller hears so then, not at
                         %% its deadline.
                         T1 = now_ms(),
                         ok = give_ticket(),
                         receive {first, R} -> ?assertEqual({error, unavailable}, R)
                         after ?WAIT -> error(no_answer)
                         end,
                         ?assert(now_ms() - T0 < ?LONG),
                         %% At once: the third program is still at its hello.
                         ok = wait_until(fun() -> starting(U, 3) end, ?WAIT),
                         #{os_pid := Pid3} = worker_status(U),
                         ?assertEqual({error, unavailable}, call(U, <<"echo">>, #{})),
                         ?assertMatch(#{status := starting, os_pid := Pid3, waiting := 0},
                                      worker_status(U)),
                         ok = give_ticket(),
                         ok = wait_until(fun() -> starting(U, 4) end, ?WAIT),
                         %% From before the second program's end: backoffs
                         %% of 200 and 400 ms.
                         ?assert(now_ms() - T1 >= 200 + 400),
                         ?assertMatch(#{coming := false}, worker_status(U))
                     end)}
     end}.

%% The hello ticket of this VM's programs: each file written lets one
%% program through its hello (fake_program.py's --hello-ticket).
ticket() ->
    filename:absname(".eunit/hello_ticket_" ++ os:getpid()).

give_ticket() ->
    file:write_file(ticket(), <<>>).

%% Whether User's worker has started its Nth program and it is at its hello.
starting(User, N) ->
    case worker_status(User) of
        #{starts := N, status := starting} -> true;
        _ -> false
    end.

%% A kill -9 of a program that served costs the minimum backoff every
%% time (the issue saw 100 ms -> ... -> 25.6 s for kills 4-18 s apart). The
%% delay is read from the log, which says it: the time to recovery also
%% counts the program's start, which a loaded machine makes longer.
backoff_reset_test_() ->
    {setup,
     fun() -> start_pool(#{pool_size => 1, max_backoff => 5000}) end,
     fun stop_pool/1,
     fun(_) ->
             {timeout, 30,
              ?_test(begin
                         U = <<"a@x">>,
                         Kill = fun() ->
                                        ok = wait_until(fun() ->
                                                                #{status := S, ran_ms := R} =
                                                                    worker_status(U),
                                                                S == up andalso R >= 1000
                                                        end, ?WAIT),
                                        #{os_pid := Pid} = worker_status(U),
                                        kill9(Pid),
                                        ok = wait_until(fun() -> up_again(U, Pid) end, ?WAIT)
                                end,
                         Logged = capture_log(fun() -> [Kill() || _ <- lists:seq(1, 3)] end),
                         %% "exited with status 137", or "epipe" when a ping
                         %% was written before the exit was seen.
                         Delays = [Delay || Line <- Logged,
                                            [_, Delay] <- [string:split(Line, "restarting it in ")]],
                         ?assertEqual(["100 ms", "100 ms", "100 ms"], Delays)
                     end)}
     end}.

%% Kills well under a second apart of programs that answered a request
%% also cost the minimum backoff each time: they are not a crash loop (the
%% fault suite's "presence sent as a program dies" met 100 -> 200 -> 400 ->
%% 800 ms, 2.5 s to recovery, for 8 kills in 3.5 s of programs that served).
backoff_after_an_answer_test_() ->
    {setup,
     fun() -> start_pool(#{pool_size => 1, max_backoff => 5000}) end,
     fun stop_pool/1,
     fun(_) ->
             {timeout, 30,
              ?_test(begin
                         U = <<"a@x">>,
                         Kill = fun() ->
                                        ok = wait_until(fun() ->
                                                                maps:get(status, worker_status(U)) == up
                                                        end, ?WAIT),
                                        ?assertMatch({ok, _}, call(U, <<"echo">>, #{})),
                                        #{os_pid := Pid} = worker_status(U),
                                        kill9(Pid),
                                        ok = wait_until(fun() -> up_again(U, Pid) end, ?WAIT)
                                end,
                         Logged = capture_log(fun() -> [Kill() || _ <- lists:seq(1, 4)] end),
                         Delays = [Delay || Line <- Logged,
                                            [_, Delay] <- [string:split(Line, "restarting it in ")]],
                         ?assertEqual(["100 ms", "100 ms", "100 ms", "100 ms"], Delays)
                     end)}
     end}.

%% The waiting callers are bounded (MAX_WAITING, 10,000): one more is
%% unavailable at once (while the program it would wait for is still at
%% its hello, and the others all wait); the ones waiting are all served.
waiting_bound_test_() ->
    {setup,
     fun() -> close_gate(),
              start_pool_nowait(#{command => [python(), fake_program(), "--hello-gate", gate(),
                                              "--max-in-flight", "20000"],
                                  call_timeout => 6000})
     end,
     fun(Sup) -> open_gate(), stop_pool(Sup), close_gate() end,
     fun(_) ->
             {timeout, 60,
              ?_test(begin
                         U = <<"a@x">>,
                         Self = self(),
                         [spawn_link(fun() -> Self ! {bound, call(U, <<"echo">>, #{})} end)
                          || _ <- lists:seq(1, 10000)],
                         ok = wait_until(fun() -> maps:get(waiting, worker_status(U)) == 10000
                                         end, ?WAIT),
                         #{os_pid := Pid} = worker_status(U),
                         ?assertEqual({error, unavailable}, call(U, <<"echo">>, #{})),
                         ?assertMatch(#{status := starting, os_pid := Pid, waiting := 10000},
                                      worker_status(U)),
                         open_gate(),
                         Bad = lists:foldl(fun(_, N) ->
                                                   receive {bound, {ok, _}} -> N;
                                                           {bound, _} -> N + 1
                                                   after 6000 -> error(no_answer)
                                                   end
                                           end, 0, lists:seq(1, 10000)),
                         ?assertEqual(0, Bad)
                     end)}
     end}.

%% A pool whose programs are not waited for (the test looks at their start).
start_pool_nowait(Extra) ->
    process_flag(trap_exit, true),
    {ok, Sup} = roster_port_pool:start(
                  ?HOST, maps:merge(#{command => [python(), fake_program()],
                                      pool_size => 1,
                                      call_timeout => ?LONG,
                                      ping_interval => 200,
                                      max_backoff => 400,
                                      handler => {?MODULE, handle_event, [?LISTENER]}},
                                    Extra)),
    Sup.

kill9(OsPid) ->
    [] = os:cmd("kill -9 " ++ integer_to_list(OsPid)),
    ok.

up_again(User, OldPid) ->
    case worker_status(User) of
        #{status := up, os_pid := P} -> P /= OldPid;
        _ -> false
    end.

%% [Op, Args' "n"] of every request User's program has read so far.
order(User) ->
    {ok, #{<<"order">> := Order}} = call(User, <<"order">>, #{}),
    Order.

%% The transcript's records so far, but for pings and their answers.
transcript_records(Path) ->
    Records = case file:read_file(Path) of
                  {ok, Bin} -> decode_stream(Bin);
                  {error, enoent} -> []
              end,
    Pings = [Id || [<<"in">>, _, _, [0, Id, <<"ping">>, _]] <- Records],
    [R || [_, _, _, [_, Id | _]] = R <- Records, not lists:member(Id, Pings)].

%% The complete values of Bin (a record may be half written).
decode_stream(Bin) ->
    case roster_port_msgpack:decode(Bin) of
        {ok, Term, Rest} -> [Term | decode_stream(Rest)];
        {error, _} -> []
    end.
