%%% @doc The journal of one host's subscription presences: what makes each
%%% one applied on both sides or on neither (RFC 6121 3.1-3.3), whatever
%%% fails on the way (docs/reliability.md, "Faults").
%%%
%%% Every subscription presence the shim hands to the program (an outbound
%%% one before it is routed, an inbound one before it is delivered) is
%%% appended here first, and synced to disk. It stays until it is carried
%%% out: the program applied it and what follows from the program's answer
%%% happened (the presence routed to the contact, or delivered to the user's
%%% sessions). Whatever stops that half-way (the program killed, frozen or
%%% refusing, its database down, ejabberd restarted, the caller killed) leaves
%%% the entry here, and it is carried out later, from the start.
%%%
%%% Invariants:
%%%   - One user's entries are carried out one at a time, in the order they
%%%     were appended, each to its end before the next starts. A user's first
%%%     entry, with none before it, is run by its caller at once (append/4
%%%     answers {run, Seq}; the caller says done/2 or failed/3); any other
%%%     waits its turn and is run by the journal (append/4 answers queued).
%%%     Except one appended by the process that runs the user's head entry,
%%%     while it runs: caused by it (U's `unsubscribe` routed to a local C
%%%     makes C's server answer `unsubscribed` to U at once, in the same
%%%     process), it is run at once by that process and, if it fails, comes
%%%     right after the head, before U's later entries. Queued behind them,
%%%     the answer to U's old `unsubscribe` would cancel U's newer
%%%     `subscribe`.
%%%   - An entry that failed for a reason that heals (program down or slow,
%%%     database down, overload) is retried, the user's later entries
%%%     behind it, every RETRY_MIN_MS doubling to RETRY_MAX_MS, for as long
%%%     as it takes: a presence is never dropped for being late. One that
%%%     cannot succeed (the program refused it: a bad contact, a full roster)
%%%     is dropped with a log line, and so, after MAX_ATTEMPTS, is one whose
%%%     run crashed or that the program answered `internal` (a bug).
%%%   - Carrying an entry out twice is harmless, which is what lets a run
%%%     that may have half-happened be run again: the state machine
%%%     (roster_port/subscription.py) reaches the same state from a repeated
%%%     presence and answers route or deliver as the first time, and the
%%%     contact's server treats a repeated presence the same way.
%%%   - This process never calls the program nor routes anything: runs are
%%%     made by processes it spawns (the `apply` function: roster_port_effects
%%%     replay/3 in ejabberd), so that a run whose routing reaches a hook that
%%%     appends here cannot deadlock, and a slow run never delays an append.
%%%   - At most max_entries entries are held; an append beyond gets
%%%     {error, full} and its caller refuses the presence (nothing applied).
%%%
%%% Durability: an entry is written and synced (fsync, ~0.1 ms here) before
%%% append/4 returns; "done" records are written without a sync, as losing
%%% one only means one harmless repeat after a crash. The file is emptied
%%% whenever no entry is held (the usual case: a presence is carried out in
%%% milliseconds) and rewritten with the live entries once it holds more than
%%% COMPACT_RECORDS records.
-module(roster_port_journal).
-behaviour(gen_server).

