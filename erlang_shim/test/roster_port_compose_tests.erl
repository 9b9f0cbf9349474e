%%% EUnit tests of roster_port_compose: the roster_get hook's fold around the
%%% program's items, and the composed version. ejabberd_hooks' table is
%%% made here as ejabberd keeps it ({{Hook, Host}, [{Seq, Module, Function}]},
%%% sorted), with handlers of this module standing for mod_shared_roster
%%% (merging members with a label, adding the others) and others.
-module(roster_port_compose_tests).
-include_lib("eunit/include/eunit.hrl").
-include("xmpp.hrl").

-export([shared/2, stopper/2, crasher/2, early/2]).

-define(HOST, <<"example.com">>).
-define(OURS, {50, mod_roster_port_hooks, roster_get}).
-define(MOD_ROSTERS, {50, mod_roster, get_user_roster_items}).

compose_test_() ->
    {setup,
     fun() ->
             {ok, _} = application:ensure_all_started(xmpp),
             ets:new(hooks, [named_table, public]),
             ets:new(compose_tests_members, [named_table, public])
     end,
     fun(_) -> ets:delete(hooks), ets:delete(compose_tests_members) end,
     [fun without_other_handlers_everything_is_the_programs/0,
      fun shared_members_are_merged_and_added_without_duplicate_groups/0,
      fun the_version_follows_the_contribution/0,
      fun a_get_with_the_composed_version_is_current/0,
      fun a_push_is_the_composed_item/0,
      fun stop_and_crashes_follow_the_hooks_rules/0,
      fun handlers_before_ours_run_on_the_empty_roster/0]}.

%% mod_shared_roster's way: each member of the "Team" group (the table) is
%% subscription both with the label appended to its groups; the others
%% are added.
shared(Items, {LUser, _}) ->
    Members = [M || {M} <- ets:tab2list(compose_tests_members), M /= LUser],
    {Merged, Rest} = lists:mapfoldl(
                       fun(#roster_item{jid = #jid{luser = U}} = I, Left) ->
                               case lists:member(U, Left) of
                                   true ->
                                       {I#roster_item{subscription = both, ask = undefined,
                                                      groups = I#roster_item.groups ++ [<<"Team">>]},
                                        Left -- [U]};
                                   false ->
                                       {I, Left}
                               end
                       end, Members, Items),
    [item(U, both, [<<"Team">>]) || U <- lists:sort(Rest)] ++ Merged.

stopper(_Items, _US) -> {stop, [item(<<"only">>, both, [])]}.
crasher(_Items, _US) -> error(boom).
early(Acc, _US) -> [item(<<"early">>, to, []) | Acc].

item(U, Sub, Groups) ->
    #roster_item{jid = jid:make(U, ?HOST), name = <<>>, subscription = Sub,
                 ask = undefined, groups = Groups}.

set_handlers(Ls) ->
    ets:insert(hooks, {{roster_get, ?HOST}, lists:sort(Ls)}).

set_members(Ms) ->
    ets:delete_all_objects(compose_tests_members),
    ets:insert(compose_tests_members, [{M} || M <- Ms]).

wire(U, Sub, Groups) ->
    #{<<"jid">> => <<U/binary, "@", ?HOST/binary>>, <<"name">> => nil,
      <<"subscription">> => Sub, <<"ask">> => nil, <<"groups">> => Groups}.

without_other_handlers_everything_is_the_programs() ->
    set_handlers([?OURS, ?MOD_ROSTERS]),
    Program = [item(<<"bob">>, to, [<<"Friends">>])],
    ?assertNot(roster_port_compose:active(?HOST)),
    ?assertEqual(Program, roster_port_compose:compose(?HOST, <<"alice">>, Program)),
    ?assertEqual([], roster_port_compose:contribution(?HOST, <<"alice">>)),
    ?assertEqual(<<"7">>, roster_port_compose:composed_ver(<<"7">>, [])),
    Wire = wire(<<"bob">>, <<"to">>, [<<"Friends">>]),
    ?assertEqual(roster_port_wire:roster_query([Wire], <<"7">>),
                 roster_port_compose:push_query(?HOST, <<"alice">>, Wire, <<"7">>)).

