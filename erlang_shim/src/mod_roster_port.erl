%%% @doc mod_roster_port: ejabberd's rosters served by an external program.
%%%
%%% The program (`roster-port serve`) owns all roster logic and storage;
%%% the shim owns none (README, docs/protocol.md). This module is the
%%% gen_mod. It
%%%   1. starts a pool of program processes for the host (roster_port_pool),
%%%      whose events without a caller roster_port_effects carries out,
%%%   2. takes over mod_roster's data hooks (mod_roster_port_hooks) and its
%%%      jabber:iq:roster handler (roster_port_iq), so that each hook reaches
%%%      the program exactly once, keeps them taken while it runs (a restart
%%%      of mod_roster undoes it: roster_port_takeover's guard repairs it)
%%%      and gives them back to mod_roster when it stops,
%%%   3. serves as mod_roster's storage backend (`db_type: port` makes
%%%      mod_roster call this module), so ejabberdctl roster commands and
%%%      XEP-0227 import/export also reach the program (`store_*` ops;
%%%      process_rosteritems: roster_port_rosteritems).
%%% Every request goes through roster_port_call. When the program cannot
%%% answer, every caller gets the safe answer of docs/protocol.md; nothing
%%% here may crash or stall ejabberd because of it.
%%%
%%% Lifecycle invariants: a reload never gives the hooks back (a new pool
%%% serves before the old one stops: reload/3); the journal of
%%% subscription presences (roster_port_journal) lives from start/2 to
%%% stop/1, across reloads; an option that would fail later is refused by
%%% mod_opt_type/1.
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

-include("logger.hrl").
-include("xmpp.hrl").
-include("mod_roster.hrl").
-include("translate.hrl").

%% The version a write of this process answered, for mod_roster's next read
%% (read_roster_version/2).
-define(WRITTEN_VERSION(LUser, LServer), {roster_port_written_version, LUser, LServer}).
-define(WRITTEN_VERSION_MS, 1000).

