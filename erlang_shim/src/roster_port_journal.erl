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
%%%     entry, with none before it, is run by its caller at once (append/5
%%%     answers {run, Token}; the caller says done/2 or failed/3); any other
%%%     waits its turn and is run by the journal (append/5 answers queued),
%%%     and so is one whose caller stopped waiting for append/5.
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
%%%     as it takes: a presence is never dropped for being late. When the
%%%     program says its store is back (retry_now/1, on its feed_resumed
%%%     after an outage), every entry waiting for a retry is run at once. One that
%%%     cannot succeed (the program refused it: a bad contact, a full roster)
%%%     is dropped with a log line, and so, after MAX_ATTEMPTS, is one whose
%%%     run crashed or that the program answered `internal` (a bug).
%%%   - Carrying an entry out twice is harmless, which is what lets a run
%%%     that may have half-happened be run again: the state machine
%%%     (roster_port/subscription.py) reaches the same state from a repeated
%%%     presence and routes it as the first time (an inbound one sent with
%%%     `replay` is delivered again when the state shows it applied), and
%%%     the contact's server treats a repeated presence the same way. A run
%%%     waits for the worker's runner before it carries anything out, so the
%%%     effects of an earlier run's late answer come before it.
%%%   - Tokens name an entry of one instance (its epoch): done/failed of a
%%%     caller of the instance before a restart name nothing, the entry is
%%%     read back from the file and run again. Runs are linked: they end with
%%%     the instance that started them.
%%%   - This process never calls the program nor routes anything: runs are
%%%     made by processes it spawns (the `apply` function: roster_port_effects
%%%     replay/3 in ejabberd), so that a run whose routing reaches a hook that
%%%     appends here cannot deadlock, and a slow run never delays an append.
%%%   - At most max_entries entries are held, max_user_entries of one user;
%%%     an append beyond gets {error, full} and its caller refuses the
%%%     presence (nothing applied). Events cost O(log n): users ready to run
%%%     are queued, retries kept in a set ordered by time.
%%%
%%% Durability: an entry is written and synced (fsync, ~0.1 ms here) before
%%% append/5 returns; "done" records are written without a sync, as losing
%%% one only means one harmless repeat after a crash. The file is emptied
%%% whenever no entry is held (the usual case: a presence is carried out in
%%% milliseconds) and rewritten with the live entries once it holds more than
%%% COMPACT_RECORDS records and twice as many as live entries. An entry
%%% records the head it was nested in, so the order survives a restart.
-module(roster_port_journal).
-behaviour(gen_server).

-export([child_spec/2, name/1, start_link/2, append/5, append/6, done/2, failed/3,
         status/1, retry_reason/1, retry_now/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-include_lib("kernel/include/logger.hrl").

-define(RETRY_MIN_MS, 250).
-define(RETRY_MAX_MS, 1000).
-define(MAX_ATTEMPTS, 5).
-define(MAX_RUNNING, 16).
-define(TICK_MS, 100).
-define(COMPACT_RECORDS, 50000).
%% Records an empty journal's file may hold before it is truncated (a
%% truncation costs more than a thousand appends; the file is read whole at
%% start only).
-define(TRUNCATE_RECORDS, 1000).
%% Entries of one user at most: a flood towards one user must not fill the
%% journal for everyone.
-define(MAX_USER_ENTRIES, 1000).
-define(LOG_MS, 10000).

-type seq() :: pos_integer().
%% A run's entry, as its caller names it to done/2 and failed/3: the Seq and
%% the journal instance's epoch.
-opaque token() :: {reference(), seq()}.
-export_type([token/0]).
-type opts() :: #{dir := file:filename_all(),
                  max_entries => pos_integer(),
                  max_user_entries => pos_integer(),
                  %% Records in the file that make it rewritten (tests).
                  compact_records => pos_integer(),
                  apply := {module(), atom(), list()}}.

