%%% EUnit tests of the whole subscription request (RFC 6121 3.1.3):
%%% roster_port_wire's request_elements/1 (a presence to the protocol's
%%% `request_elements`), request_content/2 (back) and their bounds.
-module(roster_port_request_tests).
-include_lib("eunit/include/eunit.hrl").
-include("xmpp.hrl").

-define(NICK, <<"http://jabber.org/protocol/nick">>).
-define(PARS, <<"urn:xmpp:pars:0">>).

request_test_() ->
    {setup, fun() -> {ok, _} = application:ensure_all_started(xmpp) end,
     [fun a_request_round_trips_whole/0,
      fun a_status_without_a_language_gets_the_stanzas/0,
      fun a_request_without_extended_content/0,
      fun at_most_32_elements_are_kept/0,
      fun an_element_over_the_byte_bound_is_dropped_whole/0,
      fun a_decoded_sub_element_is_encoded/0,
      fun stored_elements_that_do_not_parse_are_dropped/0,
      fun stored_elements_over_the_bounds_are_dropped/0,
      fun without_stored_statuses_the_status_text_is_used/0,
      fun pending_requests_carry_the_whole_request/0,
      fun a_rebuilt_request_encodes_as_it_came/0]}.

nick(Name) ->
    #xmlel{name = <<"nick">>, attrs = [{<<"xmlns">>, ?NICK}],
           children = [{xmlcdata, Name}]}.

preauth(Token) ->
    #xmlel{name = <<"preauth">>, attrs = [{<<"xmlns">>, ?PARS}, {<<"token">>, Token}]}.

subscribe(Statuses, SubEls) ->
    #presence{type = subscribe, from = jid:decode(<<"romeo@montague.lit/orchard">>),
              to = jid:decode(<<"juliet@capulet.lit">>), status = Statuses, sub_els = SubEls}.

