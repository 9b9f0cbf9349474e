%%% @doc One worker of the pool: owns one running roster-port program.
%%%
%%% Theory of operation. The worker opens the program as a port in stream
%%% mode, says hello, and then forwards requests as they come: each gets the
%%% next id and an entry in `pending`, and any number may be in flight. An
%%% answer is matched to its caller by id. Everything the program does is
%%% watched:
%%%   - it exits: logged with its exit status, every caller in flight gets
%%%     {error, unavailable}, and it is started again after a backoff that
%%%     doubles from 100 ms up to max_backoff while it keeps failing. When a
%%%     request is written between its death and the VM's notice of it, the
%%%     write fails (epipe), the VM closes the port and the exit status is
%%%     lost (ERTS reports none after a port's exit): logged as such;
%%%   - it hangs: a ping goes out every ping_interval; no answer to a ping
%%%     (or to hello) within call_timeout, or a run of MAX_TIMEOUTS requests
%%%     without answer, and the program is killed and restarted the same way;
%%%   - it writes something that is not a frame (roster_port_frames reads
%%%     a length over max_frame_bytes): killed at once and restarted the same
%%%     way, as its stream cannot be read any further;
%%%   - while it is down, requests are answered {error, unavailable} at once.
%%%     A request sent with keep = true (subscription presences) is then kept
%%%     in a bounded queue, logged with its content, and replayed in order
%%%     right after the next successful hello.
%%% Effects that arrive without a caller to carry them out (notifications,
%%% the answer to a replayed request, an answer that came after its caller's
%%% deadline) go to the `runner`, a linked process that calls the pool's
%%% handler one event at a time, in order. They are never carried out in
%%% the worker itself: routing a presence may run a roster hook that calls
%%% this very worker, which would deadlock.
%%%
%%% Hello. Every hello names the ejabberd node (the program stamps its writes
%%% with it) and asks for the change feed (roster_changed notifications of
%%% changes made outside this node) from exactly one program per host: that
%%% of worker 1, the "feed worker". Each ejabberd node has its own feed
%%% worker, so every node hears of every outside change once.
%%%
%%% The read cache (roster_port_cache) is invalidated here, because every
%%% request and answer passes through here: a writing request's user right
%%% before the request is sent and again when its answer arrives (before the
%%% caller hears of it); a roster_changed notification's user as soon as it
%%% is read; everything when a program goes down or comes up, when a
%%% writing request passes its deadline, and when an answer's request is
%%% unknown. The feed worker also turns the cache off while its program is
%%% down, and on once the new program's feed is known to be open: after the
%%% answer to a ping sent once hello was answered (the program opens its
%%% feed after answering hello, before it reads the next request).
%%%
%%% Framing. The protocol's 4-byte length prefix is read and written here
%%% (roster_port_frames), not by the VM: a port with {packet, 4} allocates
%%% whatever length its first 4 bytes announce before max_frame_bytes can be
%%% checked (gigabytes for a stray line on stdout). So the worker never
%%% holds more than max_frame_bytes of one frame, and a program it has
%%% opened is always either in the state or closed and killed: a start that
%%% fails after open_port (a hello over max_frame_bytes) stops the program
%%% it opened.
%%%
%%% The program's stdout carries frames only. Its stderr is not captured: it
%%% is inherited from ejabberd's VM (see README), so the program should log
%%% to a file of its own.
-module(roster_port_worker).
-behaviour(gen_server).

-export([start_link/4, spawn_opts/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-include_lib("kernel/include/logger.hrl").

-define(PROTOCOLS, [1]).
-define(SHIM_VERSION, <<"0.1.0">>).
-define(MIN_BACKOFF, 100).
-define(MAX_TIMEOUTS, 5).
-define(MAX_LATE, 1000).

-record(state,
        {host :: binary(),
         index :: pos_integer(),
         command :: [string()],
         call_timeout :: pos_integer(),
         max_frame_bytes :: pos_integer(),
         ping_interval :: pos_integer(),
         max_kept :: non_neg_integer(),
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
         %% Programs started by this worker (status/0: tests, diagnosis).
         starts = 0 :: non_neg_integer(),
         backoff = ?MIN_BACKOFF :: pos_integer(),
         next_id = 1 :: pos_integer(),
         %% Id => {Kind, Op, Args, Deadline}; Kind is {caller, From} | hello
         %% | ping | replay.
         pending = #{} :: #{pos_integer() => tuple()},
         %% Requests whose caller gave up: Id => {Op, Args}, oldest first in
         %% late_ids, so that their effects are still carried out.
         late = #{} :: map(),
         late_ids = queue:new() :: queue:queue(),
         timeouts = 0 :: non_neg_integer(),
         kept = queue:new() :: queue:queue({binary(), map()}),
         kept_len = 0 :: non_neg_integer(),
         ping_timer :: undefined | reference()}).

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
                   max_kept = maps:get(max_kept, Opts),
                   max_backoff = maps:get(max_backoff, Opts),
                   handler = maps:get(handler, Opts),
                   transcript = maps:get(transcript, Opts),
                   node = maps:get(node, Opts),
                   feed = Index == 1,
                   cache = maps:get(cache, Opts, undefined)},
    State1 = State#state{runner = start_runner(State)},
    %% The program starts after init returns: a slow start must not hold
    %% the supervisor (and so ejabberd's module start).
    self() ! start_program,
    schedule_sweep(State1),
    {ok, State1}.

handle_call({request, Op, Args, Deadline, _Keep}, From,
            #state{status = up} = State) ->
    case send_request({caller, From}, Op, Args, Deadline, State) of
        {ok, State1} ->
            {noreply, State1};
        {error, Reason} ->
            {reply, {error, Reason}, State}
    end;
handle_call({request, Op, Args, _Deadline, Keep}, _From, State) ->
    State1 = case Keep of
                 true -> keep(Op, Args, State);
                 false -> State
             end,
    {reply, {error, unavailable}, State1};
handle_call(status, _From, State) ->
    {reply, #{status => State#state.status, os_pid => State#state.os_pid,
              starts => State#state.starts,
              kept => State#state.kept_len,
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
    {noreply, State#state{runner = start_runner(State)}};
handle_info({'EXIT', _, _}, State) ->
    %% An old port, already closed by us.
    {noreply, State};
handle_info(start_program, #state{status = down} = State) ->
    {noreply, start_program(State)};
handle_info(ping, #state{status = up} = State) ->
    Deadline = now_ms() + State#state.call_timeout,
    State1 = State#state{ping_timer = undefined},
    case send_request(ping, <<"ping">>, #{}, Deadline, State1) of
        {ok, State2} -> {noreply, State2};
        {error, _} -> {noreply, schedule_ping(State1)}
    end;
handle_info(sweep, State) ->
    schedule_sweep(State),
    {noreply, sweep(State)};
handle_info(_Info, State) ->
    {noreply, State}.

terminate(_Reason, #state{port = Port} = State) ->
    %% Closing stdin asks the program to finish what is in flight and exit.
    close_port(Port),
    fail_callers(State),
    ok.

%%%===================================================================
%%% Starting and stopping the program
%%%===================================================================

start_program(#state{command = [Exe | Args]} = State0) ->
    State = State0#state{starts = State0#state.starts + 1},
    case open_program(Exe, Args) of
        {ok, Path, Port, OsPid} ->
            ?LOG_INFO("roster-port ~ts/~B: started ~ts (os pid ~B)",
                      [State#state.host, State#state.index, Path, OsPid]),
            say_hello(State#state{port = Port, os_pid = OsPid, status = starting,
                                  started_at = now_ms(), next_id = 1,
                                  frames = roster_port_frames:new(State#state.max_frame_bytes)});
        {error, Reason} ->
            program_down({cannot_start, Exe, Reason}, State)
    end.

%% stream: the framing is roster_port_frames' (see the module doc).
open_program(Exe, Args) ->
    try
        Path = executable(Exe),
        Port = open_port({spawn_executable, Path},
                         [stream, binary, exit_status, use_stdio, hide, {args, Args}]),
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
    case send_request(hello, <<"hello">>, Hello, now_ms() + State#state.call_timeout,
                      State) of
        {ok, State1} ->
            State1;
        {error, frame_too_large} ->
            Size = byte_size(roster_port_msgpack:encode([0, 1, <<"hello">>, Hello])),
            program_down({hello_too_large, Size}, State);
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
%% waiting, and schedule the next start.
program_down(Why, #state{port = Port, os_pid = OsPid} = State) ->
    close_port(Port),
    case Why of
        {exit_status, _} -> ok;
        _ -> kill(OsPid)
    end,
    %% Outside changes go unreported until the next feed is open; answers in
    %% flight are lost (their writes may be in the store).
    State#state.feed andalso roster_port_cache:set_live(State#state.cache, false),
    roster_port_cache:invalidate_all(State#state.cache),
    fail_callers(State),
    {Kept, KeptLen} = requeue_replays(State),
    cancel_ping(State),
    %% A program that ran for a while gets a fresh start; one that keeps
    %% failing is retried less and less often.
    RanForAWhile = OsPid /= undefined andalso
        now_ms() - State#state.started_at > State#state.max_backoff,
    Backoff = case Why of
                  %% Neither heals by itself: no point in trying soon.
                  {unsupported_protocol, _} -> State#state.max_backoff;
                  {hello_too_large, _} -> State#state.max_backoff;
                  _ when RanForAWhile -> ?MIN_BACKOFF;
                  _ -> State#state.backoff
              end,
    log_down(Why, Backoff, State),
    erlang:send_after(Backoff, self(), start_program),
    State#state{status = down, port = undefined, os_pid = undefined, frames = undefined,
                pending = #{}, timeouts = 0, ping_timer = undefined,
                feed_check = false,
                kept = Kept, kept_len = KeptLen,
                backoff = min(Backoff * 2, State#state.max_backoff)}.

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
    _ = os:cmd("kill -9 " ++ integer_to_list(OsPid) ++ " 2>/dev/null"),
    ok.

fail_callers(#state{pending = Pending}) ->
    maps:foreach(fun(_Id, {{caller, From}, _Op, _Args, _Deadline}) ->
                         gen_server:reply(From, {error, unavailable});
                    (_Id, _Other) ->
                         ok
                 end, Pending).

%% Replayed requests that got no answer go back to the front of the queue,
%% in their original order.
requeue_replays(#state{pending = Pending, kept = Kept, kept_len = Len}) ->
    Replays = lists:sort([{Id, Op, Args}
                          || {Id, {replay, Op, Args, _}} <- maps:to_list(Pending)]),
    Front = queue:from_list([{Op, Args} || {_, Op, Args} <- Replays]),
    {queue:join(Front, Kept), Len + queue:len(Front)}.

%%%===================================================================
%%% Requests and answers
%%%===================================================================

send_request(Kind, Op, Args, Deadline, #state{port = Port, next_id = Id} = State) ->
    Message = [0, Id, Op, Args],
    Frame = roster_port_msgpack:encode(Message),
    if byte_size(Frame) > State#state.max_frame_bytes ->
            case Kind of
                hello ->
                    ok;  % say_hello/1 logs it, with what it means
                _ ->
                    ?LOG_ERROR("roster-port ~ts/~B: request ~ts of ~B bytes is over "
                               "max_frame_bytes; not sent",
                               [State#state.host, State#state.index, Op, byte_size(Frame)])
            end,
            {error, frame_too_large};
       true ->
            invalidate_if_writes(Op, Args, State),
            try port_command(Port, roster_port_frames:encode(Frame)) of
                true ->
                    roster_port_transcript:record(State#state.transcript, in,
                                                  State#state.index, Message),
                    Pending = maps:put(Id, {Kind, Op, Args, Deadline},
                                       State#state.pending),
                    {ok, State#state{next_id = Id + 1, pending = Pending}}
            catch error:badarg ->
                    %% The program has just exited; its exit_status message
                    %% is on its way and will restart it.
                    {error, unavailable}
            end
    end.

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
            invalidate_if_writes(Op, Args, State),
            answered(Entry, Reply, State#state{pending = Pending, timeouts = 0});
        error ->
            case maps:take(Id, State#state.late) of
                {{Op, Args}, Late} ->
                    invalidate_if_writes(Op, Args, State),
                    to_runner({late, Op, Args, Reply}, State),
                    State#state{late = Late};
                error ->
                    %% Forgotten (too many late answers): whatever it wrote
                    %% is unknown.
                    roster_port_cache:invalidate_all(State#state.cache),
                    ?LOG_WARNING("roster-port ~ts/~B: answer to unknown request ~p",
                                 [State#state.host, State#state.index, Id]),
                    State
            end
    end;
handle_message([2, Name, Params], State) when is_binary(Name), is_map(Params) ->
    %% Before anything else reads the user's roster from the cache.
    case {Name, maps:get(<<"user">>, Params, undefined)} of
        {<<"roster_changed">>, User} when is_binary(User) ->
            roster_port_cache:invalidate(State#state.cache, User);
        _ ->
            roster_port_cache:invalidate_all(State#state.cache)
    end,
    to_runner({notification, Name, Params}, State),
    State;
handle_message(Other, State) ->
    %% Depth-limited: the message may be megabytes of anything.
    ?LOG_ERROR("roster-port ~ts/~B: unexpected message from the program: ~P",
               [State#state.host, State#state.index, Other, 12]),
    State.

answered({{caller, From}, _Op, _Args, _Deadline}, Reply, State) ->
    gen_server:reply(From, Reply),
    State;
answered({replay, Op, Args, _Deadline}, Reply, State) ->
    to_runner({replayed, Op, Args, Reply}, State),
    State;
answered({ping, _, _, _}, {ok, _}, #state{feed_check = true} = State) ->
    roster_port_cache:invalidate_all(State#state.cache),
    roster_port_cache:set_live(State#state.cache, true),
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
            roster_port_pool:set_capabilities(State#state.host, Caps),
            ?LOG_INFO("roster-port ~ts/~B: program ~ts speaks protocol ~B; "
                      "capabilities: ~ts",
                      [State#state.host, State#state.index,
                       maps:get(<<"program">>, Result, <<"?">>), Protocol,
                       lists:join(<<" ">>, [K || {K, true} <- lists:sort(maps:to_list(Caps))])]),
            %% The new program may not have seen what the old one was
            %% answering when it went down.
            roster_port_cache:invalidate_all(State#state.cache),
            State1 = check_feed(Caps, State#state{status = up}),
            replay_kept(State1);
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
            case send_request(ping, <<"ping">>, #{}, now_ms() + State#state.call_timeout,
                              State) of
                {ok, State1} -> State1#state{feed_check = true};
                {error, _} -> schedule_ping(State)
            end;
        _ ->
            ?LOG_WARNING("roster-port ~ts/~B: the program does not report changes made "
                         "outside this node (capabilities.notifications is not true); "
                         "the read cache stays off",
                         [State#state.host, State#state.index]),
            schedule_ping(State)
    end;
check_feed(_Caps, State) ->
    schedule_ping(State).

%% Kept requests go out first, before any new request, so a user's
%% operations reach the program in the order they happened.
replay_kept(#state{kept_len = 0} = State) ->
    State;
replay_kept(#state{kept = Kept} = State) ->
    ?LOG_WARNING("roster-port ~ts/~B: replaying ~B kept subscription presences",
                 [State#state.host, State#state.index, State#state.kept_len]),
    Deadline = now_ms() + State#state.call_timeout,
    lists:foldl(fun({Op, Args}, S) ->
                        case send_request(replay, Op, Args, Deadline, S) of
                            {ok, S1} -> S1;
                            {error, _} -> S
                        end
                end, State#state{kept = queue:new(), kept_len = 0},
                queue:to_list(Kept)).

keep(Op, Args, #state{max_kept = Max, kept_len = Len} = State) when Len >= Max ->
    ?LOG_ERROR("roster-port ~ts/~B: program down and the queue of kept "
               "presences is full (~B); lost: ~ts ~p",
               [State#state.host, State#state.index, Max, Op, Args]),
    State;
keep(Op, Args, #state{kept = Kept, kept_len = Len} = State) ->
    ?LOG_WARNING("roster-port ~ts/~B: program down; keeping ~ts ~p to replay later",
                 [State#state.host, State#state.index, Op, Args]),
    State#state{kept = queue:in({Op, Args}, Kept), kept_len = Len + 1}.

%%%===================================================================
%%% Deadlines
%%%===================================================================

%% Requests past their deadline: a caller's is remembered as late (its
%% caller has already been told {error, timeout}); a hello or ping past its
%% deadline, or a run of timeouts, means the program hangs.
sweep(#state{status = down} = State) ->
    State;
sweep(#state{pending = Pending} = State) ->
    Now = now_ms(),
    Expired = lists:sort([{Id, E} || {Id, {_, _, _, Deadline} = E} <- maps:to_list(Pending),
                                     Deadline < Now]),
    sweep_expired(Expired, State).

sweep_expired([], State) ->
    State;
sweep_expired([{_Id, {Kind, _, _, _}} | _], State) when Kind == hello; Kind == ping ->
    program_down({hung, io_lib:format("no answer to ~ts within ~B ms",
                                      [Kind, State#state.call_timeout])}, State);
sweep_expired([{Id, {_Kind, Op, Args, _}} | Rest], State) ->
    %% When (and whether) the program will carry it out is unknown now.
    case roster_port_cache:writes(Op, Args) of
        true -> roster_port_cache:invalidate_all(State#state.cache);
        false -> ok
    end,
    ?LOG_WARNING("roster-port ~ts/~B: no answer to request ~B (~ts ~p) within ~B ms",
                 [State#state.host, State#state.index, Id, Op, Args,
                  State#state.call_timeout]),
    State1 = remember_late(Id, Op, Args,
                           State#state{pending = maps:remove(Id, State#state.pending),
                                       timeouts = State#state.timeouts + 1}),
    if State1#state.timeouts >= ?MAX_TIMEOUTS ->
            program_down({hung, io_lib:format("~B requests in a row without answer",
                                              [State1#state.timeouts])}, State1);
       true ->
            sweep_expired(Rest, State1)
    end.

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

schedule_sweep(#state{call_timeout = T}) ->
    erlang:send_after(max(10, min(1000, T div 4)), self(), sweep).

schedule_ping(#state{ping_interval = Interval} = State) ->
    cancel_ping(State),
    State#state{ping_timer = erlang:send_after(Interval, self(), ping)}.

cancel_ping(#state{ping_timer = undefined}) -> ok;
cancel_ping(#state{ping_timer = Ref}) ->
    _ = erlang:cancel_timer(Ref),
    ok.

%%%===================================================================
%%% The effects runner
%%%===================================================================

to_runner(Event, #state{runner = Runner}) ->
    Runner ! {event, Event},
    ok.

start_runner(#state{host = Host, index = Index, handler = Handler}) ->
    proc_lib:spawn_link(fun() -> runner_loop(Host, Index, Handler) end).

runner_loop(Host, Index, Handler) ->
    receive
        {event, Event} ->
            try run_handler(Handler, Event)
            catch Class:Reason:Stack ->
                    ?LOG_ERROR("roster-port ~ts/~B: carrying out ~p failed: ~p:~p ~p",
                               [Host, Index, Event, Class, Reason, Stack])
            end,
            runner_loop(Host, Index, Handler)
    end.

run_handler(undefined, _Event) -> ok;
run_handler({M, F, A}, Event) -> apply(M, F, A ++ [Event]).

%%%===================================================================
%%% Helpers
%%%===================================================================

invalidate_if_writes(Op, #{<<"user">> := User} = Args, #state{cache = Cache})
  when Cache /= undefined ->
    case roster_port_cache:writes(Op, Args) of
        true -> roster_port_cache:invalidate(Cache, User);
        false -> ok
    end;
invalidate_if_writes(_Op, _Args, _State) ->
    ok.

now_ms() ->
    erlang:monotonic_time(millisecond).

hex_head(Frame) ->
    Head = binary:part(Frame, 0, min(32, byte_size(Frame))),
    << <<(hex(N))>> || <<N:4>> <= Head >>.

hex(N) when N < 10 -> $0 + N;
hex(N) -> $a + N - 10.
