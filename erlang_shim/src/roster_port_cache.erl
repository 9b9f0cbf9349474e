%%% @doc The shim's cache of roster reads, per host: exact or absent.
%%%
%%% roster_get_jid_info runs for every presence probe, caps, MAM, privacy and
%%% pubsub decision; a round trip to the program costs ~55 us, an ETS lookup
%%% ~1 us. So the answers of `roster_get` (per user), of roster IQ gets (per
%%% user: the items and the `ver`) and of jid_info (per
%%% user and contact, loaded from the user's whole roster at once) are kept
%%% in a public ETS table. The program stays the only source of truth: an
%%% entry is used only when nothing can have changed the user's roster since
%%% the read that produced it was sent.
%%%
%%% How exactness is kept. Every read and every invalidation takes a stamp
%%% from erlang:unique_integer([positive, monotonic]), strictly increasing on
%%% the node.
%%%   - A reader takes its stamp T0 *before* its request is sent, and stores
%%%     the answer under T0.
%%%   - Invalidating user U writes U's record `{{user, U}, Stamp, none}`: an
%%%     entry of U is valid only if its stamp is above that record's stamp,
%%%     so a read sent before the invalidation can never be used after it,
%%%     whenever its answer comes back (rule (d) of the design).
%%%   - Invalidating everything moves the `floor` (an atomic, outside the
%%%     table) to a new stamp F: entries stamped below the floor are never
%%%     used, including those stored late by reads in flight. Then, to free
%%%     memory only, it purges the records *all* of whose stamps are below
%%%     F (a user's record has two: its invalidation and its load). Such a
%%%     record can answer nothing any more, so deleting it changes no
%%%     answer. Every other record was written after F was taken (stamps
%%%     only grow) and is kept: in particular an invalidate(U) made while
%%%     invalidate_all runs. Emptying the whole table instead would drop
%%%     that record, and a read of U sent after F but before the
%%%     invalidation (so possibly before the write it stands for) would then
%%%     be stored and served for good. ets:select_delete/2 matches and
%%%     deletes each record under that record's lock, so a record rewritten
%%%     meanwhile is judged by its new stamps.
%%%   - Lookups read the entry first and the user's record and the floor
%%%     after it, so an invalidation that completed before the entry was
%%%     read is always seen.
%%%   - The cache answers only while it is `live`: while the program process
%%%     that reports changes made outside this node (the change feed) is
%%%     known to be running. The worker of that process turns it off when its
%%%     program goes down and on (after invalidating everything) once the
%%%     new program's feed is known to be open.
%%%
%%% When to invalidate. roster_port_worker sees every request and answer and
%%% calls one function of this module at each moment; each applies one rule:
%%%   request_sent/3       a writing request's user, right before it is
%%%                        written (a read sent before it is void);
%%%   answer_received/3    a writing request's user again when its answer
%%%                        comes, in time or late, before its caller hears
%%%                        of it (a read sent while the write was in flight
%%%                        may have missed it: the program runs requests of
%%%                        different users concurrently, and its answers
%%%                        come back in any order);
%%%   request_expired/3    everything, when a writing request passes its
%%%                        deadline (whether and when it is carried out is
%%%                        unknown from now on);
%%%   answer_lost/1        everything, when an answer comes for a request
%%%                        the worker no longer knows (what it wrote is
%%%                        unknown);
%%%   notification_received/3  a roster_changed notification's user as
%%%                        soon as it is read (any other notification:
%%%                        everything);
%%%   program_down/2       everything when a program goes down (answers in
%%%                        flight are lost, their writes may be in the
%%%                        store); the feed worker's also turns the cache
%%%                        off: outside changes go unreported;
%%%   program_up/1         everything when a new program has answered its
%%%                        hello (it may not have seen what the old one was
%%%                        answering);
%%%   feed_open/1          the feed worker's, once the new program's feed
%%%                        is known to be open: everything, then the cache
%%%                        answers again.
%%% A request `writes` unless it is one of protocol.md's reads (writes/2).
%%%
%%% Records in the table:
%%%   {{user, U}, InvalidatedAt, JidInfoLoad}  JidInfoLoad: the stamp of the
%%%                                   roster load jid_info answers come from,
%%%                                   or none
%%%   {{roster, U}, ReadAt, Items}     the roster_get answer (any term)
%%%   {{iq, U}, ReadAt, {Ver, Answer}} a roster IQ get's answer: its `ver`
%%%                                   and what to answer with (any term:
%%%                                   roster_port_iq keeps the program's
%%%                                   query and items, never what other
%%%                                   roster_get handlers add, which
%%%                                   changes without a write), or `nil`
%%%                                   when the program only said that Ver
%%%                                   is current
%%%   {{contact, U, C}, LoadedAt, Info} one contact of a loaded roster
%%% A contact absent under a valid load is not in U's store: {none, none, []}.
%%% A contact record from another load (a reload raced with this one, or the
%%% contact was removed since) is `unknown`: the caller asks the program.
%%%
%%% Bound: when storing would take the table over `max` records, everything
%%% is invalidated (which empties the table, but for records written
%%% meanwhile) and the storing read is not kept. Crude, and simple to reason
%%% about; with max above the number of active users' roster items it does
%%% not happen.
%%%
%%% Nothing here knows ejabberd. A cache handle `undefined` (cache off) makes
%%% every lookup a miss and every other call a no-op; so does a table that
%%% is gone (its owner, the pool's supervisor, is stopping).
-module(roster_port_cache).

-export([handle/2, handle/3, create_table/1, new/2, stamp/0, writes/2,
         lookup_roster/2, store_roster/4, lookup_iq/2, store_iq/5,
         lookup_jid_info/3, store_jid_info/4,
         invalidate/2, invalidate_all/1, raise_floor/1, purge/1,
         set_live/2, is_live/1, records/1]).
%% The worker's moments (see the module doc).
-export([request_sent/3, answer_received/3, request_expired/3, answer_lost/1,
         notification_received/3, program_down/2, program_up/1, feed_open/1]).

-export_type([cache/0]).

-type cache() :: undefined
               | #{table := atom(), flags := atomics:atomics_ref(), max := pos_integer(),
                   host => binary()}.
-type stamp() :: pos_integer().

%% Slots of the flags atomics.
-define(FLOOR, 1).
-define(LIVE, 2).

%%%===================================================================
%%% Creation
%%%===================================================================

%% @doc A handle for a table that create_table/1 creates later (by the
%% process that will own it). The cache is not live until set_live/2.
-spec handle(atom(), pos_integer()) -> cache().
handle(Table, Max) ->
    #{table => Table, flags => atomics:new(2, [{signed, true}]), max => Max}.

%% @doc handle/2 whose lookups are counted as Host's (roster_port_metrics).
-spec handle(atom(), pos_integer(), binary()) -> cache().
handle(Table, Max, Host) ->
    (handle(Table, Max))#{host => Host}.

%% @doc Creates the named table; the calling process owns it.
-spec create_table(cache()) -> ok.
create_table(undefined) ->
    ok;
create_table(#{table := Table}) ->
    Table = ets:new(Table, [named_table, public, set, {read_concurrency, true},
                           {write_concurrency, true}]),
    ok.

%% @doc handle/2 and create_table/1 at once (tests).
-spec new(atom(), pos_integer()) -> cache().
new(Table, Max) ->
    Cache = handle(Table, Max),
    ok = create_table(Cache),
    Cache.

-spec stamp() -> stamp().
stamp() ->
    erlang:unique_integer([positive, monotonic]).

%% @doc Whether a request can change the roster of its user (protocol.md's
%% operations; an op this module does not know is taken as a write).
-spec writes(binary(), map()) -> boolean().
writes(<<"roster_iq">>, #{<<"type">> := <<"get">>}) -> false;
writes(Op, _Args) ->
    not lists:member(Op, [<<"hello">>, <<"ping">>, <<"metrics">>, <<"roster_get">>, <<"jid_info">>,
                          <<"pending_in">>, <<"store_get_roster">>, <<"store_get_item">>,
                          <<"store_read_version">>]).

%%%===================================================================
%%% roster_get answers
%%%===================================================================

-spec lookup_roster(cache(), binary()) -> {ok, term()} | miss.
lookup_roster(Cache, User) ->
    counted(Cache, roster, lookup_read(Cache, roster, User)).

%% A lookup's hit or miss, for the metrics of the handle's host.
counted(#{host := Host}, Kind, Result) ->
    roster_port_metrics:cache_lookup(Host, Kind, Result),
    Result;
counted(_Cache, _Kind, Result) ->
    Result.

lookup_read(undefined, _Kind, _User) ->
    miss;
lookup_read(#{table := T} = Cache, Kind, User) ->
    try ets:lookup(T, {Kind, User}) of
        [{_, ReadAt, Items}] ->
            case ReadAt > invalidated_at(T, User) andalso usable(ReadAt, Cache) of
                true -> {ok, Items};
                false -> miss
            end;
        [] ->
            miss
    catch error:badarg ->
            miss
    end.

%% @doc Keeps the answer of a roster_get sent after ReadAt was taken.
-spec store_roster(cache(), binary(), stamp(), term()) -> ok.
store_roster(undefined, _User, _ReadAt, _Items) ->
    ok;
store_roster(#{table := T} = Cache, User, ReadAt, Items) ->
    safely(fun() ->
                   storable(ReadAt, User, Cache) andalso make_room(1, Cache)
                       andalso ets:insert(T, {{roster, User}, ReadAt, Items})
           end).

%%%===================================================================
%%% Roster IQ get answers
%%%===================================================================

%% @doc The last roster IQ get answer kept for User: {Ver, Answer}, Answer
%% `nil` when only Ver is known to be current (the program answered a
%% client whose ver was current).
-spec lookup_iq(cache(), binary()) -> {ok, {term(), term()}} | miss.
lookup_iq(Cache, User) ->
    counted(Cache, iq, lookup_read(Cache, iq, User)).

%% @doc Keeps the answer of a roster IQ get sent after ReadAt was taken:
%% {Ver, Answer} as lookup_iq/2 gives it back, and, when Items is not
%% `nil`, Items as the roster_get answer of the same read (the program
%% answers both from the same rows in one transaction). An answer `nil`
%% does not replace a kept answer of the same Ver.
-spec store_iq(cache(), binary(), stamp(), {term(), term()}, term()) -> ok.
store_iq(undefined, _User, _ReadAt, _VerAnswer, _Items) ->
    ok;
store_iq(#{table := T} = Cache, User, ReadAt, {Ver, Answer}, Items) ->
    Records = [{{iq, User}, ReadAt, {Ver, Answer}}
               | [{{roster, User}, ReadAt, Items} || Items /= nil]],
    safely(fun() ->
                   storable(ReadAt, User, Cache)
                       andalso not (Answer == nil andalso knows_answer(Cache, User, Ver))
                       andalso make_room(length(Records), Cache)
                       andalso ets:insert(T, Records)
           end).

knows_answer(Cache, User, Ver) ->
    case lookup_read(Cache, iq, User) of
        {ok, {Ver, Answer}} -> Answer /= nil;
        _ -> false
    end.

%%%===================================================================
%%% jid_info answers
%%%===================================================================

%% @doc Contact is the key the entries were stored under (the caller
%% normalises it the same way both times).
%% `off`: the cache does not answer now (ask the program for this contact);
%% `not_loaded`: the user's roster is not loaded (load it, then store it).
-spec lookup_jid_info(cache(), binary(), term()) ->
          {ok, term()} | off | not_loaded | unknown.
lookup_jid_info(Cache, User, Contact) ->
    counted(Cache, jid_info, lookup_contact(Cache, User, Contact)).

lookup_contact(undefined, _User, _Contact) ->
    off;
lookup_contact(#{table := T} = Cache, User, Contact) ->
    try is_live(Cache) andalso ets:lookup(T, {user, User}) of
        false ->
            off;
        [{_, _, Load}] when is_integer(Load) ->
            Record = ets:lookup(T, {contact, User, Contact}),
            case usable(Load, Cache) of
                false -> not_loaded;
                true ->
                    case Record of
                        [{_, Load, Info}] -> {ok, Info};
                        [] -> {ok, absent};
                        [_FromAnotherLoad] -> unknown
                    end
            end;
        _ ->
            not_loaded
    catch error:badarg ->
            off
    end.

%% @doc Keeps a whole roster for jid_info: Entries are {Contact, Info}, every
%% row of the user's store (a contact not in it is absent). Loaded from a
%% request sent after LoadedAt was taken.
-spec store_jid_info(cache(), binary(), stamp(), [{term(), term()}]) -> ok.
store_jid_info(undefined, _User, _LoadedAt, _Entries) ->
    ok;
store_jid_info(#{table := T} = Cache, User, LoadedAt, Entries) ->
    safely(
      fun() ->
              storable(LoadedAt, User, Cache)
                  %% Not over a newer load's contacts (were it to happen in a
                  %% race, those would read as `unknown`, never wrong).
                  andalso not newer_load(T, User, LoadedAt)
                  andalso make_room(length(Entries) + 1, Cache)
                  andalso ets:insert(T, [{{contact, User, C}, LoadedAt, Info}
                                         || {C, Info} <- Entries])
                  andalso install_load(T, User, LoadedAt)
      end).

%% The contacts are in; now point the user's record at this load, unless the
%% user was invalidated since LoadedAt or a newer load is installed. Atomic:
%% ets:select_replace/2 checks and writes the one record in one step.
install_load(T, User, LoadedAt) ->
    Key = {user, User},
    Spec = [{{Key, '$1', '$2'},
             [{'<', '$1', LoadedAt}, {'orelse', {'==', '$2', none}, {'<', '$2', LoadedAt}}],
             [{{{const, Key}, '$1', LoadedAt}}]}],
    ets:select_replace(T, Spec) == 1
        %% No record yet (never invalidated, or emptied since: then the
        %% floor is above LoadedAt and the load is never used).
        orelse ets:insert_new(T, {Key, 0, LoadedAt})
        orelse ets:select_replace(T, Spec) == 1.

%%%===================================================================
%%% Invalidation
%%%===================================================================

%% @doc Before a request is written to the program.
-spec request_sent(cache(), binary(), map()) -> ok.
request_sent(Cache, Op, Args) ->
    invalidate_if_writes(Cache, Op, Args).

%% @doc When the answer to a request comes, in time or late, before its
%% caller hears of it.
-spec answer_received(cache(), binary(), map()) -> ok.
answer_received(Cache, Op, Args) ->
    invalidate_if_writes(Cache, Op, Args).

%% @doc When a request passes its deadline without an answer.
-spec request_expired(cache(), binary(), map()) -> ok.
request_expired(Cache, Op, Args) ->
    case writes(Op, Args) of
        true -> invalidate_all(Cache);
        false -> ok
    end.

%% @doc When an answer comes for a request that is not known (any more).
-spec answer_lost(cache()) -> ok.
answer_lost(Cache) ->
    invalidate_all(Cache).

%% @doc As soon as a notification is read, before it is carried out.
-spec notification_received(cache(), binary(), map()) -> ok.
notification_received(Cache, <<"roster_changed">>, #{<<"user">> := User})
  when is_binary(User) ->
    invalidate(Cache, User);
notification_received(Cache, _Name, _Params) ->
    invalidate_all(Cache).

%% @doc When a program goes down; Feed: it was the one reporting outside
%% changes.
-spec program_down(cache(), boolean()) -> ok.
program_down(Cache, Feed) ->
    Feed andalso set_live(Cache, false),
    invalidate_all(Cache).

%% @doc When a new program has answered its hello.
-spec program_up(cache()) -> ok.
program_up(Cache) ->
    invalidate_all(Cache).

%% @doc When the feed worker's new program is known to report outside
%% changes.
-spec feed_open(cache()) -> ok.
feed_open(Cache) ->
    invalidate_all(Cache),
    set_live(Cache, true).

invalidate_if_writes(Cache, Op, #{<<"user">> := User} = Args) ->
    case writes(Op, Args) of
        true -> invalidate(Cache, User);
        false -> ok
    end;
invalidate_if_writes(_Cache, _Op, _Args) ->
    ok.

%% @doc Nothing read about User before now is used any more.
-spec invalidate(cache(), binary()) -> ok.
invalidate(undefined, _User) ->
    ok;
invalidate(#{table := T}, User) ->
    safely(fun() ->
                   ets:insert(T, {{user, User}, stamp(), none}),
                   %% Only to free memory: the record above already voids them.
                   ets:delete(T, {roster, User}),
                   ets:delete(T, {iq, User})
           end).

%% @doc Nothing read before now is used any more: raise_floor/1, then
%% purge/1.
-spec invalidate_all(cache()) -> ok.
invalidate_all(Cache) ->
    raise_floor(Cache),
    purge(Cache).

%% @doc The first step of invalidate_all/1, which is all its exactness
%% needs: from now on nothing stamped before is used.
-spec raise_floor(cache()) -> ok.
raise_floor(undefined) ->
    ok;
raise_floor(#{flags := Flags}) ->
    atomics:put(Flags, ?FLOOR, stamp()).

%% @doc The second step of invalidate_all/1: frees the records that the
%% floor has made useless, those all of whose stamps are below it (see the
%% module doc); any other record stays. Exported for tests, which run other
%% calls between the two steps.
-spec purge(cache()) -> ok.
purge(undefined) ->
    ok;
purge(#{table := T, flags := Flags}) ->
    %% The floor now: another invalidate_all may have raised it since ours,
    %% and what is below it is as useless.
    Floor = atomics:get(Flags, ?FLOOR),
    Below = fun(Stamp) -> {'<', Stamp, Floor} end,
    Spec = [{{{user, '_'}, '$1', '$2'},
             [Below('$1'), {'orelse', {'==', '$2', none}, Below('$2')}], [true]},
            {{{roster, '_'}, '$1', '_'}, [Below('$1')], [true]},
            {{{iq, '_'}, '$1', '_'}, [Below('$1')], [true]},
            {{{contact, '_', '_'}, '$1', '_'}, [Below('$1')], [true]}],
    safely(fun() -> ets:select_delete(T, Spec) end).

%% @doc Turns answering from the cache on or off. Turning it on must follow
%% an invalidate_all/1 made once changes are reported again.
-spec set_live(cache(), boolean()) -> ok.
set_live(undefined, _) ->
    ok;
set_live(#{flags := Flags}, Live) ->
    atomics:put(Flags, ?LIVE, case Live of true -> 1; false -> 0 end).

-spec is_live(cache()) -> boolean().
is_live(undefined) -> false;
is_live(#{flags := Flags}) -> atomics:get(Flags, ?LIVE) == 1.

%% @doc Records in the table (0 when there is none).
-spec records(cache()) -> non_neg_integer().
records(undefined) -> 0;
records(#{table := T}) ->
    case ets:info(T, size) of
        undefined -> 0;
        N -> N
    end.

%%%===================================================================
%%% Internal
%%%===================================================================

invalidated_at(T, User) ->
    case ets:lookup(T, {user, User}) of
        [{_, At, _}] -> At;
        [] -> 0
    end.

newer_load(T, User, LoadedAt) ->
    case ets:lookup(T, {user, User}) of
        [{_, _, Load}] when is_integer(Load) -> Load > LoadedAt;
        _ -> false
    end.

%% Read after the entry and the user's record: see the module doc.
usable(Stamp, #{flags := Flags}) ->
    Stamp > atomics:get(Flags, ?FLOOR) andalso atomics:get(Flags, ?LIVE) == 1.

%% Storing what cannot be used would only take room.
storable(ReadAt, User, #{table := T} = Cache) ->
    usable(ReadAt, Cache) andalso ReadAt > invalidated_at(T, User).

make_room(N, #{max := Max}) when N > Max ->
    false;
make_room(N, #{table := T, max := Max} = Cache) ->
    case ets:info(T, size) + N > Max of
        true ->
            invalidate_all(Cache),
            false;
        false ->
            true
    end.

safely(Fun) ->
    try Fun() of
        _ -> ok
    catch error:badarg ->
            ok
    end.