%% The shortest call_timeout accepted: the program's start counts against
%% the hello's deadline (call_timeout), and took 0.1-0.3 s on an idle
%% machine (Python's imports, the store's schema check), more on a loaded
%% one or on PostgreSQL; a program killed as hung at every start serves
%% nothing. A ping must also be answered within call_timeout.
-define(MIN_CALL_TIMEOUT, 1000).
%% A reload waits this long past call_timeout for the new pool's programs
%% to answer their hello (a first try that fails is retried after 100 ms).
-define(RELOAD_START_MARGIN_MS, 1000).
%% A reload waits at least this long before it stops the old pool, so
%% that a caller that read the old pool's settings just before the switch
%% has sent its request (it is then in flight, and waited for).
-define(RELOAD_SWITCH_MIN_MS, 100).
%% ... and at most call_timeout plus this for the old pool's requests in
%% flight (their callers' own wait ends then).
-define(RELOAD_DRAIN_MARGIN_MS, 1000).

%%%===================================================================
%%% gen_mod
%%%===================================================================

%% Processes under ejabberd_gen_mod_sup, in the order they start: the
%% journal (it outlives a reload: its entries wait for whichever pool
%% serves), the pool (one of two slots: a reload starts the next pool
%% before it stops the old one), then the takeover and its guard
%% (roster_port_takeover). stop/1 goes the other way.
start(Host, Opts) ->
    check_db_type(Host),
    roster_port_metrics:start(Host),
    mod_roster_port_metrics:register(Host),
    case start_child(roster_port_journal:child_spec(Host, journal_opts(Host, Opts))) of
        ok ->
            {Prepared, Settings} = roster_port_pool:prepare(Host, pool_opts(Host, Opts)),
            %% Published first: a caller meanwhile finds the workers
            %% starting, not an unknown pool.
            roster_port_pool:use(Host, Settings),
            case start_child(pool_spec(Host, Prepared)) of
                ok ->
                    roster_port_takeover:take_over(Host),
                    case start_child(roster_port_takeover:child_spec(Host)) of
                        ok -> ok;
                        {error, _} = Error -> stop(Host), Error
                    end;
                {error, _} = Error ->
                    roster_port_pool:stop(Host),
                    stop_child(journal_child(Host)),
                    Error
            end;
        {error, _} = Error ->
            Error
    end.

%% Stopped alone (mod_roster stays, and ejabberd is not stopping), the
%% hooks go back to mod_roster, but roster IQs stay ours, answering
%% internal-server-error (wait) as when the program is down: mod_roster's
%% handler, on a storage (db_type: port) with no program behind it, would
%% answer every get with an empty roster. A warning says so.
stop(Host) ->
    %% The guard first: it would take the hooks back.
    stop_child(guard_child(Host)),
    Alone = gen_mod:is_loaded(Host, mod_roster) andalso not stopping(),
    roster_port_takeover:give_back(Host, Alone),
    Alone andalso
        ?WARNING_MSG("roster-port ~ts: mod_roster_port stopped while mod_roster stays: "
                     "mod_roster has its hooks back, but its storage (db_type: port) is "
                     "mod_roster_port, which has no program now: until mod_roster_port "
                     "starts again, rosters read as empty for presences, roster changes "
                     "fail, and roster IQs are answered internal-server-error (wait)",
                     [Host]),
    roster_port_pool:stop(Host),
    stop_child(pool_child(Host, 1)),
    stop_child(pool_child(Host, 2)),
    stop_child(journal_child(Host)),
    mod_roster_port_metrics:unregister(Host),
    roster_port_metrics:stop(Host),
    ok.

%% A reload never gives the hooks back and keeps the journal: it starts a
%% pool of the new options next to the running one, waits for its programs'
%% hello, moves callers to it, waits for the old pool's requests in flight
%% (bounded) and stops the old pool. A new pool that does not come up
%% leaves the old one serving, with an error log. See README, "Lifecycle".
reload(Host, NewOpts, OldOpts) ->
    check_db_type(Host),
    [?WARNING_MSG("roster-port ~ts: the new ~ts of mod_roster_port takes effect at its next "
                  "start (ejabberdctl restart_module ~ts mod_roster_port); the journal keeps "
                  "the running one",
                  [Host, Opt, Host])
     || Opt <- [journal_dir, journal_max_entries],
        gen_mod:get_opt(Opt, NewOpts) /= gen_mod:get_opt(Opt, OldOpts)],
    case roster_port_pool:settings(Host) of
        undefined ->
            %% No pool (a start that failed half-way): start one.
            {Prepared, Settings} = roster_port_pool:prepare(Host, pool_opts(Host, NewOpts)),
            roster_port_pool:use(Host, Settings),
            case start_child(pool_spec(Host, Prepared)) of
                ok ->
                    ok;
                {error, Reason} ->
                    roster_port_pool:stop(Host),
                    ?ERROR_MSG("roster-port ~ts: reload failed: cannot start the pool (~p)",
                               [Host, Reason])
            end;
        Old ->
            replace_pool(Host, NewOpts, Old)
    end,
    ok.

replace_pool(Host, Opts, #{slot := OldSlot, call_timeout := OldTimeout} = Old) ->
    {Prepared, New} = roster_port_pool:prepare(Host, pool_opts(Host, Opts)),
    NewChild = pool_child(Host, maps:get(slot, Prepared)),
    StartWait = 2 * maps:get(call_timeout, New) + ?RELOAD_START_MARGIN_MS,
    case start_child(pool_spec(Host, Prepared)) of
        ok ->
            case wait_until(fun() -> roster_port_pool:all_up(New) end, 0, StartWait) of
                true ->
                    switch_pool(Host, Old, pool_child(Host, OldSlot),
                                OldTimeout + ?RELOAD_DRAIN_MARGIN_MS, New),
                    ?INFO_MSG("roster-port ~ts: reloaded; the new programs serve", [Host]);
                false ->
                    stop_child(NewChild),
                    ?ERROR_MSG("roster-port ~ts: reload failed: the new programs did not all "
                               "answer their hello within ~B ms (see the lines above); the "
                               "running ones keep serving with the previous options. Fix the "
                               "cause, then: ejabberdctl restart_module ~ts mod_roster_port",
                               [Host, StartWait, Host])
            end;
        {error, Reason} ->
            ?ERROR_MSG("roster-port ~ts: reload failed: cannot start the new pool (~p); the "
                       "running one keeps serving with the previous options",
                       [Host, Reason])
    end.

%% The new pool's read cache stays out of callers' hands until the old
%% pool has stopped: a write the old pool is carrying out would not void
%% what the new pool's callers read meanwhile (each pool's workers
%% invalidate their own cache). Then it is emptied and handed over.
switch_pool(Host, Old, OldChild, DrainWait, #{cache := Cache} = New) ->
    roster_port_pool:use(Host, New#{cache => undefined}),
    Drained = wait_until(fun() -> roster_port_pool:in_flight(Old) == 0 end,
                         ?RELOAD_SWITCH_MIN_MS, DrainWait),
    Drained orelse
        ?WARNING_MSG("roster-port ~ts: reload: ~B requests still in flight in the old "
                     "programs after ~B ms; stopping them (their callers get safe answers)",
                     [Host, roster_port_pool:in_flight(Old), DrainWait]),
    stop_child(OldChild),
    case Cache of
        undefined ->
            ok;
        _ ->
            roster_port_cache:invalidate_all(Cache),
            roster_port_pool:use(Host, New)
    end.

%% Whether Fun() holds within MaxMs, asked every 20 ms, never before MinMs.
wait_until(Fun, MinMs, MaxMs) ->
    Now = erlang:monotonic_time(millisecond),
    wait_until(Fun, Now + MinMs, Now + MaxMs, Now).

wait_until(Fun, NotBefore, Until, Now) when Now >= NotBefore ->
    case Fun() of
        true -> true;
        false when Now >= Until -> false;
        false -> wait_more(Fun, NotBefore, Until)
    end;
wait_until(Fun, NotBefore, Until, _Now) ->
    wait_more(Fun, NotBefore, Until).

wait_more(Fun, NotBefore, Until) ->
    receive after 20 -> ok end,
    wait_until(Fun, NotBefore, Until, erlang:monotonic_time(millisecond)).

depends(_Host, _Opts) ->
    [{mod_roster, hard}].

pool_child(Host, Slot) -> {roster_port_pool, Host, Slot}.
%% roster_port_journal:child_spec/2's id.
journal_child(Host) -> {roster_port_journal, Host}.
guard_child(Host) -> maps:get(id, roster_port_takeover:child_spec(Host)).

pool_spec(Host, Prepared) ->
    #{id => pool_child(Host, maps:get(slot, Prepared)),
      start => {roster_port_pool, start_link, [Host, Prepared]},
      restart => transient,
      shutdown => infinity,
      type => supervisor}.

start_child(Spec) ->
    case supervisor:start_child(ejabberd_gen_mod_sup, Spec) of
        {ok, _} -> ok;
        {error, _} = Error -> Error
    end.

stop_child(Id) ->
    _ = supervisor:terminate_child(ejabberd_gen_mod_sup, Id),
    _ = supervisor:delete_child(ejabberd_gen_mod_sup, Id),
    ok.

stopping() ->
    element(1, init:get_status()) == stopping.

pool_opts(Host, Opts) ->
    #{command => command(gen_mod:get_opt(command, Opts)),
      pool_size => gen_mod:get_opt(pool_size, Opts),
      call_timeout => gen_mod:get_opt(call_timeout, Opts),
      max_frame_bytes => gen_mod:get_opt(max_frame_bytes, Opts),
      transcript => transcript(Host, gen_mod:get_opt(transcript, Opts)),
      cache_size => case gen_mod:get_opt(cache, Opts) of
                        true -> gen_mod:get_opt(cache_size, Opts);
                        false -> 0
                    end,
      node => atom_to_binary(node()),
      handler => {roster_port_effects, handle_async, [Host]}}.

journal_opts(Host, Opts) ->
    Dir = case gen_mod:get_opt(journal_dir, Opts) of
              undefined -> mnesia:system_info(directory);
              Path -> binary_to_list(Path)
          end,
    #{dir => Dir,
      max_entries => gen_mod:get_opt(journal_max_entries, Opts),
      apply => {roster_port_effects, replay, [Host]}}.