a_request_round_trips_whole() ->
    Statuses = [#text{lang = <<"en">>, data = <<"Let me in">>},
                #text{lang = <<"de">>, data = <<"Lass mich <rein> & \"so\"">>}],
    SubEls = [nick(<<"Romeo 🌹"/utf8>>), preauth(<<"8ZgnL2h6">>)],
    {Elements, Dropped} = roster_port_wire:request_elements(subscribe(Statuses, SubEls)),
    ?assertEqual(0, Dropped),
    ?assertEqual(4, length(Elements)),
    ?assert(lists:all(fun is_binary/1, Elements)),
    ?assertEqual({Statuses, SubEls, 0}, roster_port_wire:request_content(<<"Let me in">>, Elements)).

a_status_without_a_language_gets_the_stanzas() ->
    Pres = (subscribe([#text{data = <<"salut">>}, #text{lang = <<"en">>, data = <<"hi">>}], []))
               #presence{lang = <<"fr">>},
    {Elements, 0} = roster_port_wire:request_elements(Pres),
    ?assertMatch({[#text{lang = <<"fr">>, data = <<"salut">>},
                   #text{lang = <<"en">>, data = <<"hi">>}], [], 0},
                 roster_port_wire:request_content(nil, Elements)),
    %% No language anywhere: none is made up.
    {Plain, 0} = roster_port_wire:request_elements(subscribe([#text{data = <<"x">>}], [])),
    ?assertEqual({[#text{lang = <<>>, data = <<"x">>}], [], 0},
                 roster_port_wire:request_content(nil, Plain)).

a_request_without_extended_content() ->
    ?assertEqual({[], 0}, roster_port_wire:request_elements(subscribe([], []))),
    ?assertEqual({[], [], 0}, roster_port_wire:request_content(nil, [])).

at_most_32_elements_are_kept() ->
    SubEls = [nick(integer_to_binary(N)) || N <- lists:seq(1, 40)],
    {Elements, Dropped} = roster_port_wire:request_elements(subscribe([], SubEls)),
    ?assertEqual(32, length(Elements)),
    ?assertEqual(8, Dropped),
    {[], Back, 0} = roster_port_wire:request_content(nil, Elements),
    ?assertEqual(lists:sublist(SubEls, 32), Back).

an_element_over_the_byte_bound_is_dropped_whole() ->
    Huge = nick(binary:copy(<<"n">>, 20000)),
    Statuses = [#text{lang = <<"en">>, data = <<"hello">>}],
    {Elements, Dropped} =
        roster_port_wire:request_elements(subscribe(Statuses, [Huge, preauth(<<"t">>)])),
    ?assertEqual(1, Dropped),
    %% What is kept is whole, in order, and the small element after the huge one stays.
    ?assertEqual({Statuses, [preauth(<<"t">>)], 0}, roster_port_wire:request_content(nil, Elements)),
    %% Many elements that each fit but not together: the total stays within 16 KiB.
    Big = [nick(binary:copy(<<"m">>, 5000)) || _ <- lists:seq(1, 5)],
    {Kept, Over} = roster_port_wire:request_elements(subscribe([], Big)),
    ?assertEqual({3, 2}, {length(Kept), Over}),
    ?assert(iolist_size(Kept) =< 16384).

a_decoded_sub_element_is_encoded() ->
    %% A module may have decoded a sub-element into xmpp's record.
    {[Bin], 0} = roster_port_wire:request_elements(subscribe([], [#nick{name = <<"R">>}])),
    ?assertEqual({[], [nick(<<"R">>)], 0}, roster_port_wire:request_content(nil, [Bin])).

stored_elements_that_do_not_parse_are_dropped() ->
    Good = fxml:element_to_binary(preauth(<<"t">>)),
    ?assertEqual({xmpp:mk_text(<<"hi">>), [preauth(<<"t">>)], 3},
                 roster_port_wire:request_content(
                   <<"hi">>, [<<"<nick xmlns='x'>unclosed">>, Good, 42, <<"not xml">>])),
    %% Not a list at all: the status text alone.
    ?assertEqual({xmpp:mk_text(<<"hi">>), [], 1},
                 roster_port_wire:request_content(<<"hi">>, <<"<nick/>">>)).

stored_elements_over_the_bounds_are_dropped() ->
    Many = [fxml:element_to_binary(nick(integer_to_binary(N))) || N <- lists:seq(1, 33)],
    {[], Back, 1} = roster_port_wire:request_content(nil, Many),
    ?assertEqual(32, length(Back)),
    Huge = fxml:element_to_binary(nick(binary:copy(<<"n">>, 20000))),
    ?assertEqual({[], [preauth(<<"t">>)], 1},
                 roster_port_wire:request_content(
                   nil, [Huge, fxml:element_to_binary(preauth(<<"t">>))])).

without_stored_statuses_the_status_text_is_used() ->
    %% A store that keeps the text only, or an old program: the text, as before.
    ?assertEqual({xmpp:mk_text(<<"let me in">>), [], 0},
                 roster_port_wire:request_content(<<"let me in">>, [])),
    ?assertEqual({[], [], 0}, roster_port_wire:request_content(nil, [])),
    ?assertEqual({[], [], 0}, roster_port_wire:request_content(<<>>, [])).

pending_requests_carry_the_whole_request() ->
    Elements = [<<"<status xml:lang='de'>Hallo</status>">>,
                fxml:element_to_binary(nick(<<"R">>))],
    {Requests, []} =
        roster_port_wire:pending_requests(
          [#{<<"from">> => <<"d@x">>, <<"status">> => <<"Hallo">>,
             <<"request_elements">> => Elements},
           %% An older program: no request_elements.
           #{<<"from">> => <<"e@x">>, <<"status">> => <<"hi">>}]),
    ?assertMatch([{#jid{luser = <<"d">>}, [#text{lang = <<"de">>, data = <<"Hallo">>}],
                   [#xmlel{name = <<"nick">>}], 0},
                  {#jid{luser = <<"e">>}, [#text{data = <<"hi">>}], [], 0}], Requests).

%% What the user's client gets: the presence encodes with every status and
%% the extended content, as the contact sent it.
a_rebuilt_request_encodes_as_it_came() ->
    Statuses = [#text{lang = <<"en">>, data = <<"hi">>}, #text{lang = <<"de">>, data = <<"Hallo">>}],
    SubEls = [nick(<<"R">>), preauth(<<"tok">>)],
    {Elements, 0} = roster_port_wire:request_elements(subscribe(Statuses, SubEls)),
    {S, E, 0} = roster_port_wire:request_content(<<"hi">>, Elements),
    #xmlel{children = Children} =
        xmpp:encode(#presence{type = subscribe, from = jid:decode(<<"romeo@montague.lit">>),
                              to = jid:decode(<<"juliet@capulet.lit">>), status = S,
                              sub_els = E}),
    ?assertEqual([{<<"status">>, <<"en">>, <<"hi">>}, {<<"status">>, <<"de">>, <<"Hallo">>}],
                 [{N, fxml:get_attr_s(<<"xml:lang">>, A), fxml:get_cdata(C)}
                  || #xmlel{name = <<"status">> = N, attrs = A, children = C} <- Children]),
    ?assertEqual([nick(<<"R">>), preauth(<<"tok">>)],
                 [El || #xmlel{name = N} = El <- Children, N /= <<"status">>]).
