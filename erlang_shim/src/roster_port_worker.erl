%%% @doc One worker of the pool: owns one running roster-port program and
%%% forwards requests to it (docs/protocol.md, version 2).
%%%
%%% Invariants:
%%%   - Every request written gets the next id and an entry in `pending`
%%%     until its answer, its deadline or the program's end; any number are
%%%     in flight, answers are matched by id. A request past its deadline is
%%%     answered {error, timeout} by the worker itself (at the next sweep,
%%%     at most 200 ms later) and remembered as late: its effects are carried
%%%     out when its answer comes (an answer of code `timeout` was never
%%%     started: nothing to carry out). So an answer reaches its caller or
%%%     the runner, never neither.
%%%   - The program hangs when a hello or a ping gets no answer within
%%%     call_timeout (it answers pings from its reading loop, whatever its
%%%     requests are doing), or when bytes written to its stdin stay unread
%%%     that long. A slow request proves nothing (one user's row lock must
%%%     not cost everyone their requests): when a request passes its
%%%     deadline and no ping is in flight, a ping goes out at once. Pings
%%%     also go out every ping_interval.
%%%   - A program that hangs, exits, or writes something that is not a frame
%%%     is killed (a program opened is always in the state or killed) and
%%%     started again after a backoff: 100 ms when it had answered hello
%%%     and then a request, or run for SERVED_MS (1 s), else doubling up to
%%%     max_backoff (a program that fails before hello, or before it
%%%     answers anything, is retried less and less often; a poison request
%%%     that kills every program it reaches is bounded by its caller: a read
%%%     is resent once, a presence retried by the journal's own backoff).
%%%   - A program is "coming" from the worker's start and from each hello
%%%     answered, until a program fails before answering hello (then not
%%%     until one answers). While a program is coming and none is up (its
%%%     hello not answered yet, or its restart due before the request's
%%%     deadline), requests wait in `waiting` (at most MAX_WAITING, in the
%%%     order received) and are sent, in that order and before any new one,
%%%     right after the hello is answered. Otherwise a request gets
%%%     {error, unavailable} at once. A waiting request is never sent after
%%%     its deadline: it is answered {error, unavailable} (nothing was done)
%%%     at the sweep, as all waiting requests are when a program fails
%%%     before hello.
%%%   - When a program goes down, its callers in flight get
%%%     {error, unavailable}, but for reads (roster_port_cache:writes/2 is
%%%     false) when the program had served and its restart is due before
%%%     their deadline: those go back to `waiting`, first, in the order they
%%%     were sent, with their own deadline (a read changes nothing, so
%%%     sending it twice is harmless; a third time is not tried, so that a
%%%     read a program dies of takes two down at most). `late` is emptied: ids
%%%     start at 1 again with the next program, and what the late requests
%%%     did is unknown (answer_lost, logged).
%%%   - Effects without a caller (notifications, late answers) go to the
%%%     runner (roster_port_effects), never run here: routing a presence
%%%     may call this very worker.
%%%   - The read cache's rules are roster_port_cache's; the worker calls
%%%     its request_sent, answer_received, ... at those moments.
%%%   - Worker 1's program is asked for the change feed (one per host and
%%%     node); its cache is on once a ping answered after hello proves the
%%%     feed open.
%%%
%%% Writing never blocks the worker (status, sweep, pings go on whatever
%%% the program does). A spawn port is "busy" once more than 8 KiB wait in
%%% the VM for the pipe (64 KiB); a port_command then suspends its caller,
%%% or with nosuspend returns false. On OTP 25 a healthy reader makes it
%%% busy with any frame over ~72 KiB (an 8 MiB frame for ~80 ms) and on
%%% more than half the writes of a burst of small frames, so busy is no sign
%%% of a hang. The port is opened with its busy limits disabled instead:
%%% port_command(nosuspend) always takes the frame, and the VM queues what
%%% the pipe does not. The worker watches that queue (port_info queue_size,
%%% under 1 us) after each request and at each sweep: bytes written minus
%%% bytes queued is what the pipe took; bytes queued and none taken for
%%% call_timeout, or over max(2 x max_frame_bytes, 16 MiB) queued, and it is
%%% hung. An outbox in the worker retried on a timer would hold the same
%%% bytes under the same bound, and add a retry delay and a second place
%%% where frames wait.
%%%
%%% Framing is done here (roster_port_frames), not by the VM: a port with
%%% {packet, 4} reserves whatever length its first 4 bytes announce before
%%% max_frame_bytes can be checked (gigabytes for a stray line on stdout).
%%% The program's stdout carries frames only; its stderr is inherited from
%%% the VM (see README).
-module(roster_port_worker).
-behaviour(gen_server).

