%%% EUnit tests of roster_port_wire: the conversions between the program's
%%% wire values (docs/protocol.md) and ejabberd's records.
-module(roster_port_wire_tests).
-include_lib("eunit/include/eunit.hrl").
-include("xmpp.hrl").
-include("mod_roster.hrl").

%% jid:decode/1 and friends need the xmpp application's NIFs.
wire_test_() ->
    {setup, fun() -> {ok, _} = application:ensure_all_started(xmpp) end,
     [fun wire_item_to_roster_item/0,
      fun approved_items_are_marked_in_the_query/0,
      fun a_query_without_approved_items_stays_a_record/0,
      fun client_item/0,
      fun stanza_error/0,
      fun stored_record_round_trip/0,
      fun stored_ask_round_trip/0]}.

wire_item(Jid, Extra) ->
    maps:merge(#{<<"jid">> => Jid, <<"name">> => <<"N">>, <<"subscription">> => <<"to">>,
                 <<"ask">> => <<"subscribe">>, <<"approved">> => false,
                 <<"groups">> => [<<"G">>]}, Extra).

wire_item_to_roster_item() ->
    Item = roster_port_wire:wire_to_roster_item(wire_item(<<"b@x">>, #{})),
    ?assertMatch(#roster_item{name = <<"N">>, subscription = to, ask = subscribe,
                              groups = [<<"G">>]}, Item),
    ?assertEqual(<<"b@x">>, jid:encode(Item#roster_item.jid)),
    %% Unknown or missing values fall back to what a client can read.
    Odd = roster_port_wire:wire_to_roster_item(#{<<"jid">> => <<"c@x">>,
                                                  <<"subscription">> => <<"bogus">>}),
    ?assertMatch(#roster_item{name = <<>>, subscription = none, ask = undefined,
                              groups = []}, Odd).

approved_items_are_marked_in_the_query() ->
    Items = [wire_item(<<"a@x">>, #{<<"approved">> => true}), wire_item(<<"b@x">>, #{})],
    #xmlel{name = <<"query">>, children = Children} =
        roster_port_wire:roster_query(Items, <<"7">>),
    Approved = [fxml:get_tag_attr_s(<<"jid">>, C) || C <- Children,
                                                    fxml:get_tag_attr_s(<<"approved">>, C)
                                                        == <<"true">>],
    ?assertEqual([<<"a@x">>], Approved).

a_query_without_approved_items_stays_a_record() ->
    ?assertMatch(#roster_query{ver = <<"3">>, items = [#roster_item{}]},
                 roster_port_wire:roster_query([wire_item(<<"a@x">>, #{})], <<"3">>)),
    ?assertMatch(#roster_query{ver = undefined},
                 roster_port_wire:roster_query([], nil)).

client_item() ->
    Item = #roster_item{jid = jid:decode(<<"b@x">>), name = <<>>, subscription = none,
                        ask = undefined, groups = [<<"G">>]},
    ?assertEqual(#{<<"jid">> => <<"b@x">>, <<"name">> => nil, <<"subscription">> => <<"none">>,
                   <<"ask">> => nil, <<"groups">> => [<<"G">>]},
                 roster_port_wire:client_item(Item)).

stanza_error() ->
    Error = roster_port_wire:stanza_error(#{<<"type">> => <<"modify">>,
                                            <<"condition">> => <<"jid-malformed">>,
                                            <<"text">> => <<"why">>}, <<"en">>),
    ?assertMatch(#stanza_error{type = modify, reason = 'jid-malformed', text = [_]}, Error),
    Unknown = roster_port_wire:stanza_error(#{<<"type">> => <<"?">>,
                                              <<"condition">> => <<"?">>}, <<"en">>),
    ?assertMatch(#stanza_error{type = cancel, reason = 'undefined-condition', text = []},
                 Unknown).

%% ejabberd 23.01's #roster{} has no `approved` field (mod_roster.hrl), nor
%% the program's `in_roster`, so a record written back says nothing about
%% them: the map has neither key, and the program keeps what it has stored
%% (an `approved => false` would clear a pre-approval on every admin
%% set_item).
stored_record_round_trip() ->
    Map = #{<<"jid">> => <<"b@x">>, <<"name">> => <<"Bob">>, <<"subscription">> => <<"both">>,
            <<"ask">> => <<"in">>, <<"groups">> => [<<"G">>],
            <<"askmessage">> => <<"hi">>},
    Record = roster_port_wire:map_to_record(<<"a">>, <<"x">>,
                                            Map#{<<"approved">> => true,
                                                 <<"in_roster">> => true}),
    ?assertMatch(#roster{us = {<<"a">>, <<"x">>}, jid = {<<"b">>, <<"x">>, <<>>},
                         subscription = both, ask = in, askmessage = <<"hi">>}, Record),
    ?assertEqual(Map, roster_port_wire:record_to_map(Record)),
    %% A record made by mod_roster itself (ejabberdctl add_rosteritem).
    ?assertNot(maps:is_key(<<"approved">>,
                           roster_port_wire:record_to_map(#roster{jid = {<<"c">>, <<"x">>, <<>>}}))).

%% A stranger's pending request as store_get_roster gives it (subscription
%% none, ask in, its text) is written back as it was read: every `ask`
%% value and the text make the round trip unchanged.
stored_ask_round_trip() ->
    [begin
         Map = #{<<"jid">> => <<"s@y">>, <<"name">> => <<>>, <<"subscription">> => <<"none">>,
                 <<"ask">> => Ask, <<"groups">> => [], <<"askmessage">> => <<"let me in">>},
         ?assertEqual({Ask, Map},
                      {Ask, roster_port_wire:record_to_map(
                              roster_port_wire:map_to_record(<<"a">>, <<"x">>, Map))})
     end || Ask <- [<<"none">>, <<"in">>, <<"out">>, <<"both">>, <<"subscribe">>,
                    <<"unsubscribe">>]].
