%%% @doc mod_roster_port: ejabberd's rosters served by an external program.
%%%
%%% Theory of operation. The program (`roster-port serve`) owns all roster
%%% logic and storage; this module owns none. It
%%%   1. starts a pool of program processes for the host (roster_port_pool),
%%%   2. takes over mod_roster's data hooks and its jabber:iq:roster handler,
%%%      so that each hook reaches the program exactly once, and gives them
%%%      back to mod_roster when it stops,
%%%   3. serves as mod_roster's storage backend (`db_type: port` makes
%%%      mod_roster call this module), so ejabberdctl roster commands and
%%%      XEP-0227 import/export also reach the program (`store_*` ops),
%%%   4. carries out the effects the program answers with (roster pushes,
%%%      presences), in order, before it answers the hook when it can.
%%% When the program cannot answer, every hook gets the safe answer of
%%% docs/protocol.md; nothing here may crash or stall ejabberd because of it.
%%%
%%% Reads (roster_get_jid_info, roster_get, roster IQ gets) are answered from
%%% an exact cache when it can (roster_port_cache; roster_port_worker
%%% invalidates it). Effects of answers reach every session of the user in
%%% the cluster; effects of roster_changed notifications only the sessions
%%% on this node, as every node's shim gets the same notification.
%%%
%%% Why mod_roster stays loaded: ejabberd_c2s reads mod_roster's `access`
%%% option for every outgoing subscription presence, and other modules call
%%% mod_roster functions directly; those calls end up in the backend below.
%%%
%%% Outgoing subscription presences are forwarded from user_send_packet, not
%%% roster_out_subscription: ejabberd_c2s routes the presence to the contact
%%% whatever roster_out_subscription says, and a pre-approval (RFC 6121 3.4)
%%% must not reach the contact. roster_out_subscription still forwards a
%%% presence that did not come through user_send_packet.
-module(mod_roster_port).
-behaviour(gen_mod).
-behaviour(mod_roster).

%% gen_mod
-export([start/2, stop/1, reload/3, depends/2, mod_opt_type/1, mod_options/1,
         mod_doc/0]).
%% mod_roster storage backend (db_type: port)
-export([init/2, import/3, read_roster_version/2, write_roster_version/4,
         get_roster/2, get_roster_item/3, read_subscription_and_groups/3,
         roster_subscribe/4, transaction/2, remove_user/2, update_roster/4,
         del_roster/3, use_cache/2, process_rosteritems/5]).
%% hooks and the IQ handler
-export([roster_get/2, in_subscription/2, out_subscription/1, user_send_packet/1,
         get_jid_info/4, remove_user_hook/2, c2s_self_presence/1,
         post_auth_features/2, process_iq/1]).
%% effects without a caller (called by the pool's runner)
-export([handle_async/2]).

-include("logger.hrl").
-include("xmpp.hrl").
-include("mod_roster.hrl").
-include("translate.hrl").

-define(NS_PRE_APPROVAL, <<"urn:xmpp:features:pre-approval">>).
-define(FORWARDED, roster_port_forwarded).

%% mod_roster's handlers that we replace: {Hook, mod_roster's function, ours}.
-define(TAKEN_OVER,
        [{roster_get, get_user_roster_items, roster_get},
         {roster_in_subscription, in_subscription, in_subscription},
         {roster_out_subscription, out_subscription, out_subscription},
         {roster_get_jid_info, get_jid_info, get_jid_info},
         {remove_user, remove_user, remove_user_hook},
         {c2s_self_presence, c2s_self_presence, c2s_self_presence},
         {c2s_post_auth_features, get_versioning_feature, post_auth_features}]).
%% All at mod_roster's sequence. On roster_in_subscription, mod_pubsub's
%% handler sits at 50 too and always answers true; handlers of one sequence
%% run sorted by module name, and mod_roster_port sorts after mod_pubsub,
%% so our answer is the one ejabberd_sm sees.
-define(SEQ, 50).
%% Late on user_send_packet so that modules which drop a packet run first.
-define(SEND_SEQ, 90).

%%%===================================================================
%%% gen_mod
%%%===================================================================