-export([child_spec/2, name/1, start_link/2, append/4, done/2, failed/3, status/1,
         retry_reason/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-include_lib("kernel/include/logger.hrl").

-define(RETRY_MIN_MS, 250).
-define(RETRY_MAX_MS, 1000).
-define(MAX_ATTEMPTS, 5).
-define(MAX_RUNNING, 16).
-define(TICK_MS, 100).
-define(COMPACT_RECORDS, 50000).
-define(APPEND_TIMEOUT_MS, 5000).
-define(LOG_MS, 10000).

-type seq() :: pos_integer().
-type opts() :: #{dir := file:filename_all(),
                  max_entries => pos_integer(),
                  %% Records in the file that make it rewritten (tests).
                  compact_records => pos_integer(),
                  apply := {module(), atom(), list()}}.

-record(state,
        {host :: binary(),
         log :: term(),
         file :: string(),
         apply :: {module(), atom(), list()},
         max_entries :: pos_integer(),
         compact_records :: pos_integer(),
         next_seq = 1 :: seq(),
         %% Seq => {User, Op, Args, Attempts}
         entries = #{} :: #{seq() => {binary(), binary(), map(), non_neg_integer()}},
         %% User => its entries' Seq, the head first (a few: a list)
         queues = #{} :: #{binary() => [seq()]},
         %% Entries appended by the process running their user's head, while
         %% it ran: Seq => the head's Seq (see append/4)
         nested = #{} :: #{seq() => seq()},
         %% User => what its head entry is doing (absent: waiting to be run)
         heads = #{} :: #{binary() => {caller, pid(), reference()}
                                     | {running, pid(), reference()}
                                     | {retry_at, integer()}},
         running = 0 :: non_neg_integer(),
         records = 0 :: non_neg_integer(),
         dropped = 0 :: non_neg_integer(),
         %% Entries journalled for later not logged yet, the last of them, and
         %% when that was last logged (log_journalled/1).
         journalled = 0 :: non_neg_integer(),
         journalled_last :: undefined | tuple(),
         logged_at :: undefined | integer(),
         tick :: undefined | reference()}).

%%%===================================================================
%%% API
%%%===================================================================

-spec child_spec(binary(), opts()) -> supervisor:child_spec().
child_spec(Host, Opts) ->
    #{id => {?MODULE, Host},
      start => {?MODULE, start_link, [Host, Opts]},
      restart => permanent,
      shutdown => 5000,
      type => worker}.

-spec name(binary()) -> atom().
name(Host) ->
    list_to_atom("roster_port_journal_" ++ binary_to_list(Host)).

start_link(Host, Opts) ->
    gen_server:start_link({local, name(Host)}, ?MODULE, {Host, Opts}, []).

%% @doc Appends a subscription presence of User (a bare JID) for Op with
%% Args (a request of the program, "user" included), durably.
%% {run, Seq}: the caller runs it now and must say done/2 or failed/3;
%% queued: an earlier entry of User is not carried out yet, the journal will
%% run this one after it; {error, full | no_journal}: not kept.
-spec append(binary(), binary(), binary(), map()) ->
          {run, seq()} | queued | {error, full | no_journal}.
append(Host, User, Op, Args) ->
    try gen_server:call(name(Host), {append, User, Op, Args}, ?APPEND_TIMEOUT_MS)
    catch exit:_ -> {error, no_journal}
    end.

%% @doc The entry run by its caller is carried out (or refused for good by
%% the program: nothing more can be done with it).
-spec done(binary(), seq()) -> ok.
done(Host, Seq) ->
    gen_server:cast(name(Host), {done, Seq}).

%% @doc The entry run by its caller failed with Error (a roster_port_call
%% error); the journal retries it.
-spec failed(binary(), seq(), term()) -> ok.
failed(Host, Seq, Error) ->
    gen_server:cast(name(Host), {failed, Seq, Error}).

-spec status(binary()) -> undefined | map().
status(Host) ->
    try gen_server:call(name(Host), status, 5000)
    catch exit:_ -> undefined
    end.