shared_members_are_merged_and_added_without_duplicate_groups() ->
    set_handlers([?OURS, {70, ?MODULE, shared}]),
    set_members([<<"alice">>, <<"bob">>, <<"carol">>]),
    ?assert(roster_port_compose:active(?HOST)),
    Program = [item(<<"bob">>, none, [<<"Team">>, <<"Friends">>]),
               item(<<"dave">>, from, [])],
    ?assertEqual([item(<<"carol">>, both, [<<"Team">>]),
                  item(<<"bob">>, both, [<<"Team">>, <<"Friends">>]),
                  item(<<"dave">>, from, [])],
                 roster_port_compose:compose(?HOST, <<"alice">>, Program)).

the_version_follows_the_contribution() ->
    set_handlers([?OURS, {70, ?MODULE, shared}]),
    set_members([<<"alice">>, <<"bob">>]),
    V1 = ver(),
    ?assertMatch(<<"7+", _/binary>>, V1),
    ?assertEqual(V1, ver()),
    set_members([<<"alice">>, <<"bob">>, <<"carol">>]),
    V2 = ver(),
    ?assertNotEqual(V1, V2),
    set_members([<<"alice">>, <<"bob">>]),
    ?assertEqual(V1, ver()),
    %% alice alone: nothing is added, the version is the program's.
    set_members([<<"alice">>]),
    ?assertEqual(<<"7">>, ver()),
    ?assertEqual(nil, roster_port_compose:composed_ver(
                        nil, roster_port_compose:contribution(?HOST, <<"bob">>))).

ver() ->
    roster_port_compose:composed_ver(<<"7">>, roster_port_compose:contribution(?HOST, <<"alice">>)).

a_get_with_the_composed_version_is_current() ->
    set_handlers([?OURS, {70, ?MODULE, shared}]),
    set_members([<<"alice">>, <<"bob">>]),
    Items = [item(<<"dave">>, from, [])],
    Read = {<<"7">>, {program_query, Items, []}},
    {Ver, Query} = roster_port_compose:iq_answer(?HOST, <<"alice">>, <<"7">>, Read, false),
    ?assertEqual(ver(), Ver),
    ?assertMatch(#roster_query{ver = Ver, items = [_, _]}, Query),
    ?assertEqual(current, roster_port_compose:iq_answer(?HOST, <<"alice">>, Ver, Read, false)),
    %% Nothing added: the program's own answer, with its own version.
    set_members([]),
    ?assertEqual({<<"7">>, program_query},
                 roster_port_compose:iq_answer(?HOST, <<"alice">>, Ver, Read, false)),
    ?assertEqual(current, roster_port_compose:iq_answer(?HOST, <<"alice">>, <<"7">>, Read, false)).

a_push_is_the_composed_item() ->
    set_handlers([?OURS, {70, ?MODULE, shared}]),
    set_members([<<"alice">>, <<"bob">>]),
    Ver = ver(),
    Renamed = (wire(<<"bob">>, <<"none">>, [<<"Friends">>, <<"Team">>]))#{<<"name">> => <<"B">>},
    ?assertMatch(#roster_query{ver = Ver,
                               items = [#roster_item{subscription = both, name = <<"B">>,
                                                     groups = [<<"Friends">>, <<"Team">>]}]},
                 roster_port_compose:push_query(?HOST, <<"alice">>, Renamed, <<"7">>)),
    %% A shared contact removed from one's own roster stays, as the group shows it.
    ?assertMatch(#roster_query{items = [#roster_item{subscription = both,
                                                     groups = [<<"Team">>]}]},
                 roster_port_compose:push_query(?HOST, <<"alice">>,
                                                wire(<<"bob">>, <<"remove">>, []), <<"8">>)),
    ?assertMatch(#roster_query{items = [#roster_item{subscription = remove}]},
                 roster_port_compose:push_query(?HOST, <<"alice">>,
                                                wire(<<"erin">>, <<"remove">>, []), <<"8">>)).

stop_and_crashes_follow_the_hooks_rules() ->
    set_handlers([?OURS, {60, ?MODULE, crasher}, {70, ?MODULE, shared}, {80, ?MODULE, stopper},
                  {90, ?MODULE, early}]),
    set_members([]),
    ?assertEqual([item(<<"only">>, both, [])],
                 roster_port_compose:compose(?HOST, <<"alice">>, [item(<<"bob">>, to, [])])).

handlers_before_ours_run_on_the_empty_roster() ->
    set_handlers([?OURS, {40, ?MODULE, early}]),
    ?assertEqual([item(<<"bob">>, to, []), item(<<"early">>, to, [])],
                 roster_port_compose:compose(?HOST, <<"alice">>, [item(<<"bob">>, to, [])])).