start(Host, Opts) ->
    PoolOpts = #{command => command(gen_mod:get_opt(command, Opts)),
                 pool_size => gen_mod:get_opt(pool_size, Opts),
                 call_timeout => gen_mod:get_opt(call_timeout, Opts),
                 max_frame_bytes => gen_mod:get_opt(max_frame_bytes, Opts),
                 transcript => gen_mod:get_opt(transcript, Opts),
                 cache_size => case gen_mod:get_opt(cache, Opts) of
                                   true -> gen_mod:get_opt(cache_size, Opts);
                                   false -> 0
                               end,
                 node => atom_to_binary(node()),
                 handler => {?MODULE, handle_async, [Host]}},
    Spec = #{id => pool_proc(Host),
             start => {roster_port_pool, start, [Host, PoolOpts]},
             restart => transient,
             shutdown => infinity,
             type => supervisor},
    case supervisor:start_child(ejabberd_gen_mod_sup, Spec) of
        {ok, _} ->
            take_over(Host),
            ok;
        {error, Reason} ->
            roster_port_pool:stop(Host),
            {error, Reason}
    end.

stop(Host) ->
    give_back(Host),
    roster_port_pool:stop(Host),
    gen_mod:stop_child(pool_proc(Host)),
    ok.

reload(Host, NewOpts, _OldOpts) ->
    %% The pool's settings are fixed at start; a reload restarts it.
    stop(Host),
    start(Host, NewOpts).

depends(_Host, _Opts) ->
    [{mod_roster, hard}].

pool_proc(Host) ->
    gen_mod:get_module_proc(Host, roster_port_pool).

command(Command) when is_binary(Command) ->
    [binary_to_list(Part) || Part <- binary:split(Command, [<<" ">>, <<"\t">>],
                                                   [global, trim_all])];
command(Parts) when is_list(Parts) ->
    [binary_to_list(P) || P <- Parts].

take_over(Host) ->
    lists:foreach(
      fun({Hook, Theirs, Ours}) ->
              ejabberd_hooks:delete(Hook, Host, mod_roster, Theirs, ?SEQ),
              ejabberd_hooks:add(Hook, Host, ?MODULE, Ours, ?SEQ)
      end, ?TAKEN_OVER),
    ejabberd_hooks:add(user_send_packet, Host, ?MODULE, user_send_packet, ?SEND_SEQ),
    gen_iq_handler:add_iq_handler(ejabberd_sm, Host, ?NS_ROSTER, ?MODULE, process_iq).

give_back(Host) ->
    ejabberd_hooks:delete(user_send_packet, Host, ?MODULE, user_send_packet, ?SEND_SEQ),
    ModRosterLoaded = gen_mod:is_loaded(Host, mod_roster),
    lists:foreach(
      fun({Hook, Theirs, Ours}) ->
              ejabberd_hooks:delete(Hook, Host, ?MODULE, Ours, ?SEQ),
              ModRosterLoaded andalso
                  ejabberd_hooks:add(Hook, Host, mod_roster, Theirs, ?SEQ)
      end, ?TAKEN_OVER),
    case ModRosterLoaded of
        true ->
            gen_iq_handler:add_iq_handler(ejabberd_sm, Host, ?NS_ROSTER,
                                          mod_roster, process_iq);
        false ->
            gen_iq_handler:remove_iq_handler(ejabberd_sm, Host, ?NS_ROSTER)
    end.

mod_opt_type(command) ->
    econf:either(econf:binary(), econf:list(econf:binary()));
mod_opt_type(pool_size) ->
    econf:pos_int();
mod_opt_type(call_timeout) ->
    econf:timeout(millisecond);
mod_opt_type(max_frame_bytes) ->
    econf:pos_int();
mod_opt_type(transcript) ->
    econf:either(econf:enum([undefined]), econf:binary());
mod_opt_type(cache) ->
    econf:bool();
mod_opt_type(cache_size) ->
    econf:pos_int().

mod_options(_Host) ->
    [{command, <<"roster-port serve">>},
     {pool_size, erlang:system_info(schedulers_online)},
     {call_timeout, 5000},
     {max_frame_bytes, 8 * 1024 * 1024},
     {transcript, undefined},
     {cache, true},
     {cache_size, 100000}].

