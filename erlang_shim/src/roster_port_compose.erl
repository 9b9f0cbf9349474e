%%% @doc The roster a client sees: the program's items composed with what
%%% the other handlers of ejabberd's `roster_get` hook add (mod_shared_roster
%%% at 70: group members as subscription both, the group's label as roster
%%% group; mod_mix_pam at 50: the MIX channels), and the version of that
%%% composed roster. Roster IQ gets (roster_port_iq) and roster pushes
%%% (roster_port_effects) answer with it, so a client sees what presence
%%% broadcast (which runs the hook itself) already sees.
%%%
%%% The composition is the hook's own fold, run here with the program's
%%% items in the place of our handler's answer: every handler of roster_get
%%% on the host runs in the hook's order, with the hook's rules (`stop`,
%%% `{stop, V}`, a crash logged and skipped), except mod_roster_port_hooks'
%%% roster_get, whose part (the program's items) is given, and mod_roster's
%%% own handler, which would read the same store again (it is back for a
%%% moment only, while the takeover is being repaired). Then each item's
%%% groups lose their duplicates (mod_shared_roster appends the label to a
%%% user's own groups, which may hold it already).
%%%
%%% The version. The other handlers' part changes without any write to the
%%% program's store (a shared group gains a member, is relabelled or
%%% deleted), mostly with no push at all (mod_shared_roster 23.01 pushes
%%% nothing for set_group_opts, delete_group or a member's vCard), so it is
%%% never cached and never part of the program's version. A get's version
%%% is computed from the very roster it answers (one fold):
%%%   the composition changes nothing: the program's version (the answer
%%%       and its version are exactly the program's);
%%%   otherwise: ProgramVer "+" HEX(sha1(canonical(ComposedRoster))).
%%% A push cannot know what the client saw of the other handlers' part
%%% (a relabelling it was never pushed), so while they contribute anything
%%% for the user, a push carries ProgramVer "+push." Unique, which no get
%%% answers as current: the client's next get is a full roster, never a
%%% stale one declared current. When they contribute nothing for the user,
%%% the push carries the program's version, as without them.
%%%
%%% Nothing here writes anything, asks the program, or caches anything.
-module(roster_port_compose).

-export([active/1, compose/3, contribution/2, composed_ver/3, iq_answer/5,
         push_query/4]).

-include("logger.hrl").
-include("xmpp.hrl").

-define(OURS, {mod_roster_port_hooks, roster_get}).
-define(MOD_ROSTERS, {mod_roster, get_user_roster_items}).
-define(OUR_SEQ, 50).

%% @doc Whether another handler of roster_get runs on Host (when none does,
%% gets and pushes are the program's, untouched).
-spec active(binary()) -> boolean().
active(LServer) ->
    others(LServer) /= [].

others(LServer) ->
    [H || {_Seq, M, F} = H <- handlers(LServer), not lists:member({M, F}, [?OURS, ?MOD_ROSTERS])].

handlers(LServer) ->
    try ets:lookup(hooks, {roster_get, LServer}) of
        [{_, Ls}] -> Ls;
        [] -> []
    catch error:badarg -> []
    end.

%% @doc The composed roster of LUser: ProgramItems where our handler's answer
%% would be, the other handlers around them, groups without duplicates.
-spec compose(binary(), binary(), [#roster_item{}]) -> [#roster_item{}].
compose(LServer, LUser, ProgramItems) ->
    Run = lists:usort([{?OUR_SEQ, element(1, ?OURS), element(2, ?OURS)} | others(LServer)]),
    [I#roster_item{groups = unique(Gs)}
     || #roster_item{groups = Gs} = I <- fold(Run, [], {LUser, LServer}, ProgramItems)].

%% @doc What the other handlers add to an empty roster of LUser.
-spec contribution(binary(), binary()) -> [#roster_item{}].
contribution(LServer, LUser) ->
    case others(LServer) of
        [] -> [];
        _ -> compose(LServer, LUser, [])
    end.

fold([], Acc, _US, _ProgramItems) ->
    Acc;
fold([{_, M, F} | Rest], Acc, US, ProgramItems) when {M, F} == ?OURS ->
    fold(Rest, ProgramItems ++ Acc, US, ProgramItems);
fold([{_, M, F} | Rest], Acc, US, ProgramItems) ->
    try if is_function(F) -> apply(F, [Acc, US]);
           true -> apply(M, F, [Acc, US])
        end of
        stop -> Acc;
        {stop, Acc1} -> Acc1;
        Acc1 when is_list(Acc1) -> fold(Rest, Acc1, US, ProgramItems);
        _ -> fold(Rest, Acc, US, ProgramItems)
    catch Class:Reason:Stack ->
            ?ERROR_MSG("roster-port: roster_get handler ~p:~p failed while composing the "
                       "roster of ~p: ~p:~p ~p", [M, F, US, Class, Reason, Stack]),
            fold(Rest, Acc, US, ProgramItems)
    end.

unique(Groups) ->
    {Kept, _} = lists:foldl(fun(G, {Kept, Seen}) ->
                                    case sets:is_element(G, Seen) of
                                        true -> {Kept, Seen};
                                        false -> {[G | Kept], sets:add_element(G, Seen)}
                                    end
                            end, {[], sets:new()}, Groups),
    lists:reverse(Kept).

%% @doc The version of a get's answer: Composed is what compose/3 made of
%% ProgramItems (see the module doc).
-spec composed_ver(binary() | nil, [#roster_item{}], [#roster_item{}]) -> binary() | nil.
composed_ver(ProgramVer, ProgramItems, ProgramItems) ->
    ProgramVer;
composed_ver(ProgramVer, _ProgramItems, Composed) when is_binary(ProgramVer) ->
    Hash = crypto:hash(sha, term_to_binary(canonical(Composed))),
    <<ProgramVer/binary, "+", (binary:encode_hex(Hash))/binary>>;
composed_ver(_NoVersioning, _ProgramItems, _Composed) ->
    nil.

%% A push's version while other handlers contribute: never a get's.
push_ver(ProgramVer) when is_binary(ProgramVer) ->
    Unique = integer_to_binary(erlang:unique_integer([positive])),
    <<ProgramVer/binary, "+push.", Unique/binary>>;
push_ver(_NoVersioning) ->
    nil.

%% Items as plain terms (no records of a library's version), in one order.
canonical(Items) ->
    lists:sort([{jid:encode(jid:remove_resource(J)), N, S, A, lists:usort(Gs),
                 case M of
                     #mix_roster_channel{participant_id = P} -> P;
                     _ -> undefined
                 end}
                || #roster_item{jid = J, name = N, subscription = S, ask = A, groups = Gs,
                                mix_channel = M} <- Items]).

%% @doc A roster IQ get's answer from the program's read {ProgramVer,
%% {ProgramQuery, ProgramItems, Approved}}: `current` when ClientVer is the
%% composed version, else {Ver, Query}. ProgramQuery is the program's answer
%% as roster_port_wire made it, Approved the program's wire items that carry
%% approved='true'. MixAnnotate: the get asked for MIX annotations
%% (XEP-0405); without, they are left out, as mod_roster does.
-spec iq_answer(binary(), binary(), binary() | nil,
                {binary() | nil, {term(), [#roster_item{}], [map()]}}, boolean()) ->
          current | {binary() | nil, term()}.
iq_answer(LServer, LUser, ClientVer, {ProgramVer, {ProgramQuery, ProgramItems, Approved}},
          MixAnnotate) ->
    Composed = compose(LServer, LUser, ProgramItems),
    Ver = composed_ver(ProgramVer, ProgramItems, Composed),
    case is_binary(Ver) andalso Ver == ClientVer of
        true -> current;
        false when Composed == ProgramItems -> {Ver, ProgramQuery};
        false -> {Ver, query(Approved, annotated(Composed, MixAnnotate), Ver)}
    end.

%% @doc The query of a roster push of the program's WireItem (its JID known
%% to be valid) at ProgramVer, composed: the item as the composed roster
%% holds it after the change (a removed shared contact stays, as its group
%% shows it). Its version is the program's when the other handlers give this
%% user nothing, else one no get answers as current (the module doc says
%% why). Exactly the program's push when no other handler runs.
-spec push_query(binary(), binary(), map(), binary() | nil) -> term().
push_query(LServer, LUser, WireItem, ProgramVer) ->
    case active(LServer) of
        false ->
            roster_port_wire:roster_query([WireItem], ProgramVer);
        true ->
            {[#roster_item{jid = JID, subscription = Sub} = Item], _} =
                roster_port_wire:roster_items([WireItem]),
            Around = case Sub of
                         remove -> contribution(LServer, LUser);
                         _ -> compose(LServer, LUser, [Item])
                     end,
            Composed = pick(JID, Around, Item),
            Ver = case Around of
                      [] -> ProgramVer;   % removed, nothing shared: as without them
                      [Item] -> ProgramVer;   % nothing shared for this user
                      _ -> push_ver(ProgramVer)
                  end,
            query([WireItem], annotated([Composed], false), Ver)
    end.

pick(JID, Items, Default) ->
    Key = jid:tolower(jid:remove_resource(JID)),
    case [I || #roster_item{jid = J} = I <- Items, jid:tolower(jid:remove_resource(J)) == Key] of
        [I | _] -> I;
        [] -> Default
    end.

annotated(Items, true) -> Items;
annotated(Items, false) -> [I#roster_item{mix_channel = undefined} || I <- Items].

%% A pre-approval (approved='true') is kept on the items whose composed
%% subscription can still use it (RFC 6121 3.4: none or to).
query(Approved, Items, Ver) ->
    Usable = [jid:tolower(jid:remove_resource(J))
              || #roster_item{jid = J, subscription = S} <- Items, S == none orelse S == to],
    Marks = [W || #{<<"jid">> := J} = W <- Approved,
                  case roster_port_wire:decode_jid(J) of
                      {ok, JID} -> lists:member(jid:tolower(jid:remove_resource(JID)), Usable);
                      error -> false
                  end],
    roster_port_wire:roster_query(Marks, Items, Ver).
