%%% @doc Conversions between the program's wire values (docs/protocol.md) and
%%% ejabberd's records: wire items and stored records to #roster_item{} and
%%% #roster{} and back, client items to wire items, XMPP errors, presence
%%% types, and the <query/> of a roster result or push (with approved='true',
%%% which xmpp 1.6.1's #roster_item{} cannot carry).
%%%
%%% Pure functions, no process and no state: mod_roster_port's modules
%%% (hooks, IQ, backend, effects) call them on their way to and from the
%%% program.
%%%
%%% JIDs from the program. The program serves rows that other applications
%%% also write, so a JID it answers may be one ejabberd's jid:decode/1 refuses
%%% (x@[a b], a NUL, @example.com, a part over 1023 bytes). No conversion here
%%% raises on one: decode_jid/1 answers error, and the list conversions
%%% (roster_items/1, records/3, jid_info_entries/1, pending_requests/1) return
%%% what they could convert and, apart, the JIDs they skipped, for the caller
%%% to log (printable/1) and serve the rest.
%%%
%%% Subscription requests kept whole (RFC 6121 3.1.3: "the complete presence
%%% stanza ..., including any extended content"): request_elements/1 turns a
%%% presence's statuses (each with its xml:lang) and extended content into
%%% the protocol's `request_elements`, one serialised XML element each, in
%%% order; request_content/2 turns them back into statuses and sub-elements.
%%% Both keep at most ?MAX_REQUEST_ELEMENTS elements of at most
%%% ?MAX_REQUEST_BYTES in all, dropping what is over whole (never half an
%%% element), and say how many they dropped: a remote server may send any
%%% request, and the store may hold anything another application wrote.
-module(roster_port_wire).

-export([bare/1,
         client_item/1,
         contact_key/1,
         decode_jid/1,
         jid_info_entries/1,
         nil_if_undefined/1,
         pending/1,
         pending_requests/1,
         presence_type/1,
         printable/1,
         record_to_map/1,
         records/3,
         request_content/2,
         request_elements/1,
         roster_items/1,
         roster_query/2,
         roster_query/3,
         stanza_error/2,
         status/1,
         subscription/1,
         text/1]).

-include("xmpp.hrl").
-include("mod_roster.hrl").

%% The bounds of one subscription request's kept content: the program's
%% [limits] max_request_bytes and max_request_elements default to the same,
%% and may only lower them.
-define(MAX_REQUEST_BYTES, 16384).
-define(MAX_REQUEST_ELEMENTS, 32).

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
%% that carry it. Items whose JID ejabberd cannot parse are left out (the
%% caller learns which from roster_items/1).
roster_query(WireItems, Ver) ->
    {RosterItems, _Skipped} = roster_items(WireItems),
    roster_query(WireItems, RosterItems, Ver).

%% RosterItems: roster_items(WireItems)'s.
roster_query(WireItems, RosterItems, Ver) ->
    Query = #roster_query{items = RosterItems, ver = undefined_if_nil(Ver)},
    case [jid:encode(JID) || #{<<"jid">> := J, <<"approved">> := true} <- WireItems,
                             {ok, JID} <- [decode_jid(J)]] of
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
text(Text) when is_binary(Text) -> xmpp:mk_text(Text);
text(_) -> [].

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

%%%-------------------------------------------------------------------
%%% JIDs from the program
%%%-------------------------------------------------------------------

%% jid:decode/1 without its exception ({bad_jid, J}): anything ejabberd
%% refuses, and anything that is not a binary, is `error`.
decode_jid(J) when is_binary(J) ->
    try {ok, jid:decode(J)}
    catch error:_ -> error
    end;
decode_jid(_) ->
    error.

%% ejabberd's normal form of a bare JID, the read cache's key for a contact
%% (the program's normal form of a stored contact is the same stringprep).
contact_key(#jid{} = JID) ->
    jid:tolower(jid:remove_resource(JID)).

%% What the log shows of a JID that could not be used: at most ?SHOWN bytes
%% of it, quoted, every byte outside printable ASCII (and the quote and the
%% backslash) escaped, so a hostile value can neither flood the log nor
%% forge lines in it. A value that is no binary shows as a term, as shortly.
-define(SHOWN, 100).

printable(J) when is_binary(J) ->
    Size = byte_size(J),
    Shown = escape(binary:part(J, 0, min(Size, ?SHOWN))),
    case Size > ?SHOWN of
        true -> <<$", Shown/binary, "\"... (", (integer_to_binary(Size))/binary, " bytes)">>;
        false -> <<$", Shown/binary, $">>
    end;
printable(Term) ->
    Text = iolist_to_binary(io_lib:format("~0P", [Term, 6])),
    escape(binary:part(Text, 0, min(byte_size(Text), ?SHOWN))).

escape(Bin) ->
    << <<(escape_byte(B))/binary>> || <<B>> <= Bin >>.

escape_byte($") -> <<"\\\"">>;
escape_byte($\\) -> <<"\\\\">>;
escape_byte(B) when B >= 16#20, B < 16#7f -> <<B>>;
escape_byte(B) -> iolist_to_binary(io_lib:format("\\x~2.16.0b", [B])).

%% Splits Maps into those whose JID (the value of Key) ejabberd can parse,
%% each converted by Convert(JID, Map), and the values of Key of the others
%% (anything that is not a map: itself), in order: {Converted, Skipped}.
partition(Key, Convert, Maps) when is_list(Maps) ->
    {Ok, Bad} = lists:foldl(
                  fun(M, {Ok, Bad}) ->
                          J = case M of
                                  #{Key := V} -> V;
                                  _ when is_map(M) -> undefined;
                                  _ -> M
                              end,
                          case is_map(M) andalso decode_jid(J) of
                              {ok, JID} -> {[Convert(JID, M) | Ok], Bad};
                              _ -> {Ok, [J | Bad]}
                          end
                  end, {[], []}, Maps),
    {lists:reverse(Ok), lists:reverse(Bad)}.

%% Wire items (roster_get, a roster IQ get, a push) to #roster_item{}s:
%% {RosterItems, SkippedJids}.
roster_items(WireItems) ->
    partition(<<"jid">>, fun roster_item/2, WireItems).

roster_item(JID, I) ->
    #roster_item{jid = JID,
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

%% Stored records from the program (store_get_roster, store_get_item) to
%% #roster{}s: {Records, SkippedJids}. Their `approved` and `in_roster` have
%% no place in #roster{} and are dropped (record_to_map/1 then leaves them
%% as stored).
records(LUser, LServer, Maps) ->
    partition(<<"jid">>, fun(JID, M) -> record(LUser, LServer, JID, M) end, Maps).

record(LUser, LServer, JID, M) ->
    LJID = contact_key(JID),
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

%% store_get_roster's rows as the read cache keeps them for jid_info:
%% {[{contact_key(), {Subscription, Ask, Groups}}], SkippedJids}.
jid_info_entries(Maps) ->
    partition(<<"jid">>,
              fun(JID, M) ->
                      {contact_key(JID),
                       {subscription(maps:get(<<"subscription">>, M, <<"none">>)),
                        pending(maps:get(<<"ask">>, M, <<"none">>)),
                        maps:get(<<"groups">>, M, [])}}
              end, Maps).

%% pending_in's requests: {[{From :: #jid{}, Statuses :: [#text{}],
%% SubEls :: [#xmlel{}], Dropped :: non_neg_integer()}], SkippedJids}: each
%% request as it came when the program kept it whole (request_content/2),
%% otherwise its status text.
pending_requests(Requests) ->
    partition(<<"from">>,
              fun(JID, R) ->
                      {Statuses, SubEls, Dropped} =
                          request_content(maps:get(<<"status">>, R, nil),
                                          maps:get(<<"request_elements">>, R, [])),
                      {JID, Statuses, SubEls, Dropped}
              end, Requests).

%%%-------------------------------------------------------------------
%%% Subscription requests kept whole
%%%-------------------------------------------------------------------

%% @doc A subscription presence's content for the protocol's
%% `request_elements`: each status as <status xml:lang='...'/> (a status
%% without a language of its own gets the stanza's), then each extended
%% element, serialised, in order; show and priority are no part of a
%% request. {Elements, Dropped}: at most ?MAX_REQUEST_ELEMENTS elements are
%% looked at (so serialising costs no more than that many of the stanza's
%% own elements, which ejabberd's max_stanza_size bounds), and an element
%% that would take the total over ?MAX_REQUEST_BYTES, or that cannot be
%% serialised, is dropped whole; Dropped counts them all.
-spec request_elements(presence()) -> {[binary()], non_neg_integer()}.
request_elements(#presence{status = Statuses, sub_els = SubEls, lang = Lang}) ->
    Children = [{status, T} || T <- Statuses] ++ [{el, E} || E <- SubEls],
    Total = length(Children),
    Looked = lists:sublist(Children, ?MAX_REQUEST_ELEMENTS),
    {Kept, _Bytes, Dropped} =
        lists:foldl(
          fun(Child, {Acc, Bytes, N}) ->
                  case serialise(Child, Lang) of
                      {ok, Bin} when Bytes + byte_size(Bin) =< ?MAX_REQUEST_BYTES ->
                          {[Bin | Acc], Bytes + byte_size(Bin), N};
                      _ ->
                          {Acc, Bytes, N + 1}
                  end
          end, {[], 0, Total - length(Looked)}, Looked),
    {lists:reverse(Kept), Dropped}.

serialise({status, #text{lang = TextLang, data = Data}}, StanzaLang) ->
    Lang = case TextLang of
               <<>> when is_binary(StanzaLang) -> StanzaLang;
               _ -> TextLang
           end,
    Attrs = case Lang of
                <<>> -> [];
                _ -> [{<<"xml:lang">>, Lang}]
            end,
    {ok, fxml:element_to_binary(#xmlel{name = <<"status">>, attrs = Attrs,
                                       children = [{xmlcdata, Data}]})};
serialise({el, El}, _StanzaLang) ->
    %% Sub-elements are #xmlel{} as they came, unless a module decoded one.
    try
        {ok, fxml:element_to_binary(case El of
                                        #xmlel{} -> El;
                                        _ -> xmpp:encode(El)
                                    end)}
    catch _:_ -> error
    end.

%% @doc A request's statuses and extended content from what the program kept
%% (`request_elements`, parsed back), or from its status text alone when it
%% kept no status element (an old program, a store that keeps the text only).
%% {Statuses, SubEls, Dropped}: Dropped counts the elements left out, whole:
%% those that do not parse, are not text, or are over the bounds.
-spec request_content(binary() | nil, term()) -> {[#text{}], [fxml:xmlel()], non_neg_integer()}.
request_content(StatusText, Elements) when is_list(Elements) ->
    Looked = lists:sublist(Elements, ?MAX_REQUEST_ELEMENTS),
    {Statuses, SubEls, _Bytes, Dropped} =
        lists:foldl(
          fun(Bin, {Ss, Es, Bytes, N}) when is_binary(Bin),
                                            Bytes + byte_size(Bin) =< ?MAX_REQUEST_BYTES ->
                  case parse_element(Bin) of
                      {status, T} -> {[T | Ss], Es, Bytes + byte_size(Bin), N};
                      {el, E} -> {Ss, [E | Es], Bytes + byte_size(Bin), N};
                      error -> {Ss, Es, Bytes, N + 1}
                  end;
             (_, {Ss, Es, Bytes, N}) ->
                  {Ss, Es, Bytes, N + 1}
          end, {[], [], 0, length(Elements) - length(Looked)}, Looked),
    case Statuses of
        [] -> {text(StatusText), lists:reverse(SubEls), Dropped};
        _ -> {lists:reverse(Statuses), lists:reverse(SubEls), Dropped}
    end;
request_content(StatusText, _NotAList) ->
    {text(StatusText), [], 1}.

parse_element(Bin) ->
    try fxml_stream:parse_element(Bin) of
        #xmlel{name = <<"status">>, attrs = Attrs} = El ->
            case proplists:get_value(<<"xmlns">>, Attrs, <<"jabber:client">>) of
                NS when NS == <<"jabber:client">>; NS == <<"jabber:server">> ->
                    {status, #text{lang = proplists:get_value(<<"xml:lang">>, Attrs, <<>>),
                                   data = fxml:get_tag_cdata(El)}};
                _ ->
                    {el, El}
            end;
        #xmlel{} = El ->
            {el, El};
        _ ->
            error
    catch _:_ ->
            error
    end.