%% Validated already (mod_opt_type/1), but the file may have become
%% unwritable since: a module that cannot start stops ejabberd's boot, so
%% the pool starts without the transcript, and says so.
transcript(_Host, undefined) ->
    undefined;
transcript(Host, Path) ->
    case writable_file(Path) of
        ok ->
            Path;
        {error, Why} ->
            ?ERROR_MSG("roster-port ~ts: cannot write the transcript ~ts: ~ts; running "
                       "without a transcript", [Host, Path, Why]),
            undefined
    end.

%% mod_roster's storage calls (ejabberdctl, XEP-0227, mod_shared_roster,
%% the web admin) reach the program only through db_type: port. With
%% another db_type the hooks and IQs are still the program's, so a host
%% stays served, and the log says what is wrong.
check_db_type(Host) ->
    try mod_roster_opt:db_type(Host) of
        port ->
            ok;
        Other ->
            ?ERROR_MSG("roster-port ~ts: mod_roster runs with db_type: ~ts, not port. "
                       "Roster hooks and roster IQs are served by roster-port, but "
                       "mod_roster's own storage calls (ejabberdctl roster commands, "
                       "XEP-0227 import and export, mod_shared_roster, the web admin) use "
                       "another database. Set db_type: port in mod_roster's options",
                       [Host, Other])
    catch _:_ ->
            ?ERROR_MSG("roster-port ~ts: mod_roster is not loaded; mod_roster_port needs it, "
                       "with db_type: port", [Host])
    end.

