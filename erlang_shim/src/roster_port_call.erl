%%% @doc One request from ejabberd's side, and the conversion of its answer.
%%%
%%% call/4,5 is the only way the hooks, the roster IQ and the storage
%%% backend reach the program: it sends the request through the host's pool
%%% (roster_port_pool) and carries out the effects of the answer
%%% (roster_port_effects) in the calling process, in order, before it
%%% returns. A failure is returned, never raised: each caller picks its safe
%%% answer (docs/protocol.md).
%%%
%%% The conversions skip what names a JID ejabberd cannot parse, with one
%%% warning line each (README, "JIDs ejabberd cannot parse").
-module(roster_port_call).

-export([call/4, call/5, roster_items/3, records/4, log_skipped/3]).

-include("logger.hrl").

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
    User = <<LUser/binary, "@", LServer/binary>>,
    case roster_port_pool:call(LServer, User, Op, Args, CallOpts) of
        {ok, Result} = Ok ->
            roster_port_effects:run_effects(LServer, maps:get(<<"effects">>, Result, [])),
            Ok;
        {error, Reason} = Error ->
            ?DEBUG("roster-port: ~ts for ~ts failed: ~p", [Op, User, Reason]),
            Error
    end.
