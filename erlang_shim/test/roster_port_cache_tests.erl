%%% EUnit tests of the read cache's rules (roster_port_cache), on a real ETS
%%% table. Who calls invalidate when is tested against a real program in
%%% roster_port_pool_tests.
-module(roster_port_cache_tests).
-include_lib("eunit/include/eunit.hrl").

-define(U, <<"u@x">>).
-define(V, <<"v@x">>).

with_cache(Max, Test) ->
    Cache = roster_port_cache:new(roster_port_cache_tests_table, Max),
    ok = roster_port_cache:set_live(Cache, true),
    try Test(Cache)
    after ets:delete(roster_port_cache_tests_table)
    end.

cache_test_() ->
    [{Title, fun() -> with_cache(100, Test) end}
     || {Title, Test} <-
            [{"a stored read is answered", fun stored_read_is_answered/1},
             {"invalidating a user voids only that user", fun invalidate_one_user/1},
             {"a read sent before an invalidation is never used (d)",
              fun read_sent_before_invalidation/1},
             {"a read sent after an invalidation is used", fun read_sent_after_invalidation/1},
             {"a read sent before invalidate_all is never used", fun read_before_invalidate_all/1},
             {"nothing is answered while the cache is not live", fun not_live/1},
             {"jid_info: loaded contacts, absent ones, another load's", fun jid_info_load/1},
             {"jid_info: an older load does not replace a newer one", fun older_load_loses/1},
             {"jid_info: a load sent before an invalidation is never used (d)",
              fun load_sent_before_invalidation/1},
             {"roster IQ: an answer is kept with its ver and feeds roster_get",
              fun iq_answer_kept/1},
             {"roster IQ: a ver-only answer, and it never hides the items",
              fun iq_ver_only/1},
             {"roster IQ: a get sent before an invalidation is never used (d)",
              fun iq_read_sent_before_invalidation/1},
             {"roster IQ: nothing answered while not live, or after invalidate_all",
              fun iq_not_live/1},
             {"an invalidation made while invalidate_all runs survives its purge",
              fun invalidation_during_invalidate_all/1},
             {"invalidate_all's purge keeps what was stored after the floor moved",
              fun purge_keeps_newer_records/1}]] ++
        [{"a full cache is emptied; too big a load is not kept",
          fun() -> with_cache(5, fun bound/1) end}].

stored_read_is_answered(C) ->
    ?assertEqual(miss, roster_port_cache:lookup_roster(C, ?U)),
    T0 = roster_port_cache:stamp(),
    roster_port_cache:store_roster(C, ?U, T0, [item]),
    ?assertEqual({ok, [item]}, roster_port_cache:lookup_roster(C, ?U)).

invalidate_one_user(C) ->
    T0 = roster_port_cache:stamp(),
    roster_port_cache:store_roster(C, ?U, T0, [u]),
    roster_port_cache:store_roster(C, ?V, T0, [v]),
    roster_port_cache:invalidate(C, ?U),
    ?assertEqual(miss, roster_port_cache:lookup_roster(C, ?U)),
    ?assertEqual({ok, [v]}, roster_port_cache:lookup_roster(C, ?V)).

read_sent_before_invalidation(C) ->
    %% The read is sent, a write of U is sent (invalidating U), then the
    %% read's answer comes back and is stored: it must not be used.
    ReadAt = roster_port_cache:stamp(),
    roster_port_cache:invalidate(C, ?U),
    roster_port_cache:store_roster(C, ?U, ReadAt, [old]),
    ?assertEqual(miss, roster_port_cache:lookup_roster(C, ?U)),
    %% The same when the answer was stored first and the invalidation came
    %% in between (the store and a lookup race with it).
    ReadAt2 = roster_port_cache:stamp(),
    roster_port_cache:store_roster(C, ?U, ReadAt2, [old2]),
    roster_port_cache:invalidate(C, ?U),
    ?assertEqual(miss, roster_port_cache:lookup_roster(C, ?U)),
    %% An older read stored late does not shadow the invalidation either.
    roster_port_cache:store_roster(C, ?U, ReadAt, [older]),
    ?assertEqual(miss, roster_port_cache:lookup_roster(C, ?U)).