%% @doc Whether a failed call may succeed if made again (and why), or not.
-spec retry_reason(term()) -> {retry, atom()} | final.
retry_reason({error, unavailable}) -> {retry, unavailable};
retry_reason({error, timeout}) -> {retry, timeout};
retry_reason({error, {program, #{<<"code">> := Code}}}) ->
    case Code of
        <<"store_unavailable">> -> {retry, store_unavailable};
        <<"timeout">> -> {retry, timeout};
        <<"overloaded">> -> {retry, overloaded};
        <<"internal">> -> {retry, internal};
        _ -> final
    end;
retry_reason(_) -> final.

%%%===================================================================
%%% gen_server callbacks
%%%===================================================================

init({Host, #{dir := Dir, apply := Apply} = Opts}) ->
    process_flag(trap_exit, true),
    File = filename:join(unicode:characters_to_list(Dir),
                         "roster_port_journal_" ++ binary_to_list(Host) ++ ".LOG"),
    %% A compaction that did not finish left its copy: the original is whole.
    _ = file:delete(File ++ ".compact"),
    case open_log(log_name(Host), File) of
        {ok, Log} ->
            State0 = #state{host = Host, log = Log, file = File, apply = Apply,
                            max_entries = maps:get(max_entries, Opts, 100000),
                            compact_records = maps:get(compact_records, Opts,
                                                       ?COMPACT_RECORDS)},
            State = recover(State0),
            case maps:size(State#state.entries) of
                0 -> ok;
                N -> ?LOG_WARNING("roster-port ~ts: the journal holds ~B subscription "
                                  "presences not carried out before ejabberd stopped; "
                                  "carrying them out now", [Host, N])
            end,
            {ok, kick(State)};
        {error, Reason} ->
            ?LOG_ERROR("roster-port ~ts: cannot open the journal ~ts: ~p",
                       [Host, File, Reason]),
            {stop, {journal, File, Reason}}
    end.

handle_call({append, _User, _Op, _Args}, _From,
            #state{entries = Entries, max_entries = Max} = State)
  when map_size(Entries) >= Max ->
    State1 = State#state{dropped = State#state.dropped + 1},
    ?LOG_ERROR("roster-port ~ts: the journal holds its maximum of ~B subscription "
               "presences; refused a new one", [State#state.host, Max]),
    {reply, {error, full}, State1};
handle_call({append, User, Op, Args}, {Caller, _}, #state{next_seq = Seq} = State) ->
    case write(State, {e, Seq, User, Op, Args}, sync) of
        {ok, State1} ->
            Queue = maps:get(User, State1#state.queues, []),
            State2 = State1#state{next_seq = Seq + 1,
                                  entries = (State1#state.entries)#{Seq => {User, Op, Args, 0}}},
            Queues = State2#state.queues,
            case {Queue, maps:get(User, State2#state.heads, idle)} of
                {[], _} ->
                    Heads = (State2#state.heads)#{User => {caller, Caller,
                                                           monitor(process, Caller)}},
                    {reply, {run, Seq}, State2#state{heads = Heads, queues = Queues#{User => [Seq]}}};
                {[Head | Rest], {Kind, Caller, _}} when Kind == caller; Kind == running ->
                    %% Appended by the process running User's head, while it
                    %% runs: caused by it (an automatic answer to the presence
                    %% it routed), so it comes right after it, before User's
                    %% later entries, and that process runs it now.
                    {Before, After} = lists:splitwith(
                                        fun(S) -> maps:get(S, State2#state.nested, 0) == Head end,
                                        Rest),
                    {reply, {run, Seq},
                     State2#state{queues = Queues#{User => [Head | Before ++ [Seq | After]]},
                                  nested = (State2#state.nested)#{Seq => Head}}};
                _ ->
                    {reply, queued, State2#state{queues = Queues#{User => Queue ++ [Seq]}}}
            end;
        {error, Reason} ->
            ?LOG_ERROR("roster-port ~ts: cannot write to the journal ~ts: ~p",
                       [State#state.host, State#state.file, Reason]),
            {reply, {error, no_journal}, State}
    end;
handle_call(status, _From, State) ->
    Retrying = length([x || {retry_at, _} <- maps:values(State#state.heads)]),
    {reply, #{pending => maps:size(State#state.entries),
              users => maps:size(State#state.queues),
              running => State#state.running,
              retrying => Retrying,
              dropped => State#state.dropped,
              file => State#state.file}, State};
handle_call(_Request, _From, State) ->
    {reply, {error, badarg}, State}.

handle_cast({done, Seq}, State) ->
    {noreply, kick(caller_ended(Seq, done, State))};
handle_cast({failed, Seq, Error}, State) ->
    {noreply, kick(caller_ended(Seq, {failed, Error}, State))};
handle_cast(_Msg, State) ->
    {noreply, State}.

handle_info({'DOWN', MRef, process, Pid, Reason}, State) ->
    {noreply, kick(process_down(MRef, Pid, Reason, State))};
handle_info(tick, State) ->
    {noreply, kick(log_journalled(State#state{tick = undefined}))};
handle_info(_Info, State) ->
    {noreply, State}.

terminate(_Reason, #state{log = Log}) ->
    _ = disk_log:close(Log),
    ok.

%%%===================================================================
%%% Carrying entries out
%%%===================================================================

%% The caller of append/4 that got {run, Seq} has ended it.
caller_ended(Seq, Outcome, State) ->
    case maps:find(Seq, State#state.entries) of
        {ok, {User, _, _, _}} ->
            case {maps:find(User, State#state.heads), maps:get(User, State#state.queues)} of
                {{ok, {caller, _, MRef}}, [Seq | _]} -> demonitor(MRef, [flush]);
                _ -> ok
            end,
            ended(User, Seq, Outcome, State);
        error ->
            State
    end.

process_down(MRef, Pid, Reason, State) ->
    case [{U, H} || {U, H} <- maps:to_list(State#state.heads),
                    H == {caller, Pid, MRef} orelse H == {running, Pid, MRef}] of
        [{User, Head}] ->
            [Seq | _] = maps:get(User, State#state.queues),
            case Head of
                {running, _, _} ->
                    Outcome = case Reason of
                                  {shutdown, {ran, Result}} -> Result;
                                  _ -> {crashed, Reason}
                              end,
                    ended(User, Seq, Outcome, State#state{running = State#state.running - 1});
                {caller, _, _} ->
                    %% The caller died before it could say: run it again.
                    ended(User, Seq, {retry, caller_died}, State)
            end;
        [] ->
            State
    end.

%% The head entry Seq of User has ended with Outcome (what the caller said,
%% or what the `apply` function returned: ok | {retry, Why} | {dropped,
%% Why}): carried out, to be retried, or refused for good.
ended(User, Seq, Outcome, State) ->
    {_, Op, Args, Attempts} = maps:get(Seq, State#state.entries),
    case outcome(Outcome) of
        done when Attempts > 0 ->
            ?LOG_INFO("roster-port ~ts: ~ts for ~ts (~ts ~ts) carried out after ~B attempts",
                      [State#state.host, Op, User, maps:get(<<"type">>, Args, <<"?">>),
                       maps:get(<<"contact">>, Args, <<"?">>), Attempts + 1]),
            forget(User, Seq, State);
        done ->
            forget(User, Seq, State);
        {retry, Why} when (Why /= internal andalso Why /= crashed)
                          orelse Attempts + 1 < ?MAX_ATTEMPTS ->
            Delay = min(?RETRY_MAX_MS, ?RETRY_MIN_MS bsl min(Attempts, 8)),
            ?LOG_DEBUG("roster-port ~ts: ~ts for ~ts not carried out (~p); retrying in ~B ms",
                       [State#state.host, Op, User, Why, Delay]),
            Entries = (State#state.entries)#{Seq => {User, Op, Args, Attempts + 1}},
            State1 = case Attempts of
                         0 -> log_journalled({Op, User, Args, Why}, State);
                         _ -> State
                     end,
            case maps:get(User, State1#state.queues) of
                [Seq | _] ->
                    Heads = (State1#state.heads)#{User => {retry_at, now_ms() + Delay}},
                    State1#state{entries = Entries, heads = Heads};
                _ ->
                    %% A nested entry: run again once its head is done.
                    State1#state{entries = Entries}
            end;
        _Final ->
            ?LOG_ERROR("roster-port ~ts: dropped ~ts for ~ts (~ts from/to ~ts) after ~B "
                       "attempts: ~p",
                       [State#state.host, Op, User, maps:get(<<"type">>, Args, <<"?">>),
                        maps:get(<<"contact">>, Args, <<"?">>), Attempts + 1, Outcome]),
            forget(User, Seq, State#state{dropped = State#state.dropped + 1})
    end.

%% Presences that could not be carried out at once are logged at most once
%% per LOG_MS, counted: an outage must not flood the log.
log_journalled(Last, #state{journalled = N} = State) ->
    log_journalled(State#state{journalled = N + 1, journalled_last = Last}).

log_journalled(#state{journalled = 0} = State) ->
    State;
log_journalled(#state{journalled = N, journalled_last = {Op, User, Args, Why},
                      logged_at = At} = State) ->
    Now = now_ms(),
    case At == undefined orelse Now - At >= ?LOG_MS of
        true ->
            ?LOG_WARNING("roster-port ~ts: ~B subscription presence~ts not carried out at once "
                         "(the last: ~ts for ~ts, ~ts ~ts: ~p); journalled, each is retried "
                         "until it is (~B held)",
                         [State#state.host, N, case N of 1 -> ""; _ -> "s" end, Op, User,
                          maps:get(<<"type">>, Args, <<"?">>),
                          maps:get(<<"contact">>, Args, <<"?">>), Why,
                          maps:size(State#state.entries)]),
            State#state{journalled = 0, logged_at = Now};
        false ->
            State
    end.

outcome(done) -> done;
outcome(ok) -> done;
outcome({failed, {crashed, _}}) -> {retry, crashed};
outcome({failed, Error}) ->
    case retry_reason(Error) of
        {retry, Why} -> {retry, Why};
        final -> done    % refused by the program: its caller has said so
    end;
outcome({retry, Why}) -> {retry, Why};
outcome({dropped, Why}) -> {dropped, Why};
outcome({crashed, _}) -> {retry, crashed};
outcome(_) -> {retry, crashed}.

%% The entry is carried out: off the user's queue; the next one, if any,
%% waits for kick/1.
forget(User, Seq, State) ->
    State1 = case write(State, {d, Seq}, nosync) of
                 {ok, S} -> S;
                 {error, _} -> State
             end,
    Heads = case maps:get(User, State1#state.queues) of
                [Seq | _] -> maps:remove(User, State1#state.heads);
                _ -> State1#state.heads    % a nested one, done before its head
            end,
    Queues = case lists:delete(Seq, maps:get(User, State1#state.queues)) of
                 [] -> maps:remove(User, State1#state.queues);
                 Queue -> (State1#state.queues)#{User => Queue}
             end,
    %% Once its head is done, a nested entry left is an ordinary one.
    Nested = maps:filter(fun(_, Head) -> Head /= Seq end,
                         maps:remove(Seq, State1#state.nested)),
    compact(State1#state{entries = maps:remove(Seq, State1#state.entries), heads = Heads,
                         queues = Queues, nested = Nested}).

%% Starts runs for the users whose head entry waits (never run, or due for
%% a retry), at most MAX_RUNNING at a time, and keeps a tick while any waits.
kick(State0) ->
    Now = now_ms(),
    Waiting = [{User, Head} || User <- maps:keys(State0#state.queues),
                               Head <- [maps:get(User, State0#state.heads, idle)],
                               Head == idle orelse element(1, Head) == retry_at],
    State = lists:foldl(
              fun({User, Head}, S) when S#state.running < ?MAX_RUNNING ->
                      case Head of
                          {retry_at, At} when At > Now -> S;
                          _ -> run(User, S)
                      end;
                 (_, S) ->
                      S
              end, State0, Waiting),
    Left = [x || {User, _} <- Waiting,
                 case maps:get(User, State#state.heads, idle) of
                     {running, _, _} -> false;
                     _ -> true
                 end],
    case {Left, State#state.tick} of
        {[], _} -> State;
        {_, undefined} -> State#state{tick = erlang:send_after(?TICK_MS, self(), tick)};
        _ -> State
    end.

run(User, #state{apply = {M, F, A}} = State) ->
    [Seq | _] = maps:get(User, State#state.queues),
    {User, Op, Args, _} = maps:get(Seq, State#state.entries),
    {Pid, MRef} = spawn_monitor(
                    fun() ->
                            Result = apply(M, F, A ++ [Op, Args]),
                            exit({shutdown, {ran, Result}})
                    end),
    State#state{heads = (State#state.heads)#{User => {running, Pid, MRef}},
                running = State#state.running + 1}.

%%%===================================================================
%%% The file
%%%===================================================================

log_name(Host) ->
    {?MODULE, Host}.

open_log(Name, File) ->
    ok = filelib:ensure_dir(File),
    case disk_log:open([{name, Name}, {file, File}, {type, halt}, {format, internal},
                        {repair, true}]) of
        {ok, Log} -> {ok, Log};
        {repaired, Log, {recovered, _}, {badbytes, 0}} -> {ok, Log};
        {repaired, Log, {recovered, N}, {badbytes, Bad}} ->
            ?LOG_WARNING("roster-port: the journal ~ts was cut short (a crash while "
                         "writing?): ~B records kept, ~B bytes dropped", [File, N, Bad]),
            {ok, Log};
        {error, _} = Error -> Error
    end.

write(#state{log = Log} = State, Record, Sync) ->
    case disk_log:log(Log, Record) of
        ok when Sync == sync ->
            case disk_log:sync(Log) of
                ok -> {ok, State#state{records = State#state.records + 1}};
                {error, _} = Error -> Error
            end;
        ok ->
            {ok, State#state{records = State#state.records + 1}};
        {error, _} = Error ->
            Error
    end.

%% Rebuilds the entries not carried out from the records of the file.
recover(#state{log = Log} = State) ->
    {Entries, Done, MaxSeq, Records} = read_all(Log, start, #{}, #{}, 0, 0),
    Live = maps:without(maps:keys(Done), Entries),
    Queues = lists:foldl(
               fun({Seq, {User, _, _, _}}, Q) ->
                       maps:update_with(User, fun(Queue) -> Queue ++ [Seq] end, [Seq], Q)
               end, #{}, lists:sort(maps:to_list(Live))),
    compact(State#state{entries = Live, queues = Queues, next_seq = MaxSeq + 1,
                        records = Records}).

read_all(Log, Cont, Entries, Done, MaxSeq, N) ->
    case disk_log:chunk(Log, Cont) of
        eof ->
            {Entries, Done, MaxSeq, N};
        {error, Reason} ->
            ?LOG_ERROR("roster-port: reading the journal failed: ~p; the rest is lost",
                       [Reason]),
            {Entries, Done, MaxSeq, N};
        {Cont1, Terms} ->
            read_all1(Log, Cont1, Terms, Entries, Done, MaxSeq, N);
        {Cont1, Terms, _BadBytes} ->
            read_all1(Log, Cont1, Terms, Entries, Done, MaxSeq, N)
    end.

read_all1(Log, Cont, Terms, Entries0, Done0, Max0, N0) ->
    {Entries, Done, Max, N} =
        lists:foldl(
          fun({e, Seq, User, Op, Args}, {E, D, M, C}) ->
                  {E#{Seq => {User, Op, Args, 0}}, D, max(M, Seq), C + 1};
             ({d, Seq}, {E, D, M, C}) ->
                  {E, D#{Seq => true}, M, C + 1};
             (_, Acc) ->
                  Acc
          end, {Entries0, Done0, Max0, N0}, Terms),
    read_all(Log, Cont, Entries, Done, Max, N).

%% An empty journal is truncated; one with many records rewritten with its
%% live entries only (into a copy renamed over it: a crash leaves one whole
%% file or the other).
compact(#state{entries = Entries, log = Log} = State) when map_size(Entries) == 0 ->
    case State#state.records of
        0 -> State;
        _ ->
            case disk_log:truncate(Log) of
                ok -> State#state{records = 0};
                {error, _} -> State
            end
    end;
compact(#state{records = Records, compact_records = Max} = State) when Records < Max ->
    State;
compact(#state{log = Log, file = File, host = Host, entries = Entries} = State) ->
    Copy = File ++ ".compact",
    CopyName = {?MODULE, compact, Host},
    Result =
        try
            {ok, CopyLog} = open_log(CopyName, Copy),
            lists:foreach(fun({Seq, {User, Op, Args, _}}) ->
                                  ok = disk_log:log(CopyLog, {e, Seq, User, Op, Args})
                          end, lists:sort(maps:to_list(Entries))),
            ok = disk_log:sync(CopyLog),
            ok = disk_log:close(CopyLog),
            ok = disk_log:close(Log),
            ok = file:rename(Copy, File),
            open_log(log_name(Host), File)
        catch Class:Reason ->
                {error, {Class, Reason}}
        end,
    case Result of
        {ok, Log1} ->
            State#state{log = Log1, records = maps:size(Entries)};
        {error, Why} ->
            ?LOG_ERROR("roster-port ~ts: compacting the journal ~ts failed: ~p",
                       [Host, File, Why]),
            %% Reopened as it was, whichever step failed.
            _ = disk_log:close(CopyName),
            case open_log(log_name(Host), File) of
                {ok, Log2} -> State#state{log = Log2, records = 0};
                _ -> State
            end
    end.

now_ms() ->
    erlang:monotonic_time(millisecond).