mod_doc() ->
    #{desc =>
          ?T("Serves rosters from an external program (roster-port) over "
             "ports. Needs mod_roster with 'db_type: port'."),
      opts =>
          [{command,
            #{value => ?T("Command"),
              desc => ?T("The program and its arguments, split on spaces, "
                         "or a list of strings.")}},
           {pool_size,
            #{value => ?T("Size"),
              desc => ?T("How many program processes. Default: number of "
                         "schedulers.")}},
           {call_timeout,
            #{value => "timeout()",
              desc => ?T("Deadline of one request. Default: 5 seconds.")}},
           {max_frame_bytes,
            #{value => ?T("Bytes"),
              desc => ?T("Largest frame sent or accepted. Default: 8 MiB.")}},
           {transcript,
            #{value => ?T("Path"),
              desc => ?T("Append every frame exchanged to this file (msgpack). "
                         "Default: none.")}},
           {cache,
            #{value => "true | false",
              desc => ?T("Answer roster_get, roster_get_jid_info and roster "
                         "IQ gets from an "
                         "exact cache, invalidated on every write and every "
                         "roster_changed notification. Default: true.")}},
           {cache_size,
            #{value => ?T("Records"),
              desc => ?T("Bound of the cache: one record per cached roster, per "
                         "contact of a roster loaded for jid_info, per user "
                         "written recently. When full it is emptied. "
                         "Default: 100000.")}}]}.

%%%===================================================================
%%% Hooks
%%%===================================================================

