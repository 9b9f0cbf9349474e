%%% @doc Conversions between the program's wire values (docs/protocol.md) and
%%% ejabberd's records: wire items and stored records to #roster_item{} and
%%% #roster{} and back, client items to wire items, XMPP errors, presence
%%% types, and the <query/> of a roster result or push (with approved='true',
%%% which xmpp 1.6.1's #roster_item{} cannot carry).
%%%
%%% Pure functions, no process and no state: mod_roster_port calls them on
%%% its way to and from the program.
-module(roster_port_wire).

-export([bare/1,
         client_item/1,
         map_to_record/3,
         nil_if_undefined/1,
         pending/1,
         presence_type/1,
         record_to_map/1,
         roster_query/2,
         roster_query/3,
         stanza_error/2,
         status/1,
         subscription/1,
         text/1,
         wire_to_roster_item/1]).

-include("xmpp.hrl").
-include("mod_roster.hrl").

client_item(#roster_item{jid = JID, name = Name, subscription = Sub, ask = Ask,
                         groups = Groups}) ->
    #{<<"jid">> => jid:encode(JID),
      <<"name">> => case Name of <<>> -> nil; _ -> Name end,
      <<"subscription">> => atom_to_binary(Sub),
      <<"ask">> => nil_if_undefined(Ask),
      <<"groups">> => Groups}.

stanza_error(#{<<"type">> := Type, <<"condition">> := Condition} = E, Lang) ->
    #stanza_error{type = one_of(Type, [modify, cancel, auth, wait], cancel),
                  reason = one_of(Condition, stanza_conditions(), 'undefined-condition'),
                  text = case maps:get(<<"text">>, E, nil) of
                             T when is_binary(T), T /= <<>> -> xmpp:mk_text(T, Lang);
                             _ -> []
                         end}.

stanza_conditions() ->
    ['bad-request', conflict, 'feature-not-implemented', forbidden, gone,
     'internal-server-error', 'item-not-found', 'jid-malformed', 'not-acceptable',
     'not-allowed', 'not-authorized', 'policy-violation', 'recipient-unavailable',
     redirect, 'registration-required', 'remote-server-not-found',
     'remote-server-timeout', 'resource-constraint', 'service-unavailable',
     'subscription-required', 'undefined-condition', 'unexpected-request'].

%% A <query/> with the items. xmpp 1.6.1's #roster_item has no `approved`,
%% so the query is encoded and then approved='true' is added to the items
%% that carry it.
roster_query(WireItems, Ver) ->
    roster_query(WireItems, [wire_to_roster_item(I) || I <- WireItems], Ver).

roster_query(WireItems, RosterItems, Ver) ->
    Query = #roster_query{items = RosterItems, ver = undefined_if_nil(Ver)},
    case [jid:encode(jid:decode(J)) || #{<<"jid">> := J, <<"approved">> := true} <- WireItems] of
        [] ->
            Query;
        Approved ->
            #xmlel{children = Children} = El = xmpp:encode(Query),
            El#xmlel{children = [mark_approved(C, Approved) || C <- Children]}
    end.

mark_approved(#xmlel{name = <<"item">>, attrs = Attrs} = El, Approved) ->
    case lists:member(proplists:get_value(<<"jid">>, Attrs), Approved) of
        true -> El#xmlel{attrs = Attrs ++ [{<<"approved">>, <<"true">>}]};
        false -> El
    end;
mark_approved(El, _) ->
    El.


bare(#jid{} = JID) -> jid:encode(jid:remove_resource(JID));
bare({U, S, _R}) -> jid:encode({U, S, <<>>}).

status(#presence{status = Status}) ->
    case xmpp:get_text(Status) of
        <<>> -> nil;
        Text -> Text
    end.

text(nil) -> [];
text(<<>>) -> [];
text(Text) when is_binary(Text) -> xmpp:mk_text(Text).

nil_if_undefined(undefined) -> nil;
nil_if_undefined(V) -> V.

undefined_if_nil(nil) -> undefined;
undefined_if_nil(V) -> V.

one_of(Bin, Atoms, Default) when is_binary(Bin) ->
    case [A || A <- Atoms, atom_to_binary(A) == Bin] of
        [A | _] -> A;
        [] -> Default
    end;
one_of(_, _, Default) ->
    Default.

subscription(S) -> one_of(S, [none, to, from, both, remove], none).
pending(A) -> one_of(A, [none, in, out, both, subscribe, unsubscribe], none).
presence_type(T) ->
    one_of(T, [available, unavailable, subscribe, subscribed, unsubscribe,
               unsubscribed, probe, error], available).

wire_to_roster_item(#{<<"jid">> := J} = I) ->
    #roster_item{jid = jid:decode(J),
                 name = case maps:get(<<"name">>, I, nil) of
                            N when is_binary(N) -> N;
                            _ -> <<>>
                        end,
                 subscription = subscription(maps:get(<<"subscription">>, I, <<"none">>)),
                 ask = case maps:get(<<"ask">>, I, nil) of
                           <<"subscribe">> -> subscribe;
                           _ -> undefined
                       end,
                 groups = maps:get(<<"groups">>, I, [])}.

%% A stored record for store_set_item. ejabberd 23.01's #roster{} has no
%% `approved` field, so the map has no `approved` key: whoever made the
%% record (mod_roster, an ejabberdctl command, a XEP-0227 import) cannot
%% have meant to change it, and the program keeps what it has stored.
%% Never send `false` here: it would clear a pre-approval.
record_to_map(#roster{jid = LJID, name = Name, subscription = Sub, ask = Ask,
                      groups = Groups, askmessage = AskMessage}) ->
    #{<<"jid">> => bare(LJID),
      <<"name">> => Name,
      <<"subscription">> => atom_to_binary(Sub),
      <<"ask">> => atom_to_binary(Ask),
      <<"groups">> => Groups,
      <<"askmessage">> => case AskMessage of
                              M when is_binary(M) -> M;
                              _ -> <<>>
                          end}.

%% A stored record from the program. Its `approved` and `in_roster` have no
%% place in #roster{} and are dropped (record_to_map/1 then leaves them as
%% stored).
map_to_record(LUser, LServer, #{<<"jid">> := J} = M) ->
    LJID = jid:tolower(jid:remove_resource(jid:decode(J))),
    #roster{usj = {LUser, LServer, LJID},
            us = {LUser, LServer},
            jid = LJID,
            name = bin(maps:get(<<"name">>, M, <<>>)),
            subscription = subscription(maps:get(<<"subscription">>, M, <<"none">>)),
            ask = pending(maps:get(<<"ask">>, M, <<"none">>)),
            groups = maps:get(<<"groups">>, M, []),
            askmessage = bin(maps:get(<<"askmessage">>, M, <<>>))}.

bin(B) when is_binary(B) -> B;
bin(_) -> <<>>.