command(Command) when is_binary(Command) ->
    [binary_to_list(Part) || Part <- binary:split(Command, [<<" ">>, <<"\t">>],
                                                   [global, trim_all])];
command(Parts) when is_list(Parts) ->
    [binary_to_list(P) || P <- Parts].

%%%===================================================================
%%% Options
%%%===================================================================
%%% Every value that would fail later (the pool crashing at every start,
%%% ejabberd halting at boot, every ping failing) is refused here, with a
%%% message that says what to write instead: a config reload keeps the
%%% running options, a boot stops with that message.

mod_opt_type(command) ->
    econf:and_then(econf:either(econf:binary(), econf:list(econf:binary())),
                   fun check_command/1);
mod_opt_type(pool_size) ->
    econf:pos_int();
mod_opt_type(call_timeout) ->
    econf:and_then(econf:timeout(millisecond), fun check_call_timeout/1);
mod_opt_type(max_frame_bytes) ->
    econf:pos_int();
mod_opt_type(transcript) ->
    econf:either(econf:enum([undefined]),
                 econf:and_then(econf:binary(), fun check_transcript/1));
mod_opt_type(cache) ->
    econf:bool();
mod_opt_type(cache_size) ->
    econf:pos_int();
mod_opt_type(journal_dir) ->
    econf:either(econf:enum([undefined]),
                 econf:and_then(econf:binary(), fun check_journal_dir/1));
mod_opt_type(journal_max_entries) ->
    econf:pos_int().