-record(state,
        {host :: binary(),
         log :: term(),
         file :: string(),
         apply :: {module(), atom(), list()},
         max_entries :: pos_integer(),
         max_user_entries :: pos_integer(),
         compact_records :: pos_integer(),
         retry_min_ms :: pos_integer(),
         retry_max_ms :: pos_integer(),
         %% Tokens of another instance (before a restart) name nothing here.
         epoch :: reference(),
         next_seq = 1 :: seq(),
         %% Seq => {User, Op, Args, Attempts}
         entries = #{} :: #{seq() => {binary(), binary(), map(), non_neg_integer()}},
         %% User => its entries' Seq, the head first (a few: a list)
         queues = #{} :: #{binary() => [seq()]},
         %% Entries appended by the process running their user's head, while
         %% it ran: Seq => the head's Seq (see append/5)
         nested = #{} :: #{seq() => seq()},
         %% User => what its head entry is doing (absent: waiting to be run)
         heads = #{} :: #{binary() => {caller, pid(), reference(), reference()}
                                     | {running, pid()}
                                     | {retry_at, integer()}},
         %% Who to find by what: a caller's monitor, a caller's append ref, a
         %% run's pid => the user.
         by_monitor = #{} :: #{reference() => binary()},
         by_ref = #{} :: #{reference() => binary()},
         runs = #{} :: #{pid() => binary()},
         %% Users whose head waits to be run, oldest first (a user may be in
         %% it twice: checked when taken), and those waiting for a retry.
         ready = queue:new() :: queue:queue(binary()),
         retries = gb_sets:empty() :: gb_sets:set({integer(), binary()}),
         %% Entries written without a sync (append/6), until they are done or
         %% synced.
         unsynced = #{} :: #{seq() => true},
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
%% Args (a request of the program, "user" included), durably, waiting at
%% most Timeout ms for the journal. {run, Token}: the caller runs it now and
%% must say done/2 or failed/3 with Token; queued: the journal will run it
%% (an earlier entry of User is not carried out yet, or the journal was too
%% slow to answer: the caller must neither route nor deliver it);
%% {error, full}: not kept, refuse it; {error, no_journal}: no journal runs.
-spec append(binary(), binary(), binary(), map(), timeout()) ->
          {run, token()} | queued | {error, full | no_journal}.
append(Host, User, Op, Args, Timeout) ->
    append(Host, User, Op, Args, Timeout, false).

%% @doc append/5, for a caller that runs an entry itself (Covered): an entry
%% it gets to run at once is not synced to disk. Until it is done, the entry
%% the caller runs covers it: a crash before then runs that entry again,
%% which makes this presence again. If it fails (or the caller gives up on
%% it, or dies), it is synced then, before it is retried.
-spec append(binary(), binary(), binary(), map(), timeout(), boolean()) ->
          {run, token()} | queued | {error, full | no_journal}.
append(Host, User, Op, Args, Timeout, Covered) ->
    Ref = make_ref(),
    try gen_server:call(name(Host), {append, Ref, User, Op, Args, Covered}, max(1, Timeout))
    catch
        exit:{timeout, _} ->
            %% Appended or about to be: this cast comes after the append
            %% (same sender), and gives the entry to the journal to run.
            gen_server:cast(name(Host), {abandoned, Ref}),
            queued;
        exit:_ ->
            {error, no_journal}
    end.

%% @doc The entry run by its caller is carried out (or refused for good by
%% the program: nothing more can be done with it).
-spec done(binary(), token()) -> ok.
done(Host, Token) ->
    gen_server:cast(name(Host), {done, Token}).

%% @doc The entry run by its caller failed with Error (a roster_port_call
%% error); the journal retries it if Error may heal.
-spec failed(binary(), token(), term()) -> ok.
failed(Host, Token, Error) ->
    gen_server:cast(name(Host), {failed, Token, Error}).

%% @doc Runs every entry waiting for its retry now: what made them fail may
%% have healed (the program's store is reachable again). A journal that is
%% not running ignores it.
-spec retry_now(binary()) -> ok.
retry_now(Host) ->
    gen_server:cast(name(Host), retry_now).

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
                            epoch = make_ref(),
                            max_entries = maps:get(max_entries, Opts, 100000),
                            max_user_entries = maps:get(max_user_entries, Opts,
                                                        ?MAX_USER_ENTRIES),
                            compact_records = maps:get(compact_records, Opts,
                                                       ?COMPACT_RECORDS),
                            retry_min_ms = maps:get(retry_min_ms, Opts, ?RETRY_MIN_MS),
                            retry_max_ms = maps:get(retry_max_ms, Opts, ?RETRY_MAX_MS)},
            State = recover(State0),
            case maps:size(State#state.entries) of
                0 -> ok;
                N -> ?LOG_WARNING("roster-port ~ts: the journal holds ~B subscription "
                                  "presences not carried out before it stopped; "
                                  "carrying them out now", [Host, N])
            end,
            {ok, kick(State)};
        {error, Reason} ->
            ?LOG_ERROR("roster-port ~ts: cannot open the journal ~ts: ~p",
                       [Host, File, Reason]),
            {stop, {journal, File, Reason}}
    end.

handle_call({append, _Ref, User, _Op, _Args, _Covered}, _From,
            #state{entries = Entries, max_entries = Max, max_user_entries = UserMax} = State)
  when map_size(Entries) >= Max ->
    {reply, {error, full}, refused(User, Max, UserMax, State)};
handle_call({append, Ref, User, Op, Args, Covered}, {Caller, _},
            #state{next_seq = Seq} = State) ->
    Queue = maps:get(User, State#state.queues, []),
    Nested = case {Queue, maps:get(User, State#state.heads, idle)} of
                 {[Head | _], {caller, Caller, _, _}} -> Head;
                 {[Head | _], {running, Caller}} -> Head;
                 _ -> undefined
             end,
    UserMax = State#state.max_user_entries,
    case length(Queue) >= UserMax andalso Nested == undefined of
        true ->
            {reply, {error, full}, refused(User, State#state.max_entries, UserMax, State)};
        false ->
            append1(Ref, User, Op, Args, Caller, Seq, Queue, Nested, Covered, State)
    end;
handle_call(status, _From, State) ->
    {reply, #{pending => maps:size(State#state.entries),
              users => maps:size(State#state.queues),
              running => maps:size(State#state.runs),
              retrying => gb_sets:size(State#state.retries),
              dropped => State#state.dropped,
              file => State#state.file}, State};
handle_call(_Request, _From, State) ->
    {reply, {error, badarg}, State}.

handle_cast({done, {Epoch, Seq}}, #state{epoch = Epoch} = State) ->
    {noreply, kick(caller_ended(Seq, done, State))};
handle_cast({failed, {Epoch, Seq}, Error}, #state{epoch = Epoch} = State) ->
    {noreply, kick(caller_ended(Seq, {failed, Error}, State))};
handle_cast({abandoned, Ref}, State) ->
    {noreply, kick(abandoned(Ref, State))};
handle_cast(retry_now, State) ->
    {noreply, kick(due_retries(State, infinity))};
handle_cast(_Msg, State) ->
    %% done/failed of another instance: whatever it was is read from the
    %% file again and run by this one.
    {noreply, State}.

handle_info({'DOWN', MRef, process, _Pid, _Reason}, State) ->
    {noreply, kick(caller_down(MRef, State))};
handle_info({'EXIT', Pid, Reason}, State) ->
    {noreply, kick(run_ended(Pid, Reason, State))};
handle_info(tick, State) ->
    {noreply, kick(log_journalled(due_retries(State#state{tick = undefined})))};
handle_info(_Info, State) ->
    {noreply, State}.

terminate(_Reason, #state{log = Log, runs = Runs}) ->
    %% Runs are linked: they end with the journal, so that the next one
    %% never runs an entry twice at once.
    _ = [exit(Pid, kill) || Pid <- maps:keys(Runs)],
    _ = disk_log:close(Log),
    ok.

%%%===================================================================
%%% Appending
%%%===================================================================

append1(Ref, User, Op, Args, Caller, Seq, Queue, Nested, Covered, State0) ->
    %% Covered and run at once by its caller: synced only if it fails
    %% (append/6).
    RunNow = Queue == [] orelse Nested /= undefined,
    {Sync, State} = case Covered andalso RunNow of
                        true -> {nosync, State0#state{unsynced = (State0#state.unsynced)#{Seq => true}}};
                        false -> {sync, State0}
                    end,
    case write(State, {e, Seq, User, Op, Args, Nested}, Sync) of
        {ok, State1} ->
            State2 = State1#state{next_seq = Seq + 1,
                                  entries = (State1#state.entries)#{Seq => {User, Op, Args, 0}}},
            Queues = State2#state.queues,
            Token = {State#state.epoch, Seq},
            case {Queue, Nested} of
                {[], _} ->
                    MRef = monitor(process, Caller),
                    {reply, {run, Token},
                     State2#state{heads = (State2#state.heads)#{User => {caller, Caller, MRef, Ref}},
                                  by_monitor = (State2#state.by_monitor)#{MRef => User},
                                  by_ref = (State2#state.by_ref)#{Ref => User},
                                  queues = Queues#{User => [Seq]}}};
                {[Head | Rest], Head} ->
                    %% Appended by the process running User's head, while it
                    %% runs: caused by it (an automatic answer to the presence
                    %% it routed), so it comes right after it (and the entries
                    %% so caused before it), before User's later entries, and
                    %% that process runs it now.
                    {Before, After} = lists:splitwith(
                                        fun(S) -> maps:get(S, State2#state.nested, 0) == Head end,
                                        Rest),
                    {reply, {run, Token},
                     State2#state{queues = Queues#{User => [Head | Before ++ [Seq | After]]},
                                  nested = (State2#state.nested)#{Seq => Head}}};
                _ ->
                    {reply, queued, State2#state{queues = Queues#{User => Queue ++ [Seq]}}}
            end;
        {error, Reason} ->
            ?LOG_ERROR("roster-port ~ts: cannot write to the journal ~ts: ~p",
                       [State#state.host, State#state.file, Reason]),
            {reply, {error, no_journal}, State}
    end.

refused(User, Max, UserMax, State) ->
    ?LOG_ERROR("roster-port ~ts: the journal holds its maximum of subscription presences "
               "(~B in all, ~B for one user); refused one for ~ts",
               [State#state.host, Max, UserMax, User]),
    State#state{dropped = State#state.dropped + 1}.

%%%===================================================================
%%% Carrying entries out
%%%===================================================================

%% The caller of append/5 that got {run, Token} has ended it.
caller_ended(Seq, Outcome, State) ->
    case maps:find(Seq, State#state.entries) of
        {ok, {User, _, _, _}} ->
            State1 = case {maps:find(User, State#state.heads), maps:get(User, State#state.queues)} of
                         {{ok, {caller, _, MRef, Ref}}, [Seq | _]} -> forget_caller(MRef, Ref, State);
                         _ -> State
                     end,
            ended(User, Seq, Outcome, State1);
        error ->
            State
    end.

forget_caller(MRef, Ref, State) ->
    demonitor(MRef, [flush]),
    State#state{by_monitor = maps:remove(MRef, State#state.by_monitor),
                by_ref = maps:remove(Ref, State#state.by_ref)}.

%% The caller of a user's head died before it said how its run ended: run
%% it again.
caller_down(MRef, State) ->
    case maps:find(MRef, State#state.by_monitor) of
        {ok, User} ->
            {caller, _, MRef, Ref} = maps:get(User, State#state.heads),
            [Seq | _] = maps:get(User, State#state.queues),
            ended(User, Seq, {retry, caller_died}, forget_caller(MRef, Ref, State));
        error ->
            State
    end.

%% The caller gave up waiting for append/5: if the entry became its user's
%% head (the caller's to run), the journal runs it instead.
abandoned(Ref, State) ->
    case maps:find(Ref, State#state.by_ref) of
        {ok, User} ->
            {caller, _, MRef, Ref} = maps:get(User, State#state.heads),
            State1 = make_durable(forget_caller(MRef, Ref, State)),
            ready(User, State1#state{heads = maps:remove(User, State1#state.heads)});
        error ->
            State
    end.

run_ended(Pid, Reason, State) ->
    case maps:take(Pid, State#state.runs) of
        {User, Runs} ->
            [Seq | _] = maps:get(User, State#state.queues),
            Outcome = case Reason of
                          {shutdown, {ran, Result}} -> Result;
                          _ -> {crashed, Reason}
                      end,
            ended(User, Seq, Outcome, State#state{runs = Runs,
                                                  heads = maps:remove(User, State#state.heads)});
        error ->
            State
    end.

%% The entry Seq of User (its head, or one nested in the head's run) has
%% ended with Outcome (what the caller said, or what the `apply` function
%% returned: ok | {retry, Why} | {dropped, Why}): carried out, to be retried,
%% or refused for good.
ended(User, Seq, Outcome, State0) ->
    {_, Op, Args, Attempts} = maps:get(Seq, State0#state.entries),
    State = case outcome(Outcome) of
                done -> State0;
                _ -> make_durable(State0)
            end,
    IsHead = hd(maps:get(User, State#state.queues)) == Seq,
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
            Delay = min(State#state.retry_max_ms,
                        State#state.retry_min_ms bsl min(Attempts, 8)),
            ?LOG_DEBUG("roster-port ~ts: ~ts for ~ts not carried out (~p); retrying in ~B ms",
                       [State#state.host, Op, User, Why, Delay]),
            Entries = (State#state.entries)#{Seq => {User, Op, Args, Attempts + 1}},
            State1 = case Attempts of
                         0 -> log_journalled({Op, User, Args, Why}, State);
                         _ -> State
                     end,
            case IsHead of
                true ->
                    At = now_ms() + Delay,
                    State1#state{entries = Entries,
                                 heads = (State1#state.heads)#{User => {retry_at, At}},
                                 retries = gb_sets:add({At, User}, State1#state.retries)};
                false ->
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

%% The entry is carried out: off the user's queue; the user's next entry,
%% if the head went, is ready to run.
forget(User, Seq, State) ->
    State1 = case write(State, {d, Seq}, nosync) of
                 {ok, S} -> S;
                 {error, _} -> State
             end,
    [Head | _] = Queue0 = maps:get(User, State1#state.queues),
    Queue = lists:delete(Seq, Queue0),
    %% Once its head is done, a nested entry left is an ordinary one.
    Nested = case Head of
                 Seq -> maps:filter(fun(_, H) -> H /= Seq end, State1#state.nested);
                 _ -> State1#state.nested
             end,
    State2 = State1#state{entries = maps:remove(Seq, State1#state.entries),
                          nested = maps:remove(Seq, Nested),
                          unsynced = maps:remove(Seq, State1#state.unsynced)},
    State3 = case {Queue, Head} of
                 {[], _} ->
                     State2#state{queues = maps:remove(User, State2#state.queues),
                                  heads = maps:remove(User, State2#state.heads)};
                 {_, Seq} ->
                     ready(User, State2#state{queues = (State2#state.queues)#{User => Queue},
                                              heads = maps:remove(User, State2#state.heads)});
                 _ ->
                     %% A nested one, done before its head.
                     State2#state{queues = (State2#state.queues)#{User => Queue}}
             end,
    compact(State3).

ready(User, State) ->
    State#state{ready = queue:in(User, State#state.ready)}.

%% Entries written without a sync are synced: one of them will outlive the
%% run that covered it.
make_durable(#state{unsynced = Unsynced} = State) when map_size(Unsynced) == 0 ->
    State;
make_durable(#state{log = Log} = State) ->
    case disk_log:sync(Log) of
        ok -> ok;
        {error, Reason} ->
            ?LOG_ERROR("roster-port ~ts: syncing the journal ~ts failed: ~p",
                       [State#state.host, State#state.file, Reason])
    end,
    State#state{unsynced = #{}}.

%% Heads whose retry is due are ready to run.
due_retries(State) ->
    due_retries(State, now_ms()).

due_retries(State, Now) ->
    case gb_sets:is_empty(State#state.retries) of
        true ->
            State;
        false ->
            case gb_sets:take_smallest(State#state.retries) of
                {{At, User}, Retries} when At =< Now ->
                    State1 = State#state{retries = Retries},
                    due_retries(case maps:get(User, State1#state.heads, idle) of
                                    {retry_at, At} ->
                                        ready(User, State1#state{
                                                      heads = maps:remove(User, State1#state.heads)});
                                    _ ->
                                        State1
                                end, Now);
                _ ->
                    State
            end
    end.

%% Starts runs for the users ready, at most MAX_RUNNING at a time, and keeps
%% a timer for the next retry due.
kick(State0) ->
    State = start_runs(due_retries(State0)),
    case {gb_sets:is_empty(State#state.retries), State#state.tick} of
        {false, undefined} ->
            {At, _} = gb_sets:smallest(State#state.retries),
            Wait = max(?TICK_MS, At - now_ms()),
            State#state{tick = erlang:send_after(Wait, self(), tick)};
        {true, undefined} when State#state.journalled > 0 ->
            %% To log the count left (log_journalled/1).
            State#state{tick = erlang:send_after(?LOG_MS, self(), tick)};
        _ ->
            State
    end.

start_runs(#state{runs = Runs} = State) when map_size(Runs) >= ?MAX_RUNNING ->
    State;
start_runs(State) ->
    case queue:out(State#state.ready) of
        {empty, _} ->
            State;
        {{value, User}, Ready} ->
            State1 = State#state{ready = Ready},
            case {maps:find(User, State1#state.queues), maps:is_key(User, State1#state.heads)} of
                {{ok, [_ | _]}, false} -> start_runs(run(User, State1));
                _ -> start_runs(State1)
            end
    end.

run(User, #state{apply = {M, F, A}} = State) ->
    [Seq | _] = maps:get(User, State#state.queues),
    {User, Op, Args, _} = maps:get(Seq, State#state.entries),
    Pid = proc_lib:spawn_link(
            fun() ->
                    Result = apply(M, F, A ++ [Op, Args]),
                    exit({shutdown, {ran, Result}})
            end),
    State#state{heads = (State#state.heads)#{User => {running, Pid}},
                runs = (State#state.runs)#{Pid => User}}.

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

%% Rebuilds the entries not carried out from the records of the file, each
%% user's in their order: by Seq, but an entry nested in a head that is
%% still held right after it (append/5).
recover(#state{log = Log} = State) ->
    {Entries, Done, Parents, MaxSeq, Records} = read_all(Log, start, {#{}, #{}, #{}, 0, 0}),
    Live = maps:without(maps:keys(Done), Entries),
    Nested = maps:filter(fun(Seq, Parent) -> maps:is_key(Seq, Live) andalso maps:is_key(Parent, Live) end,
                         Parents),
    Queues = lists:foldl(
               fun({Seq, _}, Q) when is_map_key(Seq, Nested) ->
                       Q;
                  ({Seq, {User, _, _, _}}, Q) ->
                       Children = lists:sort([C || {C, P} <- maps:to_list(Nested), P == Seq]),
                       maps:update_with(User, fun(Queue) -> Queue ++ [Seq | Children] end,
                                        [Seq | Children], Q)
               end, #{}, lists:sort(maps:to_list(Live))),
    State1 = State#state{entries = Live, queues = Queues, nested = Nested,
                         next_seq = MaxSeq + 1, records = Records},
    compact(lists:foldl(fun ready/2, State1, maps:keys(Queues))).

read_all(Log, Cont, Acc) ->
    case disk_log:chunk(Log, Cont) of
        eof ->
            Acc;
        {error, Reason} ->
            ?LOG_ERROR("roster-port: reading the journal failed: ~p; the rest is lost",
                       [Reason]),
            Acc;
        {Cont1, Terms} ->
            read_all(Log, Cont1, lists:foldl(fun read_record/2, Acc, Terms));
        {Cont1, Terms, _BadBytes} ->
            read_all(Log, Cont1, lists:foldl(fun read_record/2, Acc, Terms))
    end.

read_record({e, Seq, User, Op, Args, Parent}, {E, D, P, M, C}) ->
    P1 = case Parent of
             undefined -> P;
             _ -> P#{Seq => Parent}
         end,
    {E#{Seq => {User, Op, Args, 0}}, D, P1, max(M, Seq), C + 1};
read_record({d, Seq}, {E, D, P, M, C}) ->
    {E, D#{Seq => true}, P, M, C + 1};
read_record(_, Acc) ->
    Acc.

%% An empty journal is truncated; one with many more records than live
%% entries rewritten with its live entries only (into a copy renamed over
%% it: a crash leaves one whole file or the other).
compact(#state{entries = Entries, log = Log, records = Records} = State)
  when map_size(Entries) == 0, Records >= ?TRUNCATE_RECORDS ->
    case disk_log:truncate(Log) of
        ok -> State#state{records = 0};
        {error, _} -> State
    end;
compact(#state{records = Records, compact_records = Max, entries = Entries} = State)
  when Records < Max; Records < 2 * map_size(Entries) ->
    State;
compact(#state{log = Log, file = File, host = Host, entries = Entries} = State) ->
    Copy = File ++ ".compact",
    CopyName = {?MODULE, compact, Host},
    _ = file:delete(Copy),
    Records = [{e, Seq, User, Op, Args, maps:get(Seq, State#state.nested, undefined)}
               || {Seq, {User, Op, Args, _}} <- lists:sort(maps:to_list(Entries))],
    Result =
        try
            {ok, CopyLog} = open_log(CopyName, Copy),
            ok = disk_log:log_terms(CopyLog, Records),
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
            State#state{log = Log1, records = length(Records)};
        {error, Why} ->
            ?LOG_ERROR("roster-port ~ts: compacting the journal ~ts failed: ~p",
                       [Host, File, Why]),
            %% Reopened as it was, whichever step failed.
            _ = disk_log:close(CopyName),
            _ = file:delete(Copy),
            case open_log(log_name(Host), File) of
                {ok, Log2} -> State#state{log = Log2};
                _ -> State
            end
    end.

now_ms() ->
    erlang:monotonic_time(millisecond).
