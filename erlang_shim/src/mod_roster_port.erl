%%% @doc mod_roster_port: ejabberd's rosters served by an external program.
%%%
%%% The program (`roster-port serve`) owns all roster logic and storage;
%%% the shim owns none (README, docs/protocol.md). This module is the
%%% gen_mod. It
%%%   1. starts a pool of program processes for the host (roster_port_pool),
%%%      whose events without a caller roster_port_effects carries out,
%%%   2. takes over mod_roster's data hooks (mod_roster_port_hooks) and its
%%%      jabber:iq:roster handler (roster_port_iq), so that each hook reaches
%%%      the program exactly once, and gives them back to mod_roster when it
%%%      stops,
%%%   3. serves as mod_roster's storage backend (`db_type: port` makes
%%%      mod_roster call this module), so ejabberdctl roster commands and
%%%      XEP-0227 import/export also reach the program (`store_*` ops;
%%%      process_rosteritems: roster_port_rosteritems).
%%% Every request goes through roster_port_call. When the program cannot
%%% answer, every caller gets the safe answer of docs/protocol.md; nothing
%%% here may crash or stall ejabberd because of it.
%%%
%%% Why mod_roster stays loaded: ejabberd_c2s reads mod_roster's `access`
%%% option for every outgoing subscription presence, and other modules call
%%% mod_roster functions directly; those calls end up in the backend below.
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

-include("xmpp.hrl").
-include("mod_roster.hrl").
-include("translate.hrl").

%% The version a write of this process answered, for mod_roster's next read
%% (read_roster_version/2).
-define(WRITTEN_VERSION(LUser, LServer), {roster_port_written_version, LUser, LServer}).
-define(WRITTEN_VERSION_MS, 1000).

%% mod_roster's handlers that we replace: {Hook, mod_roster's function, ours}.
-define(TAKEN_OVER,
        [{roster_get, get_user_roster_items, roster_get},
         {roster_in_subscription, in_subscription, in_subscription},
         {roster_out_subscription, out_subscription, out_subscription},
         {roster_get_jid_info, get_jid_info, get_jid_info},
         {remove_user, remove_user, remove_user},
         {c2s_self_presence, c2s_self_presence, c2s_self_presence},
         {c2s_post_auth_features, get_versioning_feature, post_auth_features}]).
%% Ours are in ?HOOKS, all at mod_roster's sequence. Handlers of one
%% sequence run sorted by module name, and mod_roster_port_hooks sorts where
%% mod_roster does: after mod_pubsub, whose roster_in_subscription handler
%% sits at 50 too and always answers true, so our answer is the one
%% ejabberd_sm sees; before mod_shared_roster, mod_stream_mgmt and
%% mod_vcard, as mod_roster's handlers run.
-define(HOOKS, mod_roster_port_hooks).
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
                 handler => {roster_port_effects, handle_async, [Host]}},
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
              ejabberd_hooks:add(Hook, Host, ?HOOKS, Ours, ?SEQ)
      end, ?TAKEN_OVER),
    ejabberd_hooks:add(user_send_packet, Host, ?HOOKS, user_send_packet, ?SEND_SEQ),
    gen_iq_handler:add_iq_handler(ejabberd_sm, Host, ?NS_ROSTER,
                                  roster_port_iq, process_iq).

give_back(Host) ->
    ejabberd_hooks:delete(user_send_packet, Host, ?HOOKS, user_send_packet, ?SEND_SEQ),
    ModRosterLoaded = gen_mod:is_loaded(Host, mod_roster),
    lists:foreach(
      fun({Hook, Theirs, Ours}) ->
              ejabberd_hooks:delete(Hook, Host, ?HOOKS, Ours, ?SEQ),
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

%% mod_roster reads the version right after a transaction that wrote one
%% item, for the push of that item (push_item/3): the version the write
%% answered is that one, and one request fewer. It is kept in the calling
%% process for that read only: taken by it, dropped when the process opens
%% its next transaction, and never used once WRITTEN_VERSION_MS old (a
%% write that no read followed must not answer a read much later).
read_roster_version(LUser, LServer) ->
    Now = erlang:monotonic_time(millisecond),
    case erase(?WRITTEN_VERSION(LUser, LServer)) of
        {Ver, At} when is_binary(Ver), Now - At =< ?WRITTEN_VERSION_MS ->
            {ok, Ver};
        _ ->
            case store(LServer, LUser, <<"store_read_version">>, #{}) of
                {ok, #{<<"ver">> := Ver}} when is_binary(Ver) -> {ok, Ver};
                _ -> error
            end
    end.

write_roster_version(_LUser, _LServer, _InTransaction, _Ver) ->
    %% The program changes the version on every write it makes.
    ok.

get_roster(LUser, LServer) ->
    case store(LServer, LUser, <<"store_get_roster">>, #{}) of
        {ok, #{<<"items">> := Items}} when is_list(Items) ->
            {ok, roster_port_call:records(<<"store_get_roster row">>, LUser, LServer, Items)};
        _ ->
            error
    end.

get_roster_item(LUser, LServer, LJID) ->
    case store(LServer, LUser, <<"store_get_item">>, #{<<"contact">> => roster_port_wire:bare(LJID)}) of
        {ok, #{<<"item">> := #{} = Item}} ->
            case roster_port_call:records(<<"store_get_item row">>, LUser, LServer, [Item]) of
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
    forget_written_versions(),
    try {atomic, F()}
    catch _:Reason ->
            forget_written_versions(),
            {aborted, Reason}
    end.

remove_user(LUser, LServer) ->
    case store(LServer, LUser, <<"store_remove_user">>, #{}) of
        {ok, _} -> ok;
        Error -> {error, Error}
    end.

update_roster(LUser, LServer, _LJID, Item) ->
    written(LUser, LServer, store(LServer, LUser, <<"store_set_item">>,
                                  #{<<"item">> => roster_port_wire:record_to_map(Item)})).

del_roster(LUser, LServer, LJID) ->
    written(LUser, LServer, store(LServer, LUser, <<"store_del_item">>,
                                  #{<<"contact">> => roster_port_wire:bare(LJID)})).

written(LUser, LServer, {ok, Result}) ->
    case maps:get(<<"ver">>, Result, undefined) of
        Ver when is_binary(Ver) ->
            put(?WRITTEN_VERSION(LUser, LServer), {Ver, erlang:monotonic_time(millisecond)});
        _ -> erase(?WRITTEN_VERSION(LUser, LServer))
    end,
    ok;
written(_LUser, _LServer, Error) ->
    error({roster_port, Error}).

forget_written_versions() ->
    [erase(Key) || {?WRITTEN_VERSION(_, _) = Key, _} <- get()],
    ok.

%% The program is the source of truth: mod_roster must not cache.
use_cache(_LServer, _Table) ->
    false.

%% ejabberdctl process_rosteritems (mod_roster:process_rosteritems/5 hands
%% it to the backend).
process_rosteritems(ActionS, SubsS, AsksS, UsersS, ContactsS) ->
    roster_port_rosteritems:process_rosteritems(ActionS, SubsS, AsksS, UsersS, ContactsS).

store(LServer, LUser, Op, Args) ->
    roster_port_call:call(LServer, LUser, Op, Args).