mod_options(_Host) ->
    [{command, <<"roster-port serve">>},
     {pool_size, erlang:system_info(schedulers_online)},
     {call_timeout, 5000},
     {max_frame_bytes, 8 * 1024 * 1024},
     {transcript, undefined},
     {cache, true},
     {cache_size, 100000},
     {journal_dir, undefined},
     {journal_max_entries, 100000}].

check_command(Value) ->
    case command(Value) of
        [] ->
            bad_option("the command is empty: give the program and its arguments, "
                       "e.g. \"roster-port serve --config /etc/ejabberd/roster-port.toml\"");
        Parts ->
            case lists:member("", Parts) of
                true -> bad_option("an element of the command is an empty string");
                false -> Value
            end
    end.

check_call_timeout(T) when T >= ?MIN_CALL_TIMEOUT ->
    T;
check_call_timeout(T) ->
    bad_option(io_lib:format(
                 "~B ms is too short: the minimum is ~B ms, as the program's start must "
                 "answer its hello, and the program every ping, within call_timeout",
                 [T, ?MIN_CALL_TIMEOUT])).

check_transcript(<<>>) ->
    bad_option("the path is empty: write undefined for no transcript");
check_transcript(Path) ->
    case writable_file(Path) of
        ok -> Path;
        {error, Why} -> bad_option(io_lib:format("cannot write the file ~ts: ~ts", [Path, Why]))
    end.

check_journal_dir(<<>>) ->
    bad_option("the path is empty: write undefined for ejabberd's Mnesia directory");
check_journal_dir(Path) ->
    case writable_dir(Path) of
        ok -> Path;
        {error, Why} ->
            bad_option(io_lib:format("cannot write in the directory ~ts: ~ts", [Path, Why]))
    end.

%% ejabberd prints it as "Invalid value of option modules->mod_roster_port->Opt: Text".
bad_option(Text) ->
    econf:fail({invalid_syntax, unicode:characters_to_binary(Text)}).

%% Opened for appending (created if missing, as the transcript writer will).
writable_file(Path) ->
    case filelib:ensure_dir(Path) of
        ok ->
            case file:open(Path, [append, raw]) of
                {ok, Fd} -> file:close(Fd);
                {error, Why} -> {error, file:format_error(Why)}
            end;
        {error, Why} ->
            {error, file:format_error(Why)}
    end.

%% A directory (created if missing) in which a file can be written.
writable_dir(Path) ->
    Probe = filename:join(Path, ".roster_port_write_test"),
    case filelib:ensure_dir(Probe) of
        ok ->
            case file:write_file(Probe, <<>>) of
                ok -> _ = file:delete(Probe), ok;
                {error, Why} -> {error, file:format_error(Why)}
            end;
        {error, Why} ->
            {error, file:format_error(Why)}
    end.

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
              desc => ?T("Deadline of one request, at least 1 second (the "
                         "program's start must answer its hello within it). "
                         "Default: 5 seconds.")}},
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
                         "Default: 100000.")}},
           {journal_dir,
            #{value => ?T("Path"),
              desc => ?T("Directory of the journal of subscription presences "
                         "(must be writable). Default: ejabberd's Mnesia "
                         "directory. A change takes effect at the module's "
                         "next start.")}},
           {journal_max_entries,
            #{value => ?T("Entries"),
              desc => ?T("Subscription presences the journal holds at most; "
                         "beyond, a presence is refused. Default: 100000.")}}]}.

%%%===================================================================
%%% mod_roster storage backend (db_type: port)
%%%===================================================================
%%% Each callback is one store_* request; the program writes what it is
%%% given and never runs the subscription state machine for these. There is
%%% no transaction across several callbacks: each request is atomic in the
%%% program, and one user's requests are serialised by the pool.

%% Called by mod_roster's start/2 before it adds its hooks and IQ handler:
%% with mod_roster_port running, those undo the takeover (README,
%% "Lifecycle"), which the guard repairs as soon as they are in.
init(Host, _Opts) ->
    roster_port_takeover:mod_roster_started(Host),
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