read_sent_after_invalidation(C) ->
    roster_port_cache:invalidate(C, ?U),
    ReadAt = roster_port_cache:stamp(),
    roster_port_cache:store_roster(C, ?U, ReadAt, [new]),
    ?assertEqual({ok, [new]}, roster_port_cache:lookup_roster(C, ?U)).

read_before_invalidate_all(C) ->
    ReadAt = roster_port_cache:stamp(),
    roster_port_cache:store_roster(C, ?V, ReadAt, [v]),
    roster_port_cache:invalidate(C, ?U),
    roster_port_cache:invalidate_all(C),
    %% Emptying dropped U's invalidation record; the floor still voids the
    %% read that was in flight.
    roster_port_cache:store_roster(C, ?U, ReadAt, [old]),
    ?assertEqual(miss, roster_port_cache:lookup_roster(C, ?U)),
    ?assertEqual(miss, roster_port_cache:lookup_roster(C, ?V)),
    ReadAt2 = roster_port_cache:stamp(),
    roster_port_cache:store_roster(C, ?U, ReadAt2, [new]),
    ?assertEqual({ok, [new]}, roster_port_cache:lookup_roster(C, ?U)).

not_live(C) ->
    T0 = roster_port_cache:stamp(),
    roster_port_cache:store_roster(C, ?U, T0, [u]),
    roster_port_cache:set_live(C, false),
    ?assertEqual(miss, roster_port_cache:lookup_roster(C, ?U)),
    ?assertEqual(off, roster_port_cache:lookup_jid_info(C, ?U, <<"c">>)),
    %% Nothing is stored meanwhile either.
    T1 = roster_port_cache:stamp(),
    roster_port_cache:store_roster(C, ?V, T1, [v]),
    roster_port_cache:set_live(C, true),
    ?assertEqual(miss, roster_port_cache:lookup_roster(C, ?V)),
    ?assertEqual(off, roster_port_cache:lookup_jid_info(undefined, ?U, <<"c">>)),
    ?assertEqual(miss, roster_port_cache:lookup_roster(undefined, ?U)).

jid_info_load(C) ->
    ?assertEqual(not_loaded, roster_port_cache:lookup_jid_info(C, ?U, a)),
    T0 = roster_port_cache:stamp(),
    roster_port_cache:store_jid_info(C, ?U, T0, [{a, {both, none, [<<"g">>]}},
                                                 {stranger, {none, in, []}}]),
    ?assertEqual({ok, {both, none, [<<"g">>]}}, roster_port_cache:lookup_jid_info(C, ?U, a)),
    ?assertEqual({ok, {none, in, []}}, roster_port_cache:lookup_jid_info(C, ?U, stranger)),
    ?assertEqual({ok, absent}, roster_port_cache:lookup_jid_info(C, ?U, nobody)),
    ?assertEqual(not_loaded, roster_port_cache:lookup_jid_info(C, ?V, a)),
    %% U's roster changes: reloaded without `a`; a's record from the old
    %% load is not taken for the new one.
    roster_port_cache:invalidate(C, ?U),
    ?assertEqual(not_loaded, roster_port_cache:lookup_jid_info(C, ?U, a)),
    T1 = roster_port_cache:stamp(),
    roster_port_cache:store_jid_info(C, ?U, T1, [{b, {to, none, []}}]),
    ?assertEqual(unknown, roster_port_cache:lookup_jid_info(C, ?U, a)),
    ?assertEqual({ok, {to, none, []}}, roster_port_cache:lookup_jid_info(C, ?U, b)).

older_load_loses(C) ->
    Old = roster_port_cache:stamp(),
    New = roster_port_cache:stamp(),
    roster_port_cache:store_jid_info(C, ?U, New, [{a, {both, none, []}}]),
    roster_port_cache:store_jid_info(C, ?U, Old, [{a, {none, none, []}}]),
    ?assertEqual({ok, {both, none, []}}, roster_port_cache:lookup_jid_info(C, ?U, a)),
    ?assertEqual({ok, absent}, roster_port_cache:lookup_jid_info(C, ?U, b)).

