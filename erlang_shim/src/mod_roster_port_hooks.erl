%%% @doc The hooks of mod_roster that mod_roster_port takes over (the table
%%% is roster_port_takeover's ?TAKEN_OVER), and user_send_packet. Each turns its
%%% arguments into one request (roster_port_call) and the answer into what
%%% the hook must return; when the program cannot answer, the hook returns
%%% the safe answer of docs/protocol.md. Nothing here may crash or stall
%%% ejabberd because of the program, nor decide anything about a roster.
%%%
%%% The module's name is part of the takeover: it must sort where
%%% mod_roster's does among handlers of the same sequence (roster_port_takeover,
%%% ?HOOKS).
%%%
%%% Reads (roster_get, roster_get_jid_info) are answered from the exact
%%% cache when it can (roster_port_cache; README, "The read cache").
%%%
%%% Subscription presences, both ways, go through roster_port_call's
%%% subscription/5 and so through the journal: each is applied and carried
%%% out (routed, delivered) on both sides or on neither, now or later
%%% (roster_port_journal). Outgoing ones are taken in user_send_packet, not
%%% roster_out_subscription: ejabberd_c2s routes the presence to the contact
%%% whatever roster_out_subscription says, and one that was not applied, or
%%% a pre-approval (RFC 6121 3.4), must not reach the contact.
%%% roster_out_subscription still applies a presence that did not come
%%% through user_send_packet.
-module(mod_roster_port_hooks).

-export([roster_get/2, in_subscription/2, out_subscription/1, user_send_packet/1,
         get_jid_info/4, remove_user/2, c2s_self_presence/1, post_auth_features/2]).

-include("logger.hrl").
-include("xmpp.hrl").

-define(NS_PRE_APPROVAL, <<"urn:xmpp:features:pre-approval">>).
-define(FORWARDED, roster_port_forwarded).