roster_get(Acc, {LUser, LServer}) ->
    Cache = roster_port_pool:cache(LServer),
    User = <<LUser/binary, "@", LServer/binary>>,
    case roster_port_cache:lookup_roster(Cache, User) of
        {ok, Items} ->
            Items ++ Acc;
        miss ->
            %% Taken before the request is sent: see roster_port_cache.
            ReadAt = roster_port_cache:stamp(),
            case call(LServer, LUser, <<"roster_get">>, #{}) of
                {ok, #{<<"items">> := WireItems}} when is_list(WireItems) ->
                    Items = roster_items(<<"roster_get item">>, User, WireItems),
                    roster_port_cache:store_roster(Cache, User, ReadAt, Items),
                    Items ++ Acc;
                _ ->
                    Acc
            end
    end.

in_subscription(_Acc, #presence{from = From, to = To, type = Type} = Pres) ->
    #jid{luser = LUser, lserver = LServer} = To,
    Args = #{<<"contact">> => roster_port_wire:bare(From),
             <<"type">> => atom_to_binary(Type),
             <<"status">> => roster_port_wire:status(Pres)},
    case call(LServer, LUser, <<"in_subscription">>, Args, #{keep => true}) of
        {ok, #{<<"deliver">> := Deliver}} -> Deliver == true;
        _ -> false
    end.

%% Outgoing subscription presences, before ejabberd_c2s routes them.
user_send_packet({#presence{type = Type, to = #jid{} = To} = Pres,
                  #{jid := #jid{luser = LUser, lserver = LServer} = JID} = State})
  when Type == subscribe; Type == subscribed;
       Type == unsubscribe; Type == unsubscribed ->
    Own = {To#jid.luser, To#jid.lserver, To#jid.lresource} == {LUser, LServer, <<>>},
    Access = mod_roster_opt:access(LServer),
    Allowed = acl:match_rule(LServer, Access, jid:remove_resource(JID)) == allow,
    if Own; not Allowed ->
            %% A presence to oneself is no subscription; a denied one gets
            %% its error from ejabberd_c2s.
            {Pres, State};
       true ->
            case forward_out_subscription(LServer, LUser, Pres#presence{from = JID}) of
                false -> {drop, State};
                true -> {xmpp:put_meta(Pres, ?FORWARDED, true), State}
            end
    end;
user_send_packet(Acc) ->
    Acc.

out_subscription(#presence{from = #jid{luser = LUser, lserver = LServer}} = Pres) ->
    case xmpp:get_meta(Pres, ?FORWARDED, false) of
        true -> ok;
        false -> _ = forward_out_subscription(LServer, LUser, Pres), ok
    end.

%% Returns whether the presence must still be routed to the contact.
forward_out_subscription(LServer, LUser, #presence{to = To, type = Type} = Pres) ->
    Args = #{<<"contact">> => roster_port_wire:bare(To),
             <<"type">> => atom_to_binary(Type),
             <<"status">> => roster_port_wire:status(Pres)},
    case call(LServer, LUser, <<"out_subscription">>, Args, #{keep => true}) of
        {ok, #{<<"route">> := false}} -> false;
        _ -> true
    end.

%% The hot path. With the cache, a user's whole store is loaded once
%% (store_get_roster: every row, strangers' pending requests included, with
%% jid_info's subscription, ask and groups) and every contact is answered
%% from it until the user's roster changes.
get_jid_info(_Acc, User, Server, JID) ->
    LUser = jid:nodeprep(User),
    LServer = jid:nameprep(Server),
    Contact = case JID of
                  #jid{} -> jid:remove_resource(JID);
                  {_, _, _} -> jid:remove_resource(jid:make(JID))
              end,
    Cache = roster_port_pool:cache(LServer),
    Owner = <<LUser/binary, "@", LServer/binary>>,
    case roster_port_cache:lookup_jid_info(Cache, Owner, roster_port_wire:contact_key(Contact)) of
        {ok, absent} -> {none, none, []};
        {ok, Info} -> Info;
        not_loaded -> load_jid_info(Cache, LServer, LUser, Contact);
        _Off_or_unknown -> ask_jid_info(LServer, LUser, Contact)
    end.

ask_jid_info(LServer, LUser, Contact) ->
    case call(LServer, LUser, <<"jid_info">>, #{<<"contact">> => roster_port_wire:bare(Contact)}) of
        {ok, #{<<"subscription">> := Sub, <<"ask">> := Ask} = R} ->
            {roster_port_wire:subscription(Sub), roster_port_wire:pending(Ask), maps:get(<<"groups">>, R, [])};
        _ ->
            {none, none, []}
    end.

load_jid_info(Cache, LServer, LUser, Contact) ->
    LoadedAt = roster_port_cache:stamp(),
    User = <<LUser/binary, "@", LServer/binary>>,
    case call(LServer, LUser, <<"store_get_roster">>, #{}) of
        {ok, #{<<"items">> := Items}} when is_list(Items) ->
            %% A row whose JID ejabberd cannot parse is no contact ejabberd can
            %% ask about: skipped, and the rest is kept.
            {Entries, Skipped} = roster_port_wire:jid_info_entries(Items),
            log_skipped(<<"store_get_roster row">>, User, Skipped),
            roster_port_cache:store_jid_info(Cache, User, LoadedAt, Entries),
            case lists:keyfind(roster_port_wire:contact_key(Contact), 1, Entries) of
                {_, Info} -> Info;
                false -> {none, none, []}
            end;
        _ ->
            {none, none, []}
    end.

remove_user_hook(User, Server) ->
    LUser = jid:nodeprep(User),
    LServer = jid:nameprep(Server),
    case call(LServer, LUser, <<"remove_user">>, #{}) of
        {ok, _} -> ok;
        Error ->
            ?ERROR_MSG("roster-port: the roster of removed user ~ts@~ts was not "
                       "removed: ~p", [LUser, LServer, Error])
    end.

%% On the first available presence (priority >= 0) of a session, re-send the
%% stored inbound subscription requests to that session.
c2s_self_presence({_, #{pres_last := _}} = Acc) ->
    Acc;
c2s_self_presence({#presence{type = available, priority = Prio} = Pres,
                   #{jid := #jid{luser = LUser, lserver = LServer} = JID} = State})
  when Prio == undefined; Prio >= 0 ->
    case call(LServer, LUser, <<"pending_in">>, #{}) of
        {ok, #{<<"requests">> := Requests}} when is_list(Requests) ->
            BareJID = jid:remove_resource(JID),
            {Valid, Skipped} = roster_port_wire:pending_requests(Requests),
            log_skipped(<<"pending_in request">>, roster_port_wire:bare(JID), Skipped),
            State1 = lists:foldl(
                       fun({From, Status}, S) ->
                               ejabberd_c2s:send(S, #presence{from = From, to = BareJID,
                                                              type = subscribe,
                                                              status = Status})
                       end, State, Valid),
            {Pres, State1};
        _ ->
            {Pres, State}
    end;
c2s_self_presence(Acc) ->
    Acc.

post_auth_features(Acc, Host) ->
    Caps = roster_port_pool:capabilities(Host),
    Acc1 = case maps:get(<<"versioning">>, Caps, false) of
               true -> [#rosterver_feature{} | Acc];
               _ -> Acc
           end,
    case maps:get(<<"pre_approval">>, Caps, false) of
        true -> [#xmlel{name = <<"sub">>, attrs = [{<<"xmlns">>, ?NS_PRE_APPROVAL}]} | Acc1];
        _ -> Acc1
    end.

%%%===================================================================
%%% The roster IQ
%%%===================================================================

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
process_roster_iq(#iq{type = get, to = #jid{luser = LUser, lserver = LServer},
                      sub_els = [#roster_query{items = [], ver = Ver}]} = IQ,
                  false = RemoteAccess) ->
    Cache = roster_port_pool:cache(LServer),
    User = <<LUser/binary, "@", LServer/binary>>,
    ClientVer = roster_port_wire:nil_if_undefined(Ver),
    case roster_port_cache:lookup_iq(Cache, User) of
        {ok, {CachedVer, _}} when is_binary(CachedVer), CachedVer == ClientVer ->
            xmpp:make_iq_result(IQ);
        {ok, {_, Query}} when Query /= nil ->
            xmpp:make_iq_result(IQ, Query);
        _ ->
            %% Taken before the request is sent: see roster_port_cache.
            ReadAt = roster_port_cache:stamp(),
            roster_iq_call(IQ, RemoteAccess, {Cache, User, ReadAt})
    end;
process_roster_iq(#iq{sub_els = [#roster_query{}]} = IQ, RemoteAccess) ->
    roster_iq_call(IQ, RemoteAccess, no_cache);
process_roster_iq(#iq{lang = Lang} = IQ, _RemoteAccess) ->
    xmpp:make_error(IQ, xmpp:err_bad_request(?T("Malformed roster query"), Lang)).

roster_iq_call(#iq{type = Type, from = From, to = To, lang = Lang,
                   sub_els = [#roster_query{items = Items, ver = Ver}]} = IQ,
               RemoteAccess, CacheAs) ->
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
             <<"ver">> => roster_port_wire:nil_if_undefined(Ver),
             <<"access">> => atom_to_binary(Access)},
    case call(LServer, LUser, <<"roster_iq">>, Args) of
        {ok, #{<<"items">> := WireItems} = R} when Type == get, is_list(WireItems) ->
            RosterItems = roster_items(<<"roster_iq item">>,
                                       <<LUser/binary, "@", LServer/binary>>, WireItems),
            Query = roster_port_wire:roster_query(WireItems, RosterItems, maps:get(<<"ver">>, R, nil)),
            keep_iq_answer(CacheAs, R, Query, RosterItems),
            xmpp:make_iq_result(IQ, Query);
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
keep_iq_answer({Cache, User, ReadAt}, R, Query, RosterItems)
  when is_binary(map_get(<<"ver">>, R)); Query /= nil ->
    Ver = maps:get(<<"ver">>, R, nil),
    case maps:get(<<"effects">>, R, []) of
        [] -> roster_port_cache:store_iq(Cache, User, ReadAt, {Ver, Query}, RosterItems);
        _ -> ok
    end;
keep_iq_answer(_CacheAs, _R, _Query, _RosterItems) ->
    ok.

%%%===================================================================
%%% Effects
%%%===================================================================

%% Effects towards the user's own sessions (push, send_presence,
%% send_unavailable) reach the sessions on this node only, for answers and
%% notifications alike: a change made through this node is reported to every
%% other node that shares the store by that node's own change feed (the
%% program stamps its writes with the node; docs/protocol.md,
%% "Notifications"), and that node's shim covers its sessions. So each
%% session hears of each change exactly once, clustered or not.
run_effects(Host, Effects) when is_list(Effects) ->
    lists:foreach(fun(E) -> run_effect(Host, E) end, Effects);
run_effects(_Host, _) ->
    ok.

%% One bad effect is logged and skipped; it never breaks the hook. An effect
%% naming a JID ejabberd cannot parse is skipped with a warning.
run_effect(Host, Effect) ->
    try effect(Effect)
    catch
        throw:{undecodable_jid, J} ->
            #{<<"type">> := Type} = Effect,
            log_skipped(<<Type/binary, " effect">>, effect_user(Effect), [J]);
        Class:Reason:Stack ->
            ?ERROR_MSG("roster-port ~ts: cannot carry out effect ~p: ~p:~p~n~p",
                       [Host, Effect, Class, Reason, Stack])
    end.

%% A JID of an effect, or the effect is skipped (run_effect/2).
effect_jid(J) ->
    case roster_port_wire:decode_jid(J) of
        {ok, JID} -> JID;
        error -> throw({undecodable_jid, J})
    end.

%% Whom an effect is about, for the log (the program's value: bounded).
effect_user(Effect) ->
    User = maps:get(<<"user">>, Effect, maps:get(<<"from">>, Effect, undefined)),
    case roster_port_wire:decode_jid(User) of
        {ok, JID} -> roster_port_wire:bare(JID);
        error -> roster_port_wire:printable(User)
    end.

%% The user's resources on this node.
local_resources(LUser, LServer) ->
    Here = node(),
    [R || R <- ejabberd_sm:get_user_resources(LUser, LServer),
          case ejabberd_sm:get_session_pid(LUser, LServer, R) of
              Pid when is_pid(Pid) -> node(Pid) == Here;
              _ -> false
          end].

effect(#{<<"type">> := <<"push">>, <<"user">> := User, <<"item">> := Item} = E) ->
    #jid{luser = LUser, lserver = LServer} = BareJID = effect_jid(User),
    _ = effect_jid(maps:get(<<"jid">>, Item, undefined)),
    Query = roster_port_wire:roster_query([Item], maps:get(<<"ver">>, E, nil)),
    lists:foreach(
      fun(Resource) ->
              ejabberd_router:route(
                #iq{type = set, from = BareJID,
                    to = jid:replace_resource(BareJID, Resource),
                    id = <<"push", (p1_rand:get_string())/binary>>,
                    sub_els = [Query]})
      end, local_resources(LUser, LServer));
effect(#{<<"type">> := <<"route_presence">>, <<"from">> := From, <<"to">> := To,
         <<"presence_type">> := Type} = E) ->
    ejabberd_router:route(
      #presence{from = effect_jid(From), to = effect_jid(To),
                type = roster_port_wire:presence_type(Type),
                status = roster_port_wire:text(maps:get(<<"status">>, E, nil))});
effect(#{<<"type">> := <<"send_presence">>, <<"user">> := User, <<"to">> := To}) ->
    #jid{luser = LUser, lserver = LServer} = effect_jid(User),
    ToJID = effect_jid(To),
    %% Each session sends its own last available presence (if it has one).
    lists:foreach(
      fun(Resource) ->
              case ejabberd_sm:get_session_pid(LUser, LServer, Resource) of
                  Pid when is_pid(Pid) -> ejabberd_c2s:resend_presence(Pid, ToJID);
                  _ -> ok
              end
      end, local_resources(LUser, LServer));
effect(#{<<"type">> := <<"send_unavailable">>, <<"user">> := User, <<"to">> := To}) ->
    #jid{luser = LUser, lserver = LServer} = BareJID = effect_jid(User),
    ToJID = effect_jid(To),
    lists:foreach(
      fun(Resource) ->
              ejabberd_router:route(
                #presence{from = jid:replace_resource(BareJID, Resource), to = ToJID,
                          type = unavailable})
      end, local_resources(LUser, LServer));
effect(Other) ->
    ?WARNING_MSG("roster-port: ignoring unknown effect ~p", [Other]).

%% Events that have no caller waiting: notifications, answers to replayed
%% presences, answers that came after their caller's deadline.
handle_async(Host, {notification, <<"roster_changed">>, Params}) ->
    %% The worker has already dropped the user's cached reads.
    run_effects(Host, maps:get(<<"effects">>, Params, []));
handle_async(Host, {notification, Name, _Params}) ->
    ?WARNING_MSG("roster-port ~ts: ignoring unknown notification ~ts", [Host, Name]);
handle_async(Host, {replayed, <<"in_subscription">>, Args, {ok, Result}}) ->
    run_effects(Host, maps:get(<<"effects">>, Result, [])),
    case maps:get(<<"deliver">>, Result, false) of
        true -> deliver_late_presence(Args);
        false -> ok
    end;
handle_async(Host, {Kind, _Op, _Args, {ok, Result}}) when Kind == replayed; Kind == late ->
    run_effects(Host, maps:get(<<"effects">>, Result, []));
handle_async(Host, {Kind, Op, Args, Error}) ->
    ?ERROR_MSG("roster-port ~ts: ~ts request ~ts ~p failed: ~p",
               [Host, Kind, Op, Args, Error]).

%% An inbound subscription presence kept while the program was down, now
%% accepted: hand it to the user's available sessions as ejabberd_sm would
%% have (routing it again would run roster_in_subscription twice).
deliver_late_presence(#{<<"user">> := User, <<"contact">> := Contact,
                        <<"type">> := Type} = Args) ->
    #jid{luser = LUser, lserver = LServer} = UserJID = jid:decode(User),
    Pres = #presence{from = jid:decode(Contact), type = roster_port_wire:presence_type(Type),
                     status = roster_port_wire:text(maps:get(<<"status">>, Args, nil))},
    lists:foreach(
      fun({_Prio, Resource}) ->
              case ejabberd_sm:get_session_pid(LUser, LServer, Resource) of
                  Pid when is_pid(Pid) ->
                      To = jid:replace_resource(UserJID, Resource),
                      ejabberd_c2s:route(Pid, {route, Pres#presence{to = To}});
                  _ ->
                      ok
              end
      end, ejabberd_sm:get_user_present_resources(LUser, LServer)).

%%%===================================================================
%%% mod_roster storage backend (db_type: port)
%%%===================================================================
%%% Each callback is one store_* request; the program writes what it is
%%% given and never runs the subscription state machine for these. There is
%%% no transaction across several callbacks: each request is atomic in the
%%% program, and one user's requests are serialised by the pool.

init(_Host, _Opts) ->
    ok.

import(LServer, <<"rosterusers">>, #roster{us = {LUser, _}} = R) ->
    _ = store(LServer, LUser, <<"store_set_item">>, #{<<"item">> => roster_port_wire:record_to_map(R)}),
    ok;
import(_LServer, _Table, _Data) ->
    %% Versions belong to the program.
    ok.

read_roster_version(LUser, LServer) ->
    case store(LServer, LUser, <<"store_read_version">>, #{}) of
        {ok, #{<<"ver">> := Ver}} when is_binary(Ver) -> {ok, Ver};
        _ -> error
    end.

write_roster_version(_LUser, _LServer, _InTransaction, _Ver) ->
    %% The program changes the version on every write it makes.
    ok.

get_roster(LUser, LServer) ->
    case store(LServer, LUser, <<"store_get_roster">>, #{}) of
        {ok, #{<<"items">> := Items}} when is_list(Items) ->
            {ok, records(<<"store_get_roster row">>, LUser, LServer, Items)};
        _ ->
            error
    end.

get_roster_item(LUser, LServer, LJID) ->
    case store(LServer, LUser, <<"store_get_item">>, #{<<"contact">> => roster_port_wire:bare(LJID)}) of
        {ok, #{<<"item">> := #{} = Item}} ->
            case records(<<"store_get_item row">>, LUser, LServer, [Item]) of
                [Record] -> {ok, Record};
                [] -> error
            end;
        _ ->
            error
    end.

read_subscription_and_groups(LUser, LServer, LJID) ->
    case get_roster_item(LUser, LServer, LJID) of
        {ok, #roster{subscription = Sub, ask = Ask, groups = Groups}} ->
            {ok, {Sub, Ask, Groups}};
        error ->
            error
    end.

roster_subscribe(LUser, LServer, LJID, Item) ->
    update_roster(LUser, LServer, LJID, Item).

transaction(_LServer, F) ->
    try {atomic, F()}
    catch _:Reason -> {aborted, Reason}
    end.

remove_user(LUser, LServer) ->
    case store(LServer, LUser, <<"store_remove_user">>, #{}) of
        {ok, _} -> ok;
        Error -> {error, Error}
    end.

update_roster(LUser, LServer, _LJID, Item) ->
    case store(LServer, LUser, <<"store_set_item">>, #{<<"item">> => roster_port_wire:record_to_map(Item)}) of
        {ok, _} -> ok;
        Error -> error({roster_port, Error})
    end.

del_roster(LUser, LServer, LJID) ->
    case store(LServer, LUser, <<"store_del_item">>, #{<<"contact">> => roster_port_wire:bare(LJID)}) of
        {ok, _} -> ok;
        Error -> error({roster_port, Error})
    end.

%% The program is the source of truth: mod_roster must not cache.
use_cache(_LServer, _Table) ->
    false.

%% ejabberdctl process_rosteritems ACTION SUBS ASKS USERS CONTACTS
%% (mod_roster:process_rosteritems/5 hands it to the backend), with the
%% Mnesia backend's syntax: ACTION list | delete; SUBS none|from|to|both
%% joined by ':' or any; ASKS none|out|in joined by ':' or any (a row with
%% both pending matches in and out); USERS and CONTACTS JIDs joined by ':'
%% or any, with the globs *, ?, [...] and a leading ! for "not". Returns the
%% matching {User, Contact} pairs; delete removes each with store_del_item
%% (the program pushes the removal to the user's sessions).
%% The program has no op that lists users, so the rows visited are those of
%% the accounts (ejabberd_auth:get_users/1) of every host this module runs
%% on; rows of users without an account are not visited.
process_rosteritems(ActionS, SubsS, AsksS, UsersS, ContactsS) ->
    Action = case ActionS of
                 "list" -> list;
                 "delete" -> delete
             end,
    Subs = filter_atoms(SubsS, [none, from, to, both]),
    Asks = filter_atoms(AsksS, [none, out, in, both]),
    Users = filter_jids(UsersS),
    Contacts = filter_jids(ContactsS),
    Hosts = [H || H <- ejabberd_option:hosts(), gen_mod:is_loaded(H, ?MODULE)],
    lists:append(
      [process_user_rosteritems(Action, Subs, Asks, Contacts, LUser, LServer)
       || Host <- Hosts,
          {LUser, LServer} <- lists:sort(ejabberd_auth:get_users(Host)),
          jid_matches({LUser, LServer}, Users)]).

process_user_rosteritems(Action, Subs, Asks, Contacts, LUser, LServer) ->
    User = <<LUser/binary, "@", LServer/binary>>,
    Items = case get_roster(LUser, LServer) of
                {ok, Rs} -> Rs;
                error -> throw({error, "roster of " ++ binary_to_list(User) ++
                                    " not readable (program unavailable)"})
            end,
    [begin
         Action == delete andalso del_roster(LUser, LServer, LJID),
         {User, jid:encode(LJID)}
     end
     || #roster{jid = {CUser, CServer, _} = LJID, subscription = Sub, ask = Ask} <- Items,
        lists:member(Sub, Subs),
        lists:member(Ask, Asks) orelse
            (Ask == both andalso (lists:member(in, Asks) orelse lists:member(out, Asks))),
        jid_matches({CUser, CServer}, Contacts)].

filter_atoms(S, All) ->
    lists:usort(lists:flatmap(fun("any") -> All;
                                 (A) -> [list_to_existing_atom(A)]
                              end, string:tokens(S, ":"))).

filter_jids(S) ->
    lists:flatmap(fun("any") -> ["*", "*@*"];
                     (J) -> [J]
                  end, string:tokens(S, ":")).

%% Mnesia backend's matching: "host" matches a JID without user part,
%% "user@host" globs both parts.
jid_matches({Name, Server}, Patterns) ->
    lists:any(
      fun(Pattern) ->
              case jid:decode(list_to_binary(Pattern)) of
                  #jid{luser = <<>>, lserver = MServer} ->
                      Name == <<>> andalso glob_match(Server, MServer);
                  #jid{luser = MName, lserver = MServer} ->
                      glob_match(Server, MServer) andalso glob_match(Name, MName)
              end
      end, Patterns).

glob_match(String, <<"!", Glob/binary>>) ->
    not glob_match(String, Glob);
glob_match(String, Glob) ->
    ejabberd_regexp:run(String, ejabberd_regexp:sh_to_awk(Glob)) == match.

store(LServer, LUser, Op, Args) ->
    call(LServer, LUser, Op, Args).

%%%===================================================================
%%% Calls and conversions
%%%===================================================================

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
            run_effects(LServer, maps:get(<<"effects">>, Result, [])),
            Ok;
        {error, Reason} = Error ->
            ?DEBUG("roster-port: ~ts for ~ts failed: ~p", [Op, User, Reason]),
            Error
    end.