load_sent_before_invalidation(C) ->
    LoadedAt = roster_port_cache:stamp(),
    roster_port_cache:invalidate(C, ?U),
    roster_port_cache:store_jid_info(C, ?U, LoadedAt, [{a, {both, none, []}}]),
    ?assertEqual(not_loaded, roster_port_cache:lookup_jid_info(C, ?U, a)),
    LoadedAt2 = roster_port_cache:stamp(),
    roster_port_cache:invalidate_all(C),
    roster_port_cache:store_jid_info(C, ?U, LoadedAt2, [{a, {both, none, []}}]),
    ?assertEqual(not_loaded, roster_port_cache:lookup_jid_info(C, ?U, a)).

bound(C) ->
    T0 = roster_port_cache:stamp(),
    roster_port_cache:store_jid_info(C, ?U, T0, [{a, x}, {b, x}, {c, x}]),
    ?assertEqual(4, roster_port_cache:records(C)),
    ?assertEqual({ok, x}, roster_port_cache:lookup_jid_info(C, ?U, a)),
    %% Two more records do not fit: the table is emptied, this read not kept.
    roster_port_cache:store_jid_info(C, ?V, roster_port_cache:stamp(), [{a, y}]),
    ?assertEqual(0, roster_port_cache:records(C)),
    ?assertEqual(not_loaded, roster_port_cache:lookup_jid_info(C, ?U, a)),
    ?assertEqual(not_loaded, roster_port_cache:lookup_jid_info(C, ?V, a)),
    %% A load over the bound on its own is never kept.
    roster_port_cache:store_jid_info(C, ?U, roster_port_cache:stamp(),
                                     [{N, x} || N <- lists:seq(1, 5)]),
    ?assertEqual(0, roster_port_cache:records(C)),
    %% Then it works again.
    roster_port_cache:store_roster(C, ?U, roster_port_cache:stamp(), [u]),
    ?assertEqual({ok, [u]}, roster_port_cache:lookup_roster(C, ?U)).

iq_answer_kept(C) ->
    ?assertEqual(miss, roster_port_cache:lookup_iq(C, ?U)),
    ReadAt = roster_port_cache:stamp(),
    roster_port_cache:store_iq(C, ?U, ReadAt, {<<"v1">>, query1}, [item]),
    ?assertEqual({ok, {<<"v1">>, query1}}, roster_port_cache:lookup_iq(C, ?U)),
    %% The same read's items answer the roster_get hook.
    ?assertEqual({ok, [item]}, roster_port_cache:lookup_roster(C, ?U)),
    ?assertEqual(miss, roster_port_cache:lookup_iq(C, ?V)),
    %% A write (or a roster_changed) voids both.
    roster_port_cache:invalidate(C, ?U),
    ?assertEqual(miss, roster_port_cache:lookup_iq(C, ?U)),
    ?assertEqual(miss, roster_port_cache:lookup_roster(C, ?U)),
    %% The next answer, with the new ver, is kept.
    ReadAt2 = roster_port_cache:stamp(),
    roster_port_cache:store_iq(C, ?U, ReadAt2, {<<"v2">>, query2}, [item2]),
    ?assertEqual({ok, {<<"v2">>, query2}}, roster_port_cache:lookup_iq(C, ?U)),
    ?assertEqual({ok, [item2]}, roster_port_cache:lookup_roster(C, ?U)),
    %% A roster_get answer does not void the IQ answer.
    roster_port_cache:store_roster(C, ?U, roster_port_cache:stamp(), [item2]),
    ?assertEqual({ok, {<<"v2">>, query2}}, roster_port_cache:lookup_iq(C, ?U)).

iq_ver_only(C) ->
    %% The program answered "your ver is current": the ver alone is kept,
    %% without any roster_get answer.
    roster_port_cache:store_iq(C, ?U, roster_port_cache:stamp(), {<<"v1">>, nil}, nil),
    ?assertEqual({ok, {<<"v1">>, nil}}, roster_port_cache:lookup_iq(C, ?U)),
    ?assertEqual(miss, roster_port_cache:lookup_roster(C, ?U)),
    %% Items of the same ver replace it...
    roster_port_cache:store_iq(C, ?U, roster_port_cache:stamp(), {<<"v1">>, query}, [item]),
    ?assertEqual({ok, {<<"v1">>, query}}, roster_port_cache:lookup_iq(C, ?U)),
    %% ... and a later ver-only answer of that ver does not hide them.
    roster_port_cache:store_iq(C, ?U, roster_port_cache:stamp(), {<<"v1">>, nil}, nil),
    ?assertEqual({ok, {<<"v1">>, query}}, roster_port_cache:lookup_iq(C, ?U)),
    ?assertEqual({ok, [item]}, roster_port_cache:lookup_roster(C, ?U)),
    %% Versioning off: items without a ver.
    roster_port_cache:store_iq(C, ?V, roster_port_cache:stamp(), {nil, query}, [item]),
    ?assertEqual({ok, {nil, query}}, roster_port_cache:lookup_iq(C, ?V)).

