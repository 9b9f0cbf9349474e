%%% EUnit tests of roster_port_compose: the roster_get hook's fold around the
%%% program's items, and the composed version. ejabberd_hooks' table is
%%% made here as ejabberd keeps it ({{Hook, Host}, [{Seq, Module, Function}]},
%%% sorted), with handlers of this module standing for mod_shared_roster
%%% (merging members with a label, adding the others) and others.
-module(roster_port_compose_tests).
-include_lib("eunit/include/eunit.hrl").
-include("xmpp.hrl").

-export([shared/2, relabelled/2, stopper/2, crasher/2, early/2]).

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
      fun a_push_never_makes_a_stale_roster_current/0,
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

%% The same group, relabelled "Crew".
relabelled(Items, US) ->
    [I#roster_item{groups = [case G of <<"Team">> -> <<"Crew">>; _ -> G end
                             || G <- I#roster_item.groups]} || I <- shared(Items, US)].

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
    ?assertEqual(<<"7">>, roster_port_compose:composed_ver(<<"7">>, Program, Program)),
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
    set_members([<<"alice">>, <<"bob">>]),
    ?assertMatch({nil, _}, roster_port_compose:iq_answer(?HOST, <<"alice">>, nil,
                                                        {nil, {program_query, [], []}}, false)).

%% The version of alice's get when the program holds nothing for her.
ver() ->
    {Ver, _} = roster_port_compose:iq_answer(?HOST, <<"alice">>, nil,
                                             {<<"7">>, {program_query, [], []}}, false),
    Ver.

a_get_with_the_composed_version_is_current() ->
    set_handlers([?OURS, {70, ?MODULE, shared}]),
    set_members([<<"alice">>, <<"bob">>]),
    Items = [item(<<"dave">>, from, [])],
    Read = {<<"7">>, {program_query, Items, []}},
    {Ver, Query} = roster_port_compose:iq_answer(?HOST, <<"alice">>, <<"7">>, Read, false),
    ?assertMatch(<<"7+", _/binary>>, Ver),
    ?assertMatch(#roster_query{ver = Ver, items = [_, _]}, Query),
    ?assertEqual(current, roster_port_compose:iq_answer(?HOST, <<"alice">>, Ver, Read, false)),
    %% The version is the answer's own: another roster of the program, another version.
    {Other, _} = roster_port_compose:iq_answer(?HOST, <<"alice">>, nil,
                                               {<<"7">>, {program_query, [], []}}, false),
    ?assertNotEqual(Ver, Other),
    %% Nothing added: the program's own answer, with its own version.
    set_members([]),
    ?assertEqual({<<"7">>, program_query},
                 roster_port_compose:iq_answer(?HOST, <<"alice">>, Ver, Read, false)),
    ?assertEqual(current, roster_port_compose:iq_answer(?HOST, <<"alice">>, <<"7">>, Read, false)).

a_push_is_the_composed_item() ->
    set_handlers([?OURS, {70, ?MODULE, shared}]),
    set_members([<<"alice">>, <<"bob">>]),
    Renamed = (wire(<<"bob">>, <<"none">>, [<<"Friends">>, <<"Team">>]))#{<<"name">> => <<"B">>},
    #roster_query{ver = PushVer} = Push =
        roster_port_compose:push_query(?HOST, <<"alice">>, Renamed, <<"7">>),
    ?assertMatch(#roster_query{items = [#roster_item{subscription = both, name = <<"B">>,
                                                     groups = [<<"Friends">>, <<"Team">>]}]},
                 Push),
    %% A shared contact removed from one's own roster stays, as the group shows it.
    ?assertMatch(#roster_query{items = [#roster_item{subscription = both,
                                                     groups = [<<"Team">>]}]},
                 roster_port_compose:push_query(?HOST, <<"alice">>,
                                                wire(<<"bob">>, <<"remove">>, []), <<"8">>)),
    ?assertMatch(#roster_query{items = [#roster_item{subscription = remove}]},
                 roster_port_compose:push_query(?HOST, <<"alice">>,
                                                wire(<<"erin">>, <<"remove">>, []), <<"8">>)),
    %% Nothing shared for alice: the program's push, with the program's version.
    set_members([]),
    ?assertMatch(#roster_query{ver = <<"7">>},
                 roster_port_compose:push_query(?HOST, <<"alice">>,
                                                wire(<<"dave">>, <<"to">>, []), <<"7">>)),
    set_members([<<"alice">>, <<"bob">>]),
    ?assertMatch(<<"7+push.", _/binary>>, PushVer).

%% The review's case: the group is relabelled (mod_shared_roster pushes
%% nothing), then an unrelated contact is renamed and pushed. The client,
%% whose roster shows the old label, must not be told its roster is current.
a_push_never_makes_a_stale_roster_current() ->
    set_handlers([?OURS, {70, ?MODULE, shared}]),
    set_members([<<"alice">>, <<"bob">>]),
    Read = {<<"7">>, {program_query, [], []}},
    {Before, _} = roster_port_compose:iq_answer(?HOST, <<"alice">>, nil, Read, false),
    set_handlers([?OURS, {70, ?MODULE, relabelled}]),
    #roster_query{ver = PushVer} =
        roster_port_compose:push_query(?HOST, <<"alice">>, wire(<<"frank">>, <<"to">>, []),
                                       <<"8">>),
    After = {<<"8">>, {program_query, [item(<<"frank">>, to, [])], []}},
    ?assertMatch({_, #roster_query{}},
                 roster_port_compose:iq_answer(?HOST, <<"alice">>, PushVer, After, false)),
    ?assertNotEqual(Before, PushVer).

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
