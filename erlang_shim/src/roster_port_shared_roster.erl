%%% @doc mod_shared_roster's roster_out_subscription handler, as the takeover
%%% (roster_port_takeover) puts it in place of mod_shared_roster's own at
%%% sequence 30: mod_shared_roster's membership decision and nothing else.
%%%
%%% Why. mod_shared_roster 23.01's handler, for an outgoing `unsubscribed`,
%%% first calls mod_roster:out_subscription/1 (as an `unsubscribe`) and
%%% mod_roster:in_subscription/2 (the reverse) directly, for every contact,
%%% member or not: mod_roster's own state machine run on the program's
%%% store (db_type: port), after the program has applied the presence.
%%% A contact outside any shared group would lose the user's subscription
%%% to it as well (RFC 6121 3.2 cancels only the contact's), and get the
%%% presences that go with it. This handler keeps only what follows those
%%% calls in mod_shared_roster: `stop` when the contact is in one of the
%%% user's displayed groups (no other handler sees the presence), nothing
%%% otherwise. The decision is mod_shared_roster's own, asked through its
%%% exported roster_in_subscription handler with the presence turned round
%%% (which decides on the same membership, and changes nothing).
%%%
%%% Must never write anything, nor fail the hook: when mod_shared_roster
%%% cannot answer (stopping), the presence goes on as without it.
-module(roster_port_shared_roster).

-export([out_subscription/1]).

-include("xmpp.hrl").

-spec out_subscription(presence()) -> ok | stop.
out_subscription(#presence{from = #jid{} = From, to = #jid{} = To} = Pres) ->
    try mod_shared_roster:in_subscription(false, Pres#presence{from = To, to = From}) of
        {stop, _} -> stop;
        _ -> ok
    catch _:_ ->
            ok
    end;
out_subscription(_Pres) ->
    ok.