iq_read_sent_before_invalidation(C) ->
    %% Sent, then the roster changes, then the (old) answer comes back.
    ReadAt = roster_port_cache:stamp(),
    roster_port_cache:invalidate(C, ?U),
    roster_port_cache:store_iq(C, ?U, ReadAt, {<<"old">>, old}, [old]),
    ?assertEqual(miss, roster_port_cache:lookup_iq(C, ?U)),
    ?assertEqual(miss, roster_port_cache:lookup_roster(C, ?U)),
    %% Stored first, invalidated after: not used either.
    ReadAt2 = roster_port_cache:stamp(),
    roster_port_cache:store_iq(C, ?U, ReadAt2, {<<"old2">>, old2}, [old2]),
    roster_port_cache:invalidate(C, ?U),
    ?assertEqual(miss, roster_port_cache:lookup_iq(C, ?U)),
    %% A ver-only answer sent before is not used either.
    ReadAt3 = roster_port_cache:stamp(),
    roster_port_cache:invalidate(C, ?U),
    roster_port_cache:store_iq(C, ?U, ReadAt3, {<<"old3">>, nil}, nil),
    ?assertEqual(miss, roster_port_cache:lookup_iq(C, ?U)).

iq_not_live(C) ->
    ReadAt = roster_port_cache:stamp(),
    roster_port_cache:store_iq(C, ?U, ReadAt, {<<"v1">>, q}, [i]),
    roster_port_cache:set_live(C, false),
    ?assertEqual(miss, roster_port_cache:lookup_iq(C, ?U)),
    ?assertEqual(miss, roster_port_cache:lookup_roster(C, ?U)),
    %% Sent while off (the feed was down): never used once on again.
    ReadAt2 = roster_port_cache:stamp(),
    roster_port_cache:store_iq(C, ?V, ReadAt2, {<<"v1">>, q}, [i]),
    roster_port_cache:invalidate_all(C),
    roster_port_cache:set_live(C, true),
    ?assertEqual(miss, roster_port_cache:lookup_iq(C, ?U)),
    ?assertEqual(miss, roster_port_cache:lookup_iq(C, ?V)),
    %% A get sent before invalidate_all, answered after it: not kept.
    ReadAt3 = roster_port_cache:stamp(),
    roster_port_cache:invalidate_all(C),
    roster_port_cache:store_iq(C, ?U, ReadAt3, {<<"v1">>, q}, [i]),
    ?assertEqual(miss, roster_port_cache:lookup_iq(C, ?U)),
    ?assertEqual(miss, roster_port_cache:lookup_iq(undefined, ?U)),
    ok = roster_port_cache:store_iq(undefined, ?U, 1, {<<"v">>, q}, [i]).

%% invalidate_all/1 is raise_floor/1 then purge/1; other processes run in
%% between. Here: the floor moves, a read of U is sent (stamped above the
%% floor), a write of U is sent (invalidate), the purge runs, then the
%% read's answer (which may predate the write) comes back.
invalidation_during_invalidate_all(C) ->
    roster_port_cache:raise_floor(C),
    ReadAt = roster_port_cache:stamp(),
    roster_port_cache:invalidate(C, ?U),
    roster_port_cache:purge(C),
    roster_port_cache:store_roster(C, ?U, ReadAt, [stale]),
    ?assertEqual(miss, roster_port_cache:lookup_roster(C, ?U)),
    roster_port_cache:store_iq(C, ?U, ReadAt, {<<"v0">>, stale}, [stale]),
    ?assertEqual(miss, roster_port_cache:lookup_iq(C, ?U)),
    roster_port_cache:store_jid_info(C, ?U, ReadAt, [{a, stale}]),
    ?assertEqual(not_loaded, roster_port_cache:lookup_jid_info(C, ?U, a)),
    %% The same with the invalidation made after the purge started, then
    %% the purge of a later invalidate_all.
    roster_port_cache:raise_floor(C),
    ReadAt2 = roster_port_cache:stamp(),
    roster_port_cache:purge(C),
    roster_port_cache:invalidate(C, ?V),
    roster_port_cache:purge(C),
    roster_port_cache:store_roster(C, ?V, ReadAt2, [stale]),
    ?assertEqual(miss, roster_port_cache:lookup_roster(C, ?V)),
    %% A read sent after the invalidation is used.
    ReadAt3 = roster_port_cache:stamp(),
    roster_port_cache:store_roster(C, ?U, ReadAt3, [new]),
    ?assertEqual({ok, [new]}, roster_port_cache:lookup_roster(C, ?U)).

