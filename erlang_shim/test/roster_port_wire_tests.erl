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
      fun stored_ask_round_trip/0,
      fun decode_jid/0,
      fun wire_items_with_undecodable_jids/0,
      fun a_query_with_an_undecodable_jid/0,
      fun stored_records_with_undecodable_jids/0,
      fun jid_info_entries_with_undecodable_jids/0,
      fun pending_requests_with_undecodable_jids/0,
      fun printable_is_bounded_and_escaped/0]}.

%% Contacts that another application can leave in the store and that
%% ejabberd's jid:decode/1 refuses.
undecodable_jids() ->
    [<<"x@[<script>' or 1=1; --]">>, <<"x@[a b", 0, "c]">>, <<"a", 0, "b@example.com">>,
     <<"@example.com">>, <<(binary:copy(<<"a">>, 1024))/binary, "@example.com">>,
     <<"a@example.com/">>, <<>>, <<"a@", 255, 254>>].

wire_item(Jid, Extra) ->
    maps:merge(#{<<"jid">> => Jid, <<"name">> => <<"N">>, <<"subscription">> => <<"to">>,
                 <<"ask">> => <<"subscribe">>, <<"approved">> => false,
                 <<"groups">> => [<<"G">>]}, Extra).

wire_item_to_roster_item() ->
    {[Item], []} = roster_port_wire:roster_items([wire_item(<<"b@x">>, #{})]),
    ?assertMatch(#roster_item{name = <<"N">>, subscription = to, ask = subscribe,
                              groups = [<<"G">>]}, Item),
    ?assertEqual(<<"b@x">>, jid:encode(Item#roster_item.jid)),
    %% Unknown or missing values fall back to what a client can read.
    {[Odd], []} = roster_port_wire:roster_items([#{<<"jid">> => <<"c@x">>,
                                                   <<"subscription">> => <<"bogus">>}]),
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
    {[Record], []} = roster_port_wire:records(<<"a">>, <<"x">>,
                                              [Map#{<<"approved">> => true,
                                                    <<"in_roster">> => true}]),
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
         {[Record], []} = roster_port_wire:records(<<"a">>, <<"x">>, [Map]),
         ?assertEqual({Ask, Map}, {Ask, roster_port_wire:record_to_map(Record)})
     end || Ask <- [<<"none">>, <<"in">>, <<"out">>, <<"both">>, <<"subscribe">>,
                    <<"unsubscribe">>]].


decode_jid() ->
    ?assertMatch({ok, #jid{luser = <<"bob">>, lserver = <<"example.com">>}},
                 roster_port_wire:decode_jid(<<"Bob@Example.COM">>)),
    ?assertMatch({ok, #jid{lserver = <<"[::1]">>}}, roster_port_wire:decode_jid(<<"a@[::1]">>)),
    [?assertEqual({J, error}, {J, roster_port_wire:decode_jid(J)}) || J <- undecodable_jids()],
    [?assertEqual(error, roster_port_wire:decode_jid(T)) || T <- [nil, 42, [<<"a@x">>], #{}]].

%% One wire item whose JID ejabberd cannot parse costs that item only: the
%% others are converted, in order, and the bad JIDs are returned apart.
wire_items_with_undecodable_jids() ->
    Bad = undecodable_jids(),
    Items = [wire_item(<<"a@x">>, #{})] ++ [wire_item(J, #{}) || J <- Bad]
        ++ [wire_item(<<"b@x">>, #{<<"name">> => <<"B">>}), #{<<"name">> => <<"no jid">>},
            not_a_map],
    {Converted, Skipped} = roster_port_wire:roster_items(Items),
    ?assertEqual([<<"a@x">>, <<"b@x">>], [jid:encode(J) || #roster_item{jid = J} <- Converted]),
    ?assertMatch([#roster_item{name = <<"N">>}, #roster_item{name = <<"B">>}], Converted),
    ?assertEqual(Bad ++ [undefined, not_a_map], Skipped).

%% The roster result (and a push) is built from the valid items, with
%% approved='true' on those that carry it, whatever else the list holds.
a_query_with_an_undecodable_jid() ->
    Items = [wire_item(<<"a@x">>, #{<<"approved">> => true}),
             wire_item(<<"x@[a b]">>, #{<<"approved">> => true}),
             wire_item(<<"b@x">>, #{})],
    #xmlel{name = <<"query">>, children = Children} = roster_port_wire:roster_query(Items, <<"7">>),
    ?assertEqual([{<<"a@x">>, <<"true">>}, {<<"b@x">>, <<>>}],
                 [{fxml:get_tag_attr_s(<<"jid">>, C), fxml:get_tag_attr_s(<<"approved">>, C)}
                  || C <- Children]),
    ?assertMatch(#roster_query{ver = <<"3">>, items = [#roster_item{}]},
                 roster_port_wire:roster_query([wire_item(<<"@x">>, #{}),
                                                wire_item(<<"a@x">>, #{})], <<"3">>)).

stored_records_with_undecodable_jids() ->
    Row = fun(J) -> #{<<"jid">> => J, <<"name">> => <<>>, <<"subscription">> => <<"both">>,
                      <<"ask">> => <<"none">>, <<"groups">> => [], <<"askmessage">> => <<>>}
          end,
    {Records, Skipped} =
        roster_port_wire:records(<<"a">>, <<"x">>,
                                 [Row(<<"B@X">>) | [Row(J) || J <- undecodable_jids()]]
                                 ++ [Row(<<"c@x">>)]),
    ?assertEqual([{<<"b">>, <<"x">>, <<>>}, {<<"c">>, <<"x">>, <<>>}],
                 [LJID || #roster{jid = LJID} <- Records]),
    ?assertMatch([#roster{usj = {<<"a">>, <<"x">>, {<<"b">>, <<"x">>, <<>>}}} | _], Records),
    ?assertEqual(undecodable_jids(), Skipped).

jid_info_entries_with_undecodable_jids() ->
    {Entries, Skipped} =
        roster_port_wire:jid_info_entries(
          [#{<<"jid">> => <<"x@[a b]">>, <<"subscription">> => <<"both">>},
           #{<<"jid">> => <<"Bob@X">>, <<"subscription">> => <<"to">>, <<"ask">> => <<"in">>,
             <<"groups">> => [<<"G">>]},
           #{<<"jid">> => <<"eve@x">>, <<"ask">> => <<"in">>}]),
    ?assertEqual([{{<<"bob">>, <<"x">>, <<>>}, {to, in, [<<"G">>]}},
                  {{<<"eve">>, <<"x">>, <<>>}, {none, in, []}}], Entries),
    ?assertEqual([<<"x@[a b]">>], Skipped),
    ?assertEqual({<<"bob">>, <<"x">>, <<>>},
                 roster_port_wire:contact_key(jid:decode(<<"Bob@X/phone">>))).

pending_requests_with_undecodable_jids() ->
    {Requests, Skipped} =
        roster_port_wire:pending_requests(
          [#{<<"from">> => <<"x@[a b", 0, "c]">>, <<"status">> => <<"bad">>},
           #{<<"from">> => <<"d@x">>, <<"status">> => <<"let me in">>},
           #{<<"from">> => <<"e@x">>, <<"status">> => nil}]),
    ?assertMatch([{#jid{luser = <<"d">>}, [#text{data = <<"let me in">>}], [], 0},
                  {#jid{luser = <<"e">>}, [], [], 0}], Requests),
    ?assertEqual([<<"x@[a b", 0, "c]">>], Skipped).

%% The log's view of a JID: at most 100 bytes, quoted, escaped (no control
%% character, no quote or backslash unescaped, nothing outside ASCII).
printable_is_bounded_and_escaped() ->
    ?assertEqual(<<"\"x@[<script>' or 1=1; --]\"">>,
                 roster_port_wire:printable(<<"x@[<script>' or 1=1; --]">>)),
    ?assertEqual(<<"\"x@[a b\\x00c]\\x0a\\\"\\\\\\xc3\\xa9\"">>,
                 roster_port_wire:printable(<<"x@[a b", 0, "c]\n\"\\é"/utf8>>)),
    Long = roster_port_wire:printable(<<(binary:copy(<<"a">>, 1024))/binary, "@example.com">>),
    ?assertEqual(<<"\"", (binary:copy(<<"a">>, 100))/binary, "\"... (1036 bytes)">>, Long),
    Worst = roster_port_wire:printable(binary:copy(<<0>>, 5000)),
    ?assert(byte_size(Worst) < 450),
    ?assertEqual(<<"undefined">>, roster_port_wire:printable(undefined)),
    Deep = roster_port_wire:printable(lists:duplicate(10000, #{<<"k">> => <<"v">>})),
    ?assert(byte_size(Deep) =< 400),
    [?assert(B >= 16#20 andalso B < 16#7f)
     || J <- undecodable_jids() ++ [Worst],
        <<B>> <= roster_port_wire:printable(J)].
