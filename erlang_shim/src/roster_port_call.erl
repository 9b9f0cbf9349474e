%%% @doc One request from ejabberd's side, and the conversion of its answer.
%%%
%%% call/4,5 is the only way the hooks, the roster IQ and the storage
%%% backend reach the program: it sends the request through the host's pool
%%% (roster_port_pool) and carries out the effects of the answer
%%% (roster_port_effects) in the calling process, in order, before it
%%% returns. A failure is returned, never raised: each caller picks its safe
%%% answer (docs/protocol.md).
%%%
%%% What one hook may cost its process is bounded: the outermost call of a
%%% process sets a deadline (call_timeout from now) that every call nested in
%%% it shares (effects that route a presence to a local contact run that
%%% contact's hook in the same process; remove_user routes one per contact),
%%% so a hook never waits for the program much longer than call_timeout in
%%% all. A nested call past the deadline fails at once with {error,
%%% timeout}; a subscription presence so failed is carried out later by the
%%% journal.
%%%
%%% subscription/5 is the only way subscription presences reach the
%%% program: journalled first (roster_port_journal), so that each is carried
%%% out on both sides or on neither.
%%%
%%% The conversions skip what names a JID ejabberd cannot parse, with one
%%% warning line each (README, "JIDs ejabberd cannot parse").
-module(roster_port_call).

-export([call/4, call/5, subscription/5, within_deadline/2, as_journal_run/1,
         roster_items/3, records/4, log_skipped/3]).

-include("logger.hrl").

-define(DEADLINE, roster_port_hook_deadline).
%% Set while this process runs a journal entry (roster_port_journal:append/6).
-define(RUNNING, roster_port_journal_run).

%% The conversions of the program's answers that skip what names a JID
%% ejabberd cannot parse (a row another application wrote), one warning
%% line each: one bad row costs that item, never the user's whole answer.
roster_items(What, User, WireItems) ->
    {Items, Skipped} = roster_port_wire:roster_items(WireItems),
    log_skipped(What, User, Skipped),
    Items.

records(What, LUser, LServer, Maps) ->
    {Records, Skipped} = roster_port_wire:records(LUser, LServer, Maps),
    log_skipped(What, <<LUser/binary, "@", LServer/binary>>, Skipped),
    Records.

log_skipped(What, User, Skipped) ->
    lists:foreach(
      fun(J) ->
              ?WARNING_MSG("roster-port: skipped a ~ts for ~ts: ejabberd cannot parse the JID ~ts",
                           [What, User, roster_port_wire:printable(J)])
      end, Skipped).

call(LServer, LUser, Op, Args) ->
    call(LServer, LUser, Op, Args, #{}).

%% Sends one request and carries out the effects of its answer.
call(LServer, LUser, Op, Args, CallOpts) ->
    within_deadline(
      LServer,
      fun() -> do_call(LServer, LUser, Op, Args, CallOpts#{deadline => get(?DEADLINE)}) end).

%% @doc Runs Fun under the process's hook deadline: the one already set by an
%% outer call, or call_timeout from now.
-spec within_deadline(binary(), fun(() -> T)) -> T.
within_deadline(LServer, Fun) ->
    case get(?DEADLINE) of
        undefined ->
            Timeout = case roster_port_pool:settings(LServer) of
                          #{call_timeout := T} -> T;
                          _ -> 0
                      end,
            put(?DEADLINE, erlang:monotonic_time(millisecond) + Timeout),
            try Fun() after erase(?DEADLINE) end;
        _ ->
            Fun()
    end.

%% @doc A subscription presence of LUser's (Op: in_subscription or
%% out_subscription), journalled before it is sent. CarryOut(Result) does
%% what the program's answer says (route the presence, or deliver it) and is
%% part of the entry: the entry is done once CarryOut has returned.
%% {done, Value}: applied and carried out now (Value: what CarryOut
%% returned); later: not now, the journal carries it out when it can (the
%% caller must neither route nor deliver it); {error, Reason}: refused,
%% nothing applied (the program's refusal, or a full journal).
-spec subscription(binary(), binary(), binary(), map(), fun((map()) -> T)) ->
          {done, T} | later | {error, term()}.
subscription(LServer, LUser, Op, Args, CarryOut) ->
    User = <<LUser/binary, "@", LServer/binary>>,
    within_deadline(
      LServer,
      fun() ->
              Left = get(?DEADLINE) - erlang:monotonic_time(millisecond),
              Covered = get(?RUNNING) == true,
              case roster_port_journal:append(LServer, User, Op, Args#{<<"user">> => User},
                                              Left, Covered) of
                  {run, Token} ->
                      put(?RUNNING, true),
                      try run_entry(LServer, LUser, Op, Args, CarryOut, Token)
                      after
                          Covered orelse erase(?RUNNING)
                      end;
                  queued ->
                      later;
                  {error, full} = Full ->
                      Full;
                  {error, no_journal} ->
                      %% No journal process (it is restarting after a crash, a
                      %% bug logged by its supervisor): applied and carried out
                      %% now, or not at all.
                      ?ERROR_MSG("roster-port: no journal for ~ts; ~ts for ~ts sent "
                                 "without it", [LServer, Op, User]),
                      case call(LServer, LUser, Op, Args) of
                          {ok, Result} -> {done, CarryOut(Result)};
                          Error -> Error
                      end
              end
      end).

%% The entry's caller runs it: applied, then carried out (CarryOut), done.
run_entry(LServer, LUser, Op, Args, CarryOut, Token) ->
    case call(LServer, LUser, Op, Args) of
        {ok, Result} ->
            try CarryOut(Result) of
                Value ->
                    roster_port_journal:done(LServer, Token),
                    {done, Value}
            catch Class:Reason:Stack ->
                    roster_port_journal:failed(LServer, Token, {crashed, Reason}),
                    erlang:raise(Class, Reason, Stack)
            end;
        Error ->
            roster_port_journal:failed(LServer, Token, Error),
            case roster_port_journal:retry_reason(Error) of
                {retry, _} -> later;
                final -> Error
            end
    end.

%% @doc Runs Fun as the run of a journal entry (roster_port_effects:replay/3):
%% presences it makes are covered by that entry (roster_port_journal:append/6).
-spec as_journal_run(fun(() -> T)) -> T.
as_journal_run(Fun) ->
    Before = get(?RUNNING),
    put(?RUNNING, true),
    try Fun()
    after
        case Before of
            undefined -> erase(?RUNNING);
            _ -> put(?RUNNING, Before)
        end
    end.

do_call(LServer, LUser, Op, Args, CallOpts) ->
    User = <<LUser/binary, "@", LServer/binary>>,
    Counted = roster_port_metrics:request_started(LServer, Op),
    Reply = try roster_port_pool:call(LServer, User, Op, Args, CallOpts)
            catch Class:Crash:Stack ->
                    roster_port_metrics:request_done(Counted, {error, crashed}),
                    erlang:raise(Class, Crash, Stack)
            end,
    roster_port_metrics:request_done(Counted, Reply),
    case Reply of
        {ok, Result} = Ok ->
            roster_port_effects:run_effects(LServer, maps:get(<<"effects">>, Result, [])),
            Ok;
        {error, Reason} = Error ->
            ?DEBUG("roster-port: ~ts for ~ts failed: ~p", [Op, User, Reason]),
            Error
    end.