-export([start_link/4, spawn_opts/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-include_lib("kernel/include/logger.hrl").

-define(PROTOCOLS, [2]).
-define(SHIM_VERSION, <<"0.1.0">>).
-define(MIN_BACKOFF, 100).
-define(SWEEP_MAX_MS, 200).
%% Bytes queued for the program's stdin that mean a hung program whatever
%% max_frame_bytes is: a burst of small requests while its reading loop
%% pauses must not get a healthy program killed.
-define(MIN_STDIN_QUEUE, 16 * 1024 * 1024).
-define(MAX_LATE, 1000).
%% Callers waiting for a program that is coming (module doc): a bound, so
%% that a flood while the program starts costs bounded memory.
-define(MAX_WAITING, 10000).
%% A program that answered hello and ran this long served: its end resets
%% the backoff. (A kill -9 every few seconds must cost ~100 ms each time.)
-define(SERVED_MS, 1000).
%% Requests without answer, or refused by the program, are logged at most
%% once per this many ms, counted.
-define(TROUBLE_LOG_MS, 10000).

-record(state,
        {host :: binary(),
         index :: pos_integer(),
         command :: [string()],
         call_timeout :: pos_integer(),
         max_frame_bytes :: pos_integer(),
         ping_interval :: pos_integer(),
         max_backoff :: pos_integer(),
         handler :: undefined | {module(), atom(), list()},
         transcript :: undefined | atom(),
         runner :: pid(),
         node :: binary(),
         %% Whether this worker's program reports outside changes (worker 1).
         feed :: boolean(),
         cache :: roster_port_cache:cache(),
         %% The feed worker's first ping after hello: its answer proves the
         %% program's change feed open, so the cache may answer again.
         feed_check = false :: boolean(),
         %% down: no program (a start is scheduled); starting: hello sent;
         %% up: serving.
         status = down :: down | starting | up,
         port :: undefined | port(),
         os_pid :: undefined | non_neg_integer(),
         %% The frame decoder of the program's stdout (undefined: no port).
         frames :: undefined | roster_port_frames:state(),
         started_at = 0 :: integer(),
         %% The program has answered a caller's request (since its start).
         answered = false :: boolean(),
         %% Whether a program is coming (module doc), and when the next start
         %% is due while status is down.
         coming = true :: boolean(),
         %% Programs that failed before their hello since the last one that
         %% answered it.
         early_failures = 0 :: non_neg_integer(),
         restart_at = 0 :: integer(),
         %% Programs started by this worker (status/0: tests, diagnosis).
         starts = 0 :: non_neg_integer(),
         backoff = ?MIN_BACKOFF :: pos_integer(),
         next_id = 1 :: pos_integer(),
         %% Id => {Kind, Op, Args, Deadline}; Kind is {caller, From} |
         %% {resent, From} (a read sent again to a new program) | hello | ping.
         pending = #{} :: #{pos_integer() => tuple()},
         %% Callers waiting for the program: {Kind, Op, Args, Deadline} as in
         %% pending, in the order they are to be sent.
         waiting = queue:new() :: queue:queue(),
         waiting_len = 0 :: non_neg_integer(),
         %% Requests whose caller gave up: Id => {Op, Args}, oldest first in
         %% late_ids, so that their effects are still carried out.
         late = #{} :: map(),
         late_ids = queue:new() :: queue:queue(),
         ping_timer :: undefined | reference(),
         %% The program's stdin (see the module doc): bytes written to the
         %% port, bytes the pipe had taken at the last look, and when the
         %% queue was last seen empty or shrinking.
         written = 0 :: non_neg_integer(),
         drained = 0 :: non_neg_integer(),
         read_at = 0 :: integer(),
         %% Counts of no_answer / timeout / overloaded not logged yet, the
         %% last such request, and when they were last logged.
         trouble = #{} :: #{atom() => pos_integer()},
         trouble_last :: undefined | {binary(), term()},
         trouble_logged_at :: undefined | integer()}).

start_link(Host, Index, Name, Opts) ->
    gen_server:start_link({local, Name}, ?MODULE, {Host, Index, Opts},
                          [{spawn_opt, spawn_opts()}]).

%% @doc The worker decodes every answer (roster_port_msgpack) before it
%% hands it to its caller. A roster of thousands of items is a result of a
%% few MB built in one go; from the default heap (233 words) the process
%% would go through a dozen garbage collections growing its heap, each
%% copying the result built so far. A minimum heap of ~1 MB (121393 words,
%% one of the VM's heap sizes) holds a 1,000-item answer without any and a
%% 5,000-item one with a few; it costs ~1 MB per worker (pool_size per host),
%% which a worker keeps for good. Binaries are not concerned: strings are
%% sub-binaries of the frame, which is off-heap.
-spec spawn_opts() -> [term()].
spawn_opts() ->
    [{min_heap_size, 121393}].

%%%===================================================================
%%% gen_server callbacks
%%%===================================================================

init({Host, Index, Opts}) ->
    process_flag(trap_exit, true),
    State = #state{host = Host,
                   index = Index,
                   command = maps:get(command, Opts),
                   call_timeout = maps:get(call_timeout, Opts),
                   max_frame_bytes = maps:get(max_frame_bytes, Opts),
                   ping_interval = maps:get(ping_interval, Opts),
                   max_backoff = maps:get(max_backoff, Opts),
                   handler = maps:get(handler, Opts),
                   transcript = maps:get(transcript, Opts),
                   node = maps:get(node, Opts),
                   feed = Index == 1,
                   cache = maps:get(cache, Opts, undefined),
                   restart_at = now_ms()},
    State1 = State#state{runner = roster_port_effects:start_runner(Host, Index,
                                                                   State#state.handler)},
    %% The program starts after init returns: a slow start must not hold
    %% the supervisor (and so ejabberd's module start).
    self() ! start_program,
    schedule_sweep(State1),
    {ok, State1}.

handle_call({request, Op, Args, Deadline}, From, #state{status = up} = State) ->
    case send_request({caller, From}, Op, Args, Deadline, State) of
        {ok, State1} ->
            {noreply, watch_stdin(State1)};
        {error, unavailable} when State#state.waiting_len < ?MAX_WAITING ->
            %% The program has just exited (its port is closed; the exit is on
            %% its way): nothing was written, so the request waits for the next
            %% program, as any request does while one is coming.
            {noreply, wait({{caller, From}, Op, Args, Deadline}, State)};
        {error, Reason} ->
            {reply, {error, Reason}, State}
    end;
handle_call({request, Op, Args, Deadline}, From, State) ->
    case waits(Deadline, State) of
        true ->
            {noreply, wait({{caller, From}, Op, Args, Deadline}, State)};
        false when State#state.coming, State#state.waiting_len >= ?MAX_WAITING ->
            {reply, {error, unavailable}, trouble(waiting_full, Op, Args, State)};
        false ->
            {reply, {error, unavailable}, State}
    end;
handle_call(runner, _From, State) ->
    {reply, State#state.runner, State};
handle_call(status, _From, State) ->
    {reply, #{status => State#state.status, os_pid => State#state.os_pid,
              starts => State#state.starts,
              %% ms since the program was started (undefined: none).
              ran_ms => case State#state.os_pid of
                            undefined -> undefined;
                            _ -> now_ms() - State#state.started_at
                        end,
              coming => State#state.coming,
              waiting => State#state.waiting_len,
              %% Op => how many wait (roster_port_metrics; a scrape, not the hot path).
              waiting_ops => waiting_ops(State#state.waiting),
              late => maps:size(State#state.late),
              pending => maps:size(State#state.pending)}, State};
handle_call(_Request, _From, State) ->
    {reply, {error, badarg}, State}.

handle_cast(_Msg, State) ->
    {noreply, State}.

handle_info({Port, {data, Bytes}}, #state{port = Port, frames = Frames} = State) ->
    case roster_port_frames:feed(Bytes, Frames) of
        {ok, Complete, Frames1} ->
            {noreply, handle_frames(Complete, Port, State#state{frames = Frames1})};
        {error, {frame_too_large, Length, Head}, Complete} ->
            %% What came before the bad prefix was read as frames: answer it.
            case handle_frames(Complete, Port, State) of
                #state{port = Port} = State1 ->
                    {noreply, program_down({not_frames, Length, Head}, State1)};
                State1 ->
                    {noreply, State1}
            end
    end;
handle_info({Port, {exit_status, Status}}, #state{port = Port} = State) ->
    {noreply, program_down({exit_status, Status}, State#state{port = undefined})};
handle_info({'EXIT', Port, Reason}, #state{port = Port} = State) ->
    {noreply, program_down({port_exit, Reason}, State#state{port = undefined})};
handle_info({'EXIT', Runner, Reason}, #state{runner = Runner} = State) ->
    ?LOG_ERROR("roster-port ~ts/~B: effects runner died (~p); starting a new one",
               [State#state.host, State#state.index, Reason]),
    Runner1 = roster_port_effects:start_runner(State#state.host, State#state.index,
                                               State#state.handler),
    {noreply, State#state{runner = Runner1}};
handle_info({'EXIT', _, _}, State) ->
    %% An old port, already closed by us.
    {noreply, State};
handle_info(start_program, #state{status = down} = State) ->
    {noreply, start_program(State)};
handle_info(ping, #state{status = up} = State) ->
    {noreply, ping(State#state{ping_timer = undefined})};
handle_info(sweep, State) ->
    schedule_sweep(State),
    {noreply, sweep(State)};
handle_info(_Info, State) ->
    {noreply, State}.

terminate(_Reason, #state{port = Port} = State) ->
    %% Closing stdin asks the program to finish what is in flight and exit.
    close_port(Port),
    fail_callers(State),
    fail_waiting(State),
    ok.

%%%===================================================================
%%% Starting and stopping the program
%%%===================================================================

start_program(#state{command = [Exe | Args]} = State0) ->
    roster_port_metrics:program_started(State0#state.host),
    State = State0#state{starts = State0#state.starts + 1},
    case open_program(Exe, Args) of
        {ok, Path, Port, OsPid} ->
            ?LOG_INFO("roster-port ~ts/~B: started ~ts (os pid ~B)",
                      [State#state.host, State#state.index, Path, OsPid]),
            Now = now_ms(),
            say_hello(State#state{port = Port, os_pid = OsPid, status = starting,
                                  started_at = Now, answered = false, next_id = 1,
                                  written = 0, drained = 0, read_at = Now,
                                  frames = roster_port_frames:new(State#state.max_frame_bytes)});
        {error, Reason} ->
            program_down({cannot_start, Exe, Reason}, State)
    end.

%% stream: the framing is roster_port_frames'; no busy limits: the port
%% never suspends the worker (see the module doc).
open_program(Exe, Args) ->
    try
        Path = executable(Exe),
        Port = open_port({spawn_executable, Path},
                         [stream, binary, exit_status, use_stdio, hide, {args, Args},
                          {busy_limits_port, disabled}, {busy_limits_msgq, disabled}]),
        case erlang:port_info(Port, os_pid) of
            {os_pid, OsPid} -> {ok, Path, Port, OsPid};
            %% Closed already: nothing left to stop.
            undefined -> {error, exited_at_once}
        end
    catch error:Reason ->
            {error, Reason}
    end.

%% From here on the program is in the state: any failure goes through
%% program_down/2, which closes its port and kills it.
say_hello(State) ->
    %% max_frame_bytes: the program never answers with a longer frame (we would
    %% take it for garbage and restart the program), it answers an error instead.
    Hello = #{<<"protocols">> => ?PROTOCOLS, <<"shim">> => ?SHIM_VERSION,
              <<"host">> => State#state.host, <<"node">> => State#state.node,
              <<"change_feed">> => State#state.feed,
              <<"max_frame_bytes">> => State#state.max_frame_bytes},
    Deadline = now_ms() + State#state.call_timeout,
    case send_request(hello, <<"hello">>, Hello, Deadline, State) of
        {ok, State1} ->
            State1;
        {error, frame_too_large} ->
            {_, Frame} = encode_request(1, <<"hello">>, Hello, Deadline),
            program_down({hello_too_large, byte_size(Frame)}, State);
        {error, Reason} ->
            program_down({hello_not_sent, Reason}, State)
    end.

executable(Exe) ->
    case filename:pathtype(Exe) of
        absolute -> Exe;
        _ ->
            case os:find_executable(Exe) of
                false -> error(enoent);
                Path -> Path
            end
    end.

%% The program is gone or must go: make sure it is dead, answer everyone
%% waiting (but reads, when the next program is coming in time: they wait
%% for it), forget the late requests, and schedule the next start.
program_down(Why, #state{port = Port, os_pid = OsPid} = State) ->
    roster_port_metrics:program_down(State#state.host, Why),
    close_port(Port),
    case Why of
        {exit_status, _} -> ok;
        _ -> kill(OsPid)
    end,
    roster_port_cache:program_down(State#state.cache, State#state.feed),
    cancel_ping(State),
    Now = now_ms(),
    Served = State#state.status == up,
    %% Whether the next program is worth waiting for: this one served, or
    %% it is the first since one that served to fail before its hello (a
    %% kill that lands while the replacement starts); two in a row is a
    %% crash loop.
    Coming = Served orelse (State#state.coming andalso State#state.early_failures == 0),
    %% A program that served gets a fresh start; one that fails before its
    %% hello or at once is retried less and less often.
    Backoff = case Why of
                  %% Neither heals by itself: no point in trying soon.
                  {unsupported_protocol, _} -> State#state.max_backoff;
                  {hello_too_large, _} -> State#state.max_backoff;
                  _ when Served, State#state.answered -> ?MIN_BACKOFF;
                  _ when Served, Now - State#state.started_at >= ?SERVED_MS -> ?MIN_BACKOFF;
                  _ -> State#state.backoff
              end,
    RestartAt = Now + Backoff,
    %% Nothing waits unless a program is coming (above). A read is sent
    %% again once only: one that kills every program it reaches must not
    %% take more down.
    {Requeue, Fail} =
        lists:partition(fun({_, {{caller, _}, Op, Args, Deadline}}) ->
                                Coming andalso Deadline > RestartAt
                                    andalso not roster_port_cache:writes(Op, Args);
                           (_) ->
                                false
                        end, lists:sort(maps:to_list(State#state.pending))),
    fail_callers(State#state{pending = maps:from_list(Fail)}),
    State1 = case Coming of
                 true ->
                     Reads = queue:from_list([{{resent, From}, Op, Args, Deadline}
                                              || {_, {{caller, From}, Op, Args, Deadline}}
                                                     <- Requeue]),
                     State#state{waiting = queue:join(Reads, State#state.waiting),
                                 waiting_len = State#state.waiting_len + queue:len(Reads)};
                 false ->
                     fail_waiting(State),
                     State#state{waiting = queue:new(), waiting_len = 0}
             end,
    log_down(Why, Backoff, State),
    erlang:send_after(Backoff, self(), start_program),
    forget_late(State1#state{status = down, port = undefined, os_pid = undefined,
                             frames = undefined, pending = #{}, ping_timer = undefined,
                             feed_check = false, coming = Coming, restart_at = RestartAt,
                             early_failures = case Served of
                                                  true -> 0;
                                                  false -> State#state.early_failures + 1
                                              end,
                             backoff = min(Backoff * 2, State#state.max_backoff)}).

%% Late requests of a program that is gone will never be answered, and ids
%% start at 1 again with the next program: an old late id would match a new
%% program's answer. What they did is unknown.
forget_late(#state{late = Late} = State) when map_size(Late) == 0 ->
    State;
forget_late(#state{late = Late} = State) ->
    roster_port_cache:answer_lost(State#state.cache),
    ?LOG_WARNING("roster-port ~ts/~B: ~B request~ts past their deadline got no answer "
                 "before the program ended; whether they were carried out is unknown",
                 [State#state.host, State#state.index, map_size(Late),
                  plural(map_size(Late))]),
    State#state{late = #{}, late_ids = queue:new()}.

log_down(Why, Backoff, #state{host = Host, index = I, os_pid = OsPid,
                              max_frame_bytes = MaxFrame}) ->
    case Why of
        {exit_status, Status} ->
            ?LOG_ERROR("roster-port ~ts/~B: program (os pid ~p) exited with "
                       "status ~B; restarting it in ~B ms",
                       [Host, I, OsPid, Status, Backoff]);
        {hung, What} ->
            ?LOG_ERROR("roster-port ~ts/~B: program (os pid ~p) does not answer "
                       "(~ts); killed it, restarting it in ~B ms",
                       [Host, I, OsPid, What, Backoff]);
        {stdin_unread, Ms} ->
            ?LOG_ERROR("roster-port ~ts/~B: the program (os pid ~p) has not read its "
                       "stdin for ~B ms; killing it, restarting it in ~B ms",
                       [Host, I, OsPid, Ms, Backoff]);
        {stdin_full, Bytes} ->
            ?LOG_ERROR("roster-port ~ts/~B: the program (os pid ~p) leaves ~B bytes "
                       "unread on its stdin (over max(2 x max_frame_bytes, 16 MiB)); killing it, "
                       "restarting it in ~B ms",
                       [Host, I, OsPid, Bytes, Backoff]);
        {unsupported_protocol, Message} ->
            ?LOG_ERROR("roster-port ~ts/~B: the program does not speak roster-port "
                       "protocol ~w (it says: ~ts); not using it, trying again "
                       "in ~B ms",
                       [Host, I, ?PROTOCOLS, Message, Backoff]);
        {hello_too_large, Size} ->
            ?LOG_ERROR("roster-port ~ts/~B: max_frame_bytes (~B) is smaller than the "
                       "hello (~B bytes): no program can be used; stopped the one "
                       "started (os pid ~p), trying again in ~B ms",
                       [Host, I, MaxFrame, Size, OsPid, Backoff]);
        {not_frames, Length, Head} ->
            ?LOG_ERROR("roster-port ~ts/~B: program (os pid ~p) wrote something that is "
                       "not a frame on its stdout (a print, a traceback?): a length of "
                       "~B bytes, over max_frame_bytes (~B); first bytes: ~ts; killed it, "
                       "restarting it in ~B ms",
                       [Host, I, OsPid, Length, MaxFrame, hex_head(Head), Backoff]);
        {port_exit, epipe} ->
            %% A request was written after the program had closed its stdin,
            %% which it does by exiting: the VM closes the port on the failed
            %% write and drops the exit status it would have reported (no
            %% {exit_status, _} follows a port's exit). Said as such, so that
            %% an operator does not look for a status.
            ?LOG_ERROR("roster-port ~ts/~B: program (os pid ~p) exited or closed its "
                       "stdin: a request written to it failed (epipe), and then the VM "
                       "reports no exit status (see the program's own log); killed it, "
                       "restarting it in ~B ms", [Host, I, OsPid, Backoff]);
        {cannot_start, Exe, Reason} ->
            ?LOG_ERROR("roster-port ~ts/~B: cannot start ~ts: ~p; trying again "
                       "in ~B ms", [Host, I, Exe, Reason, Backoff]);
        Other ->
            ?LOG_ERROR("roster-port ~ts/~B: program (os pid ~p) stopped: ~p; "
                       "restarting it in ~B ms", [Host, I, OsPid, Other, Backoff])
    end.

close_port(undefined) -> ok;
close_port(Port) ->
    catch port_close(Port),
    ok.

kill(undefined) -> ok;
kill(OsPid) when is_integer(OsPid) ->
    %% In a process of its own: os:cmd starts a shell, which takes a while on
    %% a loaded machine, and the worker must go on answering meanwhile.
    _ = spawn(fun() -> os:cmd("kill -9 " ++ integer_to_list(OsPid) ++ " 2>/dev/null") end),
    ok.

fail_callers(#state{pending = Pending}) ->
    maps:foreach(fun(_Id, {Kind, _Op, _Args, _Deadline}) ->
                         reply(Kind, {error, unavailable})
                 end, Pending).

fail_waiting(#state{waiting = Waiting}) ->
    lists:foreach(fun({Kind, _Op, _Args, _Deadline}) ->
                          reply(Kind, {error, unavailable})
                  end, queue:to_list(Waiting)).

%% To the caller of a request, if it has one.
reply({caller, From}, Reply) -> gen_server:reply(From, Reply);
reply({resent, From}, Reply) -> gen_server:reply(From, Reply);
reply(_Kind, _Reply) -> ok.

%% Whether a request that cannot be sent now waits for the next program
%% (module doc): one is coming, there is room, and it can be up in time.
waits(Deadline, #state{coming = true, waiting_len = Len} = State) when Len < ?MAX_WAITING ->
    State#state.status == starting orelse State#state.restart_at < Deadline;
waits(_Deadline, _State) ->
    false.

waiting_ops(Waiting) ->
    lists:foldl(fun({_, Op, _, _}, Acc) -> maps:update_with(Op, fun(N) -> N + 1 end, 1, Acc) end,
                #{}, queue:to_list(Waiting)).

wait(Entry, #state{waiting = Waiting, waiting_len = Len} = State) ->
    State#state{waiting = queue:in(Entry, Waiting), waiting_len = Len + 1}.

%% Right after hello: the waiting requests, in order, before any new one.
%% One past its deadline is not sent (it would only be refused as timeout):
%% nothing was done, so its caller gets unavailable.
send_waiting(#state{waiting_len = 0} = State) ->
    State;
send_waiting(#state{waiting = Waiting} = State) ->
    Now = now_ms(),
    lists:foldl(fun({Kind, Op, Args, Deadline}, S) when Deadline < Now ->
                        reply(Kind, {error, unavailable}),
                        trouble(not_sent, Op, Args, S);
                   ({Kind, Op, Args, Deadline}, S) ->
                        case send_request(Kind, Op, Args, Deadline, S) of
                            {ok, S1} ->
                                S1;
                            {error, Reason} ->
                                reply(Kind, {error, Reason}),
                                S
                        end
                end, State#state{waiting = queue:new(), waiting_len = 0},
                queue:to_list(Waiting)).

%% At each sweep: a waiting request past its deadline was never sent.
expire_waiting(#state{waiting_len = 0} = State) ->
    State;
expire_waiting(#state{waiting = Waiting} = State) ->
    Now = now_ms(),
    {Expired, Left} = lists:partition(fun({_, _, _, Deadline}) -> Deadline < Now end,
                                      queue:to_list(Waiting)),
    lists:foldl(fun({Kind, Op, Args, _}, S) ->
                        reply(Kind, {error, unavailable}),
                        trouble(not_sent, Op, Args, S)
                end, State#state{waiting = queue:from_list(Left), waiting_len = length(Left)},
                Expired).


%%%===================================================================
%%% Requests and answers
%%%===================================================================

%% timeout_ms: what is left of the caller's wait when the frame is written.
encode_request(Id, Op, Args, Deadline) ->
    Message = [0, Id, Op, Args#{<<"timeout_ms">> => max(0, Deadline - now_ms())}],
    {Message, roster_port_msgpack:encode(Message)}.

send_request(Kind, Op, Args, Deadline, #state{port = Port, next_id = Id} = State) ->
    {Message, Frame} = encode_request(Id, Op, Args, Deadline),
    Size = byte_size(Frame),
    if Size > State#state.max_frame_bytes ->
            case Kind of
                hello ->
                    ok;  % say_hello/1 logs it, with what it means
                _ ->
                    ?LOG_ERROR("roster-port ~ts/~B: request ~ts of ~B bytes is over "
                               "max_frame_bytes; not sent",
                               [State#state.host, State#state.index, Op, Size])
            end,
            {error, frame_too_large};
       true ->
            roster_port_cache:request_sent(State#state.cache, Op, Args),
            %% Never false nor suspending: the port has no busy limits.
            try erlang:port_command(Port, roster_port_frames:encode(Frame), [nosuspend]) of
                true ->
                    roster_port_transcript:record(State#state.transcript, in,
                                                  State#state.index, Message),
                    Pending = maps:put(Id, {Kind, Op, Args, Deadline},
                                       State#state.pending),
                    {ok, State#state{next_id = Id + 1, pending = Pending,
                                     written = State#state.written + Size + 4}};
                false ->
                    {error, unavailable}
            catch error:badarg ->
                    %% The program has just exited; its exit_status message
                    %% is on its way and will restart it.
                    {error, unavailable}
            end
    end.

%% Whether the program reads what is written to its stdin (module doc).
watch_stdin(#state{port = Port} = State) when Port /= undefined ->
    Now = now_ms(),
    Limit = max(2 * State#state.max_frame_bytes, ?MIN_STDIN_QUEUE),
    case erlang:port_info(Port, queue_size) of
        {queue_size, 0} ->
            State#state{drained = State#state.written, read_at = Now};
        {queue_size, Queued} when Queued > Limit ->
            program_down({stdin_full, Queued}, State);
        {queue_size, Queued} ->
            case State#state.written - Queued of
                Drained when Drained > State#state.drained ->
                    State#state{drained = Drained, read_at = Now};
                _ when Now - State#state.read_at > State#state.call_timeout ->
                    program_down({stdin_unread, Now - State#state.read_at}, State);
                _ ->
                    State
            end;
        undefined ->
            %% Gone: its exit is on its way.
            State
    end;
watch_stdin(State) ->
    State.

%% The frames of one read, in order, while they come from the program that
%% is running: once it is down (a refused hello), the rest mean nothing.
handle_frames([Frame | Rest], Port, #state{port = Port} = State) ->
    handle_frames(Rest, Port, handle_frame(Frame, State));
handle_frames(_Frames, _Port, State) ->
    State.

%% Never over max_frame_bytes: roster_port_frames refuses those.
handle_frame(Frame, State) ->
    case roster_port_msgpack:decode_all(Frame) of
        {ok, Message} ->
            roster_port_transcript:record(State#state.transcript, out,
                                          State#state.index, Message),
            handle_message(Message, State);
        {error, Reason} ->
            ?LOG_ERROR("roster-port ~ts/~B: undecodable frame from the program "
                       "(~p), first bytes: ~ts",
                       [State#state.host, State#state.index, Reason,
                        hex_head(Frame)]),
            State
    end.

handle_message([1, Id, Error, Result], State) when is_integer(Id) ->
    Reply = case Error of
                nil when is_map(Result) -> {ok, Result};
                Map when is_map(Map) -> {error, {program, Map}};
                _ -> {error, {program, #{<<"code">> => <<"bad_response">>}}}
            end,
    case maps:take(Id, State#state.pending) of
        {{_, Op, Args, _} = Entry, Pending} ->
            roster_port_cache:answer_received(State#state.cache, Op, Args),
            Answered = State#state.answered orelse element(1, Reply) == ok,
            answered(Entry, Reply, refused(Reply, Op, Args,
                                           State#state{pending = Pending,
                                                       answered = Answered}));
        error ->
            case maps:take(Id, State#state.late) of
                {{Op, Args}, Late} ->
                    roster_port_cache:answer_received(State#state.cache, Op, Args),
                    case refused(Reply) of
                        timeout ->
                            %% Never started: nothing to carry out.
                            ok;
                        _ ->
                            roster_port_effects:run(State#state.runner,
                                                    {late, Op, Args, Reply})
                    end,
                    refused(Reply, Op, Args, State#state{late = Late});
                error ->
                    %% Forgotten (too many late answers): whatever it wrote
                    %% is unknown.
                    roster_port_cache:answer_lost(State#state.cache),
                    ?LOG_WARNING("roster-port ~ts/~B: answer to unknown request ~p",
                                 [State#state.host, State#state.index, Id]),
                    State
            end
    end;
handle_message([2, Name, Params], State) when is_binary(Name), is_map(Params) ->
    %% Before anything else reads the user's roster from the cache.
    roster_port_cache:notification_received(State#state.cache, Name, Params),
    roster_port_effects:run(State#state.runner, {notification, Name, Params}),
    State;
handle_message(Other, State) ->
    %% Depth-limited: the message may be megabytes of anything.
    ?LOG_ERROR("roster-port ~ts/~B: unexpected message from the program: ~P",
               [State#state.host, State#state.index, Other, 12]),
    State.

%% The program's refusals: nothing was done (protocol.md). The caller gets
%% the error as any other; they are counted for the log, never taken as a
%% sign that the program hangs.
refused({error, {program, #{<<"code">> := <<"timeout">>}}}) -> timeout;
refused({error, {program, #{<<"code">> := <<"overloaded">>}}}) -> overloaded;
refused(_Reply) -> false.

refused(Reply, Op, Args, State) ->
    case refused(Reply) of
        false -> State;
        Why -> trouble(Why, Op, Args, State)
    end.

answered({{Caller, From}, _Op, _Args, _Deadline}, Reply, State)
  when Caller == caller; Caller == resent ->
    gen_server:reply(From, Reply),
    State;
answered({ping, _, _, _}, {ok, _}, #state{feed_check = true} = State) ->
    roster_port_cache:feed_open(State#state.cache),
    ?LOG_INFO("roster-port ~ts/~B: the program reports changes made outside this "
              "node; the read cache is on",
              [State#state.host, State#state.index]),
    schedule_ping(State#state{feed_check = false});
answered({ping, _, _, _}, {ok, _}, State) ->
    schedule_ping(State);
answered({ping, _, _, _}, {error, Err}, State) ->
    ?LOG_WARNING("roster-port ~ts/~B: ping answered with an error: ~p",
                 [State#state.host, State#state.index, Err]),
    schedule_ping(State);
answered({hello, _, _, _}, Reply, State) ->
    hello_answered(Reply, State).

hello_answered({ok, #{<<"protocol">> := Protocol} = Result}, State) ->
    case lists:member(Protocol, ?PROTOCOLS) of
        true ->
            Caps = maps:get(<<"capabilities">>, Result, #{}),
            %% Without `notifications`: only the feed worker's program says
            %% true, and a value that differs between workers would rewrite
            %% the persistent_term at each hello (a scan of every process).
            roster_port_pool:set_capabilities(State#state.host,
                                              maps:remove(<<"notifications">>, Caps)),
            ?LOG_INFO("roster-port ~ts/~B: program ~ts speaks protocol ~B; "
                      "capabilities: ~ts",
                      [State#state.host, State#state.index,
                       maps:get(<<"program">>, Result, <<"?">>), Protocol,
                       lists:join(<<" ">>, [K || {K, true} <- lists:sort(maps:to_list(Caps))])]),
            roster_port_cache:program_up(State#state.cache),
            watch_stdin(send_waiting(check_feed(Caps, State#state{status = up,
                                                                  coming = true})));
        false ->
            program_down({unsupported_protocol,
                          io_lib:format("protocol ~p", [Protocol])}, State)
    end;
hello_answered({error, {program, #{<<"code">> := <<"unsupported_protocol">>} = E}},
               State) ->
    program_down({unsupported_protocol, maps:get(<<"message">>, E, <<>>)}, State);
hello_answered(Other, State) ->
    program_down({bad_hello, Other}, State).

%% The feed worker pings at once: the answer proves the feed open (see the
%% module doc). A program without notifications leaves the cache off, as it
%% would never hear of changes made outside this node.
check_feed(Caps, #state{feed = true, cache = Cache} = State) when Cache /= undefined ->
    case maps:get(<<"notifications">>, Caps, false) of
        true ->
            (ping(State))#state{feed_check = true};
        _ ->
            ?LOG_WARNING("roster-port ~ts/~B: the program does not report changes made "
                         "outside this node (capabilities.notifications is not true); "
                         "the read cache stays off",
                         [State#state.host, State#state.index]),
            schedule_ping(State)
    end;
check_feed(_Caps, State) ->
    schedule_ping(State).

%%%===================================================================
%%% Deadlines and pings
%%%===================================================================

%% The waiting requests past their deadline, the stdin (a program that
%% does not read cannot answer either), then the requests in flight past
%% their deadline: a hello or a ping means the program hangs; any other is
%% remembered as late (its caller has already been told {error, timeout})
%% and probed with a ping.
sweep(#state{status = down} = State) ->
    log_trouble(expire_waiting(State));
sweep(State0) ->
    case watch_stdin(expire_waiting(State0)) of
        #state{status = down} = State ->
            log_trouble(State);
        State ->
            Now = now_ms(),
            Expired = lists:sort([{Id, E} || {Id, {_, _, _, Deadline} = E}
                                                 <- maps:to_list(State#state.pending),
                                             Deadline < Now]),
            case [Kind || {_, {Kind, _, _, _}} <- Expired, Kind == hello orelse Kind == ping] of
                [Kind | _] ->
                    program_down({hung, io_lib:format("no answer to ~ts within ~B ms",
                                                      [Kind, State#state.call_timeout])},
                                 State);
                [] when Expired == [] ->
                    log_trouble(State);
                [] ->
                    State1 = lists:foldl(fun expired/2, State, Expired),
                    log_trouble(probe(State1))
            end
    end.

expired({Id, {Kind, Op, Args, _}}, State) ->
    %% The worker, not the caller's own clock, says when a request timed out:
    %% an answer is either given to its caller or carried out as late (by the
    %% runner), never dropped between the two (roster_port_pool:call/5 waits
    %% a little longer than call_timeout for this reply).
    reply(Kind, {error, timeout}),
    roster_port_cache:request_expired(State#state.cache, Op, Args),
    remember_late(Id, Op, Args,
                  trouble(no_answer, Op, Args,
                          State#state{pending = maps:remove(Id, State#state.pending)})).

remember_late(Id, Op, Args, #state{late = Late, late_ids = Ids} = State) ->
    Ids1 = queue:in(Id, Ids),
    Late1 = Late#{Id => {Op, Args}},
    case queue:len(Ids1) > ?MAX_LATE of
        true ->
            {{value, Old}, Ids2} = queue:out(Ids1),
            State#state{late = maps:remove(Old, Late1), late_ids = Ids2};
        false ->
            State#state{late = Late1, late_ids = Ids1}
    end.

%% A ping at once, unless one is in flight: its answer within call_timeout
%% proves the program reads and writes.
probe(#state{pending = Pending} = State) ->
    case [x || {ping, _, _, _} <- maps:values(Pending)] of
        [] -> ping(State);
        _ -> State
    end.

ping(State) ->
    cancel_ping(State),
    Deadline = now_ms() + State#state.call_timeout,
    case send_request(ping, <<"ping">>, #{}, Deadline, State#state{ping_timer = undefined}) of
        {ok, State1} -> State1;
        {error, _} -> schedule_ping(State)
    end.

%% At most ?SWEEP_MAX_MS apart: roster_port_pool:call/5's grace covers it.
schedule_sweep(#state{call_timeout = T}) ->
    erlang:send_after(max(10, min(?SWEEP_MAX_MS, T div 10)), self(), sweep).

schedule_ping(#state{ping_interval = Interval} = State) ->
    cancel_ping(State),
    State#state{ping_timer = erlang:send_after(Interval, self(), ping)}.

cancel_ping(#state{ping_timer = undefined}) -> ok;
cancel_ping(#state{ping_timer = Ref}) ->
    _ = erlang:cancel_timer(Ref),
    ok.

%% Requests without answer and the program's refusals are counted and
%% logged at most once per TROUBLE_LOG_MS: a burst must not flood the log.
trouble(Why, Op, Args, #state{trouble = Counts} = State) ->
    State#state{trouble = maps:update_with(Why, fun(N) -> N + 1 end, 1, Counts),
                trouble_last = {Op, maps:get(<<"user">>, Args, undefined)}}.

log_trouble(#state{trouble = Counts} = State) when map_size(Counts) == 0 ->
    State;
log_trouble(#state{trouble_logged_at = At} = State) ->
    Now = now_ms(),
    case At == undefined orelse Now - At >= ?TROUBLE_LOG_MS of
        true -> do_log_trouble(Now, State);
        false -> State
    end.

do_log_trouble(Now, #state{trouble = Counts, trouble_last = {Op, User}} = State) ->
    Texts = [io_lib:format(Format, [N, plural(N) | FArgs])
             || {Why, Format, FArgs} <-
                    [{no_answer, "~B request~ts without answer within ~B ms",
                      [State#state.call_timeout]},
                     {overloaded, "~B request~ts refused by the program as overloaded", []},
                     {timeout, "~B request~ts not started by the program before their "
                      "deadline", []},
                     {not_sent, "~B request~ts waited for a program past their deadline, "
                      "not sent", []},
                     {waiting_full, "~B request~ts not sent: ~B were already waiting for a "
                      "program", [?MAX_WAITING]}],
                N <- [maps:get(Why, Counts, 0)], N > 0],
    ?LOG_WARNING("roster-port ~ts/~B: ~ts (the last: ~ts for ~ts); their callers got "
                 "safe answers",
                 [State#state.host, State#state.index, lists:join(", ", Texts), Op,
                  case User of undefined -> <<"?">>; _ -> User end]),
    State#state{trouble = #{}, trouble_logged_at = Now}.

plural(1) -> "";
plural(_) -> "s".

%%%===================================================================
%%% Helpers
%%%===================================================================

now_ms() ->
    erlang:monotonic_time(millisecond).

hex_head(Frame) ->
    Head = binary:part(Frame, 0, min(32, byte_size(Frame))),
    << <<(hex(N))>> || <<N:4>> <= Head >>.

hex(N) when N < 10 -> $0 + N;
hex(N) -> $a + N - 10.
