%%% @doc The jabber:iq:roster handler that mod_roster_port puts in place of
%%% mod_roster's. A roster IQ becomes one roster_iq request (roster_port_call);
%%% the program decides everything, this module only applies mod_roster's
%%% access rules (remote access through roster_remote_access, the `access`
%%% option on sets) and turns the answer into the IQ's result or error. A
%%% get of one's own roster is answered from the exact cache when it can,
%%% and must never be answered from it once anything can have changed the
%%% roster since it was read (roster_port_cache; README, "The read cache").
%%% A get's answer is the program's roster composed with what other
%%% roster_get handlers add (roster_port_compose); only the program's part
%%% is ever cached.
-module(roster_port_iq).

-export([process_iq/1]).

-include("logger.hrl").
-include("xmpp.hrl").
-include("translate.hrl").

process_iq(#iq{from = From, to = To, lang = Lang} = IQ) ->
    SameUser = From#jid.luser == To#jid.luser andalso From#jid.lserver == To#jid.lserver,
    case SameUser orelse
        ejabberd_hooks:run_fold(roster_remote_access, To#jid.lserver, false, [IQ]) of
        true ->
            %% remote_access: the hook (mod_privilege) let another JID in.
            process_roster_iq(IQ, not SameUser);
        false ->
            xmpp:make_error(IQ, xmpp:err_forbidden(
                                  ?T("Query to another users is forbidden"), Lang))
    end.

%% A get of one's own roster, from the read cache when it can: the items and
%% the `ver` of the program's last answer, unless anything can have changed
%% the roster since (roster_port_cache). A client whose ver is the cached
%% one gets an empty result, as the program would answer. A miss asks the
%% program and keeps its answer, and its items as the roster_get hook's.
%%
%% While another roster_get handler runs (mod_shared_roster, mod_mix_pam),
%% the answer is the composed roster (roster_port_compose), made at each get
%% from the program's items: what those handlers add changes without any
%% write to the program's store, so only the program's part is cached, and
%% the program is always asked for its whole roster (the client's ver is the
%% composed one, which only the composition can check).
process_roster_iq(#iq{type = get, to = #jid{luser = LUser, lserver = LServer},
                      sub_els = [#roster_query{items = [], ver = Ver}]} = IQ,
                  false = RemoteAccess) ->
    Cache = roster_port_pool:cache(LServer),
    User = <<LUser/binary, "@", LServer/binary>>,
    ClientVer = roster_port_wire:nil_if_undefined(Ver),
    Composing = roster_port_compose:active(LServer),
    case roster_port_cache:lookup_iq(Cache, User) of
        {ok, {CachedVer, _}} when not Composing, is_binary(CachedVer),
                                  CachedVer == ClientVer ->
            xmpp:make_iq_result(IQ);
        {ok, {CachedVer, {_Query, _Items, _Approved} = Answer}} ->
            answer(IQ, Composing, CachedVer, Answer);
        _ ->
            %% Taken before the request is sent: see roster_port_cache.
            ReadAt = roster_port_cache:stamp(),
            roster_iq_call(IQ, RemoteAccess, {Cache, User, ReadAt}, Composing)
    end;
process_roster_iq(#iq{type = Type, to = #jid{lserver = LServer},
                      sub_els = [#roster_query{}]} = IQ, RemoteAccess) ->
    roster_iq_call(IQ, RemoteAccess, no_cache,
                   Type == get andalso roster_port_compose:active(LServer));
process_roster_iq(#iq{lang = Lang} = IQ, _RemoteAccess) ->
    xmpp:make_error(IQ, xmpp:err_bad_request(?T("Malformed roster query"), Lang)).

%% The answer to a get from the program's read (ProgramVer, {Query, Items,
%% Approved}): the program's query, or the composed roster.
answer(IQ, false, _ProgramVer, {Query, _Items, _Approved}) ->
    xmpp:make_iq_result(IQ, Query);
answer(#iq{to = #jid{luser = LUser, lserver = LServer},
           sub_els = [#roster_query{ver = Ver, mix_annotate = Mix}]} = IQ,
       true, ProgramVer, {Query, Items, Approved}) ->
    case roster_port_compose:iq_answer(LServer, LUser, roster_port_wire:nil_if_undefined(Ver),
                                       {ProgramVer, {Query, Items, Approved}}, Mix == true) of
        current -> xmpp:make_iq_result(IQ);
        {_ComposedVer, Composed} -> xmpp:make_iq_result(IQ, Composed)
    end.

roster_iq_call(#iq{type = Type, from = From, to = To, lang = Lang,
                   sub_els = [#roster_query{items = Items, ver = Ver}]} = IQ,
               RemoteAccess, CacheAs, Composing) ->
    #jid{luser = LUser, lserver = LServer} = To,
    Access = case Type of
                 set ->
                     Rule = mod_roster_opt:access(LServer),
                     acl:match_rule(LServer, Rule, jid:remove_resource(From));
                 get ->
                     allow
             end,
    Args = #{<<"requester">> => roster_port_wire:bare(From),
             <<"remote_access">> => RemoteAccess,
             <<"type">> => atom_to_binary(Type),
             <<"items">> => [roster_port_wire:client_item(I) || I <- Items],
             <<"ver">> => case Composing of
                              true -> nil;
                              false -> roster_port_wire:nil_if_undefined(Ver)
                          end,
             <<"access">> => atom_to_binary(Access)},
    case roster_port_call:call(LServer, LUser, <<"roster_iq">>, Args) of
        {ok, #{<<"items">> := WireItems} = R} when Type == get, is_list(WireItems) ->
            RosterItems = roster_port_call:roster_items(
                            <<"roster_iq item">>, <<LUser/binary, "@", LServer/binary>>,
                            WireItems),
            ProgramVer = maps:get(<<"ver">>, R, nil),
            Query = roster_port_wire:roster_query(WireItems, RosterItems, ProgramVer),
            Answer = {Query, RosterItems,
                      [W || #{<<"approved">> := true} = W <- WireItems]},
            keep_iq_answer(CacheAs, R, Answer, RosterItems),
            answer(IQ, Composing, ProgramVer, Answer);
        {ok, R} when Type == get ->
            keep_iq_answer(CacheAs, R, nil, nil),
            xmpp:make_iq_result(IQ);
        {ok, _} ->
            xmpp:make_iq_result(IQ);
        {error, {program, #{<<"stanza_error">> := #{} = E}}} ->
            xmpp:make_error(IQ, roster_port_wire:stanza_error(E, Lang));
        Error ->
            ?WARNING_MSG("roster-port: roster ~ts of ~ts@~ts not served: ~p",
                         [Type, LUser, LServer, Error]),
            xmpp:make_error(IQ, #stanza_error{type = wait,
                                              reason = 'internal-server-error',
                                              text = xmpp:mk_text(
                                                       ?T("Roster service unavailable"),
                                                       Lang)})
    end.

%% Only an answer without effects (a get has none). An answer `nil` (the
%% client's ver is current) is kept as that ver alone; items without a ver
%% (versioning off) are answered to every get. The items are the
%% roster_get hook's answer too: the program reads both from the same rows
%% (a roster get's items are exactly roster_get's).
keep_iq_answer({Cache, User, ReadAt}, R, Answer, RosterItems)
  when is_binary(map_get(<<"ver">>, R)); Answer /= nil ->
    Ver = maps:get(<<"ver">>, R, nil),
    case maps:get(<<"effects">>, R, []) of
        [] -> roster_port_cache:store_iq(Cache, User, ReadAt, {Ver, Answer}, RosterItems);
        _ -> ok
    end;
keep_iq_answer(_CacheAs, _R, _Answer, _RosterItems) ->
    ok.