roster_get(Acc, {LUser, LServer}) ->
    Cache = roster_port_pool:cache(LServer),
    User = <<LUser/binary, "@", LServer/binary>>,
    case roster_port_cache:lookup_roster(Cache, User) of
        {ok, Items} ->
            Items ++ Acc;
        miss ->
            %% Taken before the request is sent: see roster_port_cache.
            ReadAt = roster_port_cache:stamp(),
            case roster_port_call:call(LServer, LUser, <<"roster_get">>, #{}) of
                {ok, #{<<"items">> := WireItems}} when is_list(WireItems) ->
                    Items = roster_port_call:roster_items(<<"roster_get item">>, User, WireItems),
                    roster_port_cache:store_roster(Cache, User, ReadAt, Items),
                    Items ++ Acc;
                _ ->
                    Acc
            end
    end.

%% An inbound subscription presence: delivered now if the program applied
%% it and says so; one that cannot be applied now is journalled and
%% delivered by the journal once applied (roster_port_call:subscription/5).
in_subscription(_Acc, #presence{from = From, to = To} = Pres) ->
    #jid{luser = LUser, lserver = LServer} = To,
    Args = subscription_args(From, To, Pres),
    case roster_port_call:subscription(LServer, LUser, <<"in_subscription">>, Args,
                                       fun(Result) -> maps:get(<<"deliver">>, Result, false) end) of
        {done, Deliver} -> Deliver == true;
        _ -> false
    end.

%% Outgoing subscription presences, before ejabberd_c2s routes them. The
%% presence is applied to the user's roster and routed here, in one journal
%% entry, and ejabberd_c2s is told to drop it: routed by ejabberd_c2s after
%% this hook, a presence whose application failed would reach the contact
%% alone (a one-sided pair), and its routing to a local contact (which runs
%% that contact's roster_in_subscription) would not share this hook's
%% deadline. What ejabberd_c2s does with it otherwise is done here too, in
%% its order: roster_out_subscription, the privacy check (before the program
%% is asked: a presence the privacy list refuses changes nothing), the route
%% from the bare JID.
user_send_packet({#presence{type = Type, to = #jid{} = To} = Pres,
                  #{jid := #jid{luser = LUser, lserver = LServer} = JID} = State})
  when Type == subscribe; Type == subscribed;
       Type == unsubscribe; Type == unsubscribed ->
    Own = {To#jid.luser, To#jid.lserver, To#jid.lresource} == {LUser, LServer, <<>>},
    Access = mod_roster_opt:access(LServer),
    Allowed = acl:match_rule(LServer, Access, jid:remove_resource(JID)) == allow,
    Pres1 = xmpp:put_meta(Pres#presence{from = JID}, ?FORWARDED, true),
    Lang = maps:get(lang, State, <<"en">>),
    Privacy = Allowed andalso not Own andalso
        ejabberd_hooks:run_fold(privacy_check_packet, LServer, allow,
                                [State, Pres1, out]) == allow,
    if Own ->
            %% A presence to oneself is no subscription.
            {Pres1, State};
       not Allowed ->
            %% ejabberd_c2s would answer the error and route the presence all
            %% the same: the contact would hold what the user's roster does not.
            Error = xmpp:err_forbidden(<<"Access denied by service policy">>, Lang),
            {drop, ejabberd_c2s:send(State, xmpp:make_error(Pres1, Error))};
       not Privacy ->
            %% ejabberd_c2s checks it again, answers the error, routes nothing.
            {Pres1, State};
       true ->
            case forward_out_subscription(LServer, LUser, Pres1) of
                {error, Reason} ->
                    {drop, ejabberd_c2s:send(State, refusal(Pres1, Reason, Lang))};
                _Done_or_later ->
                    {drop, State}
            end
    end;
user_send_packet(Acc) ->
    Acc.

%% A presence that did not come through user_send_packet (another module
%% ran the hook): applied; whoever ran the hook routes it.
out_subscription(#presence{from = #jid{luser = LUser, lserver = LServer}} = Pres) ->
    case xmpp:get_meta(Pres, ?FORWARDED, false) of
        true ->
            ok;
        false ->
            Args = subscription_args(Pres),
            _ = roster_port_call:subscription(LServer, LUser, <<"out_subscription">>, Args,
                                              fun(_) -> ok end),
            ok
    end.

forward_out_subscription(LServer, LUser, Pres) ->
    roster_port_call:subscription(
      LServer, LUser, <<"out_subscription">>, subscription_args(Pres),
      fun(Result) -> roster_port_effects:route_subscription(LServer, Pres, Result) end).

subscription_args(#presence{from = From, to = To} = Pres) ->
    subscription_args(To, From, Pres).

%% A subscription presence between the user and Contact, as the program's
%% args. A subscribe also carries the request whole (`request_elements`:
%% its statuses with their languages, its extended content), which the
%% program keeps to deliver at login (RFC 6121 3.1.3) and the journal keeps
%% to deliver or route it later as it came; bounded (roster_port_wire), what
%% is over is dropped whole and logged. The live stanza is not touched: what
%% ejabberd delivers or routes now is the presence as it came.
subscription_args(Contact, User, #presence{type = Type} = Pres) ->
    Args = #{<<"contact">> => roster_port_wire:bare(Contact),
             <<"type">> => atom_to_binary(Type),
             <<"status">> => roster_port_wire:status(Pres)},
    case Type of
        subscribe ->
            {Elements, Dropped} = roster_port_wire:request_elements(Pres),
            Dropped > 0 andalso
                ?WARNING_MSG("roster-port: the subscription request between ~ts and ~ts is "
                             "kept without ~B of its elements: over the bounds of a kept "
                             "request (it is delivered now as it came)",
                             [roster_port_wire:bare(User), roster_port_wire:bare(Contact),
                              Dropped]),
            Args#{<<"request_elements">> => Elements};
        _ ->
            Args
    end.

%% The error presence a client gets for an outgoing subscription presence
%% that was not applied and will not be.
refusal(Pres, full, _Lang) ->
    xmpp:make_error(Pres, xmpp:err_resource_constraint());
refusal(Pres, {program, #{<<"stanza_error">> := #{} = E}}, Lang) ->
    xmpp:make_error(Pres, roster_port_wire:stanza_error(E, Lang));
refusal(Pres, _, _Lang) ->
    xmpp:make_error(Pres, xmpp:err_internal_server_error()).

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
    Args = #{<<"contact">> => roster_port_wire:bare(Contact)},
    case roster_port_call:call(LServer, LUser, <<"jid_info">>, Args) of
        {ok, #{<<"subscription">> := Sub, <<"ask">> := Ask} = R} ->
            {roster_port_wire:subscription(Sub), roster_port_wire:pending(Ask), maps:get(<<"groups">>, R, [])};
        _ ->
            {none, none, []}
    end.

load_jid_info(Cache, LServer, LUser, Contact) ->
    LoadedAt = roster_port_cache:stamp(),
    User = <<LUser/binary, "@", LServer/binary>>,
    case roster_port_call:call(LServer, LUser, <<"store_get_roster">>, #{}) of
        {ok, #{<<"items">> := Items}} when is_list(Items) ->
            %% A row whose JID ejabberd cannot parse is no contact ejabberd can
            %% ask about: skipped, and the rest is kept.
            {Entries, Skipped} = roster_port_wire:jid_info_entries(Items),
            roster_port_call:log_skipped(<<"store_get_roster row">>, User, Skipped),
            roster_port_cache:store_jid_info(Cache, User, LoadedAt, Entries),
            case lists:keyfind(roster_port_wire:contact_key(Contact), 1, Entries) of
                {_, Info} -> Info;
                false -> {none, none, []}
            end;
        _ ->
            {none, none, []}
    end.

remove_user(User, Server) ->
    LUser = jid:nodeprep(User),
    LServer = jid:nameprep(Server),
    case roster_port_call:call(LServer, LUser, <<"remove_user">>, #{}) of
        {ok, _} -> ok;
        Error ->
            ?ERROR_MSG("roster-port: the roster of removed user ~ts@~ts was not "
                       "removed: ~p", [LUser, LServer, Error])
    end.

%% On the first available presence (priority >= 0) of a session, re-send the
%% stored inbound subscription requests to that session, each as it came
%% (every status with its language, the extended content) when the program
%% kept it whole, otherwise with its status text.
c2s_self_presence({_, #{pres_last := _}} = Acc) ->
    Acc;
c2s_self_presence({#presence{type = available, priority = Prio} = Pres,
                   #{jid := #jid{luser = LUser, lserver = LServer} = JID} = State})
  when Prio == undefined; Prio >= 0 ->
    case roster_port_call:call(LServer, LUser, <<"pending_in">>, #{}) of
        {ok, #{<<"requests">> := Requests}} when is_list(Requests) ->
            BareJID = jid:remove_resource(JID),
            {Valid, Skipped} = roster_port_wire:pending_requests(Requests),
            roster_port_call:log_skipped(<<"pending_in request">>, roster_port_wire:bare(JID),
                                         Skipped),
            State1 = lists:foldl(
                       fun({From, Statuses, SubEls, Dropped}, S) ->
                               Dropped > 0 andalso
                                   ?WARNING_MSG("roster-port: the stored subscription request "
                                                "of ~ts to ~ts is delivered without ~B of its "
                                                "elements (unreadable or over the bounds)",
                                                [roster_port_wire:bare(From),
                                                 roster_port_wire:bare(JID), Dropped]),
                               ejabberd_c2s:send(S, #presence{from = From, to = BareJID,
                                                              type = subscribe,
                                                              status = Statuses,
                                                              sub_els = SubEls})
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