purge_keeps_newer_records(C) ->
    Old = roster_port_cache:stamp(),
    roster_port_cache:store_roster(C, ?V, Old, [old]),
    roster_port_cache:store_jid_info(C, ?V, Old, [{a, old}]),
    roster_port_cache:invalidate(C, ?V),
    roster_port_cache:raise_floor(C),
    %% Read (and stored) after the floor moved: still good after the purge.
    New = roster_port_cache:stamp(),
    roster_port_cache:store_roster(C, ?U, New, [new]),
    roster_port_cache:store_iq(C, ?U, New, {<<"v1">>, q}, [new]),
    roster_port_cache:store_jid_info(C, ?U, New, [{a, {both, none, []}}]),
    Before = roster_port_cache:records(C),
    roster_port_cache:purge(C),
    %% U's record has its invalidation stamp (0) below the floor and its
    %% load above it: kept, and the load answers.
    ?assertEqual({ok, [new]}, roster_port_cache:lookup_roster(C, ?U)),
    ?assertEqual({ok, {<<"v1">>, q}}, roster_port_cache:lookup_iq(C, ?U)),
    ?assertEqual({ok, {both, none, []}}, roster_port_cache:lookup_jid_info(C, ?U, a)),
    ?assertEqual({ok, absent}, roster_port_cache:lookup_jid_info(C, ?U, b)),
    %% What is all below the floor is gone: V's record and V's contact.
    ?assertEqual(Before - 2, roster_port_cache:records(C)),
    ?assertEqual(miss, roster_port_cache:lookup_roster(C, ?V)),
    ?assertEqual(not_loaded, roster_port_cache:lookup_jid_info(C, ?V, a)).

writes_test() ->
    ?assert(roster_port_cache:writes(<<"roster_iq">>, #{<<"type">> => <<"set">>})),
    ?assertNot(roster_port_cache:writes(<<"roster_iq">>, #{<<"type">> => <<"get">>})),
    [?assert(roster_port_cache:writes(Op, #{}))
     || Op <- [<<"in_subscription">>, <<"out_subscription">>, <<"remove_user">>,
               <<"store_set_item">>, <<"store_del_item">>, <<"store_remove_user">>,
               <<"some_future_op">>]],
    [?assertNot(roster_port_cache:writes(Op, #{}))
     || Op <- [<<"roster_get">>, <<"jid_info">>, <<"pending_in">>, <<"store_get_roster">>,
               <<"store_get_item">>, <<"store_read_version">>, <<"ping">>, <<"hello">>]].

no_cache_test() ->
    ok = roster_port_cache:store_roster(undefined, ?U, 1, []),
    ok = roster_port_cache:invalidate(undefined, ?U),
    ok = roster_port_cache:invalidate_all(undefined),
    %% A handle whose table is gone (pool stopping) behaves as no cache.
    Gone = roster_port_cache:handle(roster_port_cache_tests_gone, 10),
    roster_port_cache:set_live(Gone, true),
    ?assertEqual(miss, roster_port_cache:lookup_roster(Gone, ?U)),
    ?assertEqual(off, roster_port_cache:lookup_jid_info(Gone, ?U, a)),
    ok = roster_port_cache:store_roster(Gone, ?U, roster_port_cache:stamp(), []),
    ok = roster_port_cache:invalidate(Gone, ?U),
    ok = roster_port_cache:invalidate_all(Gone).
