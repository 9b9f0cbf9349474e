%%% @doc MessagePack encoder and decoder for the roster-port protocol.
%%%
%%% Only what the protocol needs, and nothing stateful:
%%%   Erlang                       msgpack
%%%   nil                          nil
%%%   true | false                 bool
%%%   integer (-2^63 .. 2^64-1)    int (smallest form)
%%%   float                        float 64 (float 32 is decoded too)
%%%   binary                       str (text is what the program expects)
%%%   {bin, Binary}                bin (to send raw bytes on purpose)
%%%   list                         array
%%%   map                          map (keys are binaries in this protocol)
%%%   other atoms                  str of the atom's name (ok, subscribe, ...)
%%% Decoding gives back nil/true/false, integers, floats, binaries for both
%%% str and bin, lists and maps. Extension types are refused: the protocol has
%%% none, and a decoder that silently accepts them hides bugs.
%%%
%%% encode/1 raises error({badarg, Term}) on a term it cannot represent;
%%% decode/1 returns {ok, Term, Rest} or {error, Reason}, never raises.
%%%
%%% The decoder's memory is bounded by its input, whatever the input says:
%%% an announced length (array 32 of 2^32-1 elements) allocates nothing, as
%%% values are only made of bytes that are there, and a value nested deeper
%%% than MAX_DEPTH containers is refused ({error, too_deep}), so the stack of
%%% open containers cannot grow with the frame. NaN and the infinities have
%%% no Erlang float: {error, non_finite_float}.
-module(roster_port_msgpack).

-export([encode/1, decode/1, decode_all/1]).

-define(MAX_UINT64, 16#FFFFFFFFFFFFFFFF).
-define(MIN_INT64, -16#8000000000000000).
%% The protocol's deepest message is 6 containers deep (a notification's
%% push effect: message, params, effects, effect, item, groups); 512 leaves
%% room for any future shape, and bounds the decoder's stack of open
%% containers (~50 bytes each) to ~25 KB.
-define(MAX_DEPTH, 512).

%%%===================================================================
%%% Encoding
%%%===================================================================

-spec encode(term()) -> binary().
encode(Term) ->
    iolist_to_binary(enc(Term)).

enc(nil) -> <<16#c0>>;
enc(false) -> <<16#c2>>;
enc(true) -> <<16#c3>>;
enc(I) when is_integer(I) -> enc_int(I);
enc(F) when is_float(F) -> <<16#cb, F:64/float>>;
enc(B) when is_binary(B) -> enc_str(B);
enc({bin, B}) when is_binary(B) -> enc_bin(B);
enc(L) when is_list(L) -> enc_array(L);
enc(M) when is_map(M) -> enc_map(M);
enc(A) when is_atom(A) -> enc_str(atom_to_binary(A, utf8));
enc(Other) -> error({badarg, Other}).

enc_int(I) when I >= 0, I =< 16#7f -> <<I>>;
enc_int(I) when I >= 0, I =< 16#ff -> <<16#cc, I>>;
enc_int(I) when I >= 0, I =< 16#ffff -> <<16#cd, I:16>>;
enc_int(I) when I >= 0, I =< 16#ffffffff -> <<16#ce, I:32>>;
enc_int(I) when I >= 0, I =< ?MAX_UINT64 -> <<16#cf, I:64>>;
enc_int(I) when I < 0, I >= -32 -> <<I:8/signed>>;
enc_int(I) when I < 0, I >= -16#80 -> <<16#d0, I:8/signed>>;
enc_int(I) when I < 0, I >= -16#8000 -> <<16#d1, I:16/signed>>;
enc_int(I) when I < 0, I >= -16#80000000 -> <<16#d2, I:32/signed>>;
enc_int(I) when I < 0, I >= ?MIN_INT64 -> <<16#d3, I:64/signed>>;
enc_int(I) -> error({badarg, I}).

enc_str(B) ->
    case byte_size(B) of
        N when N =< 31 -> [<<2#101:3, N:5>>, B];
        N when N =< 16#ff -> [<<16#d9, N>>, B];
        N when N =< 16#ffff -> [<<16#da, N:16>>, B];
        N when N =< 16#ffffffff -> [<<16#db, N:32>>, B];
        _ -> error({badarg, too_long})
    end.

enc_bin(B) ->
    case byte_size(B) of
        N when N =< 16#ff -> [<<16#c4, N>>, B];
        N when N =< 16#ffff -> [<<16#c5, N:16>>, B];
        N when N =< 16#ffffffff -> [<<16#c6, N:32>>, B];
        _ -> error({badarg, too_long})
    end.

enc_array(L) ->
    Header = case length(L) of
                 N when N =< 15 -> <<2#1001:4, N:4>>;
                 N when N =< 16#ffff -> <<16#dc, N:16>>;
                 N -> <<16#dd, N:32>>
             end,
    [Header | [enc(E) || E <- L]].

enc_map(M) ->
    Header = case map_size(M) of
                 N when N =< 15 -> <<2#1000:4, N:4>>;
                 N when N =< 16#ffff -> <<16#de, N:16>>;
                 N -> <<16#df, N:32>>
             end,
    %% Sorted keys make the bytes of a term deterministic (tests, transcripts).
    [Header | [[enc(K), enc(V)] || {K, V} <- lists:sort(maps:to_list(M))]].

%%%===================================================================
%%% Decoding
%%%===================================================================

%% @doc Decodes one value from the front of Bin.
%%
%% The decoder is one tail-recursive loop (val/5 decodes a value, put/6 files
%% it in the container being filled) with an explicit stack of the enclosing
%% containers, so that its cost is linear in the size of the frame:
%%   - the binary is only ever matched and passed on, never returned between
%%     values, so the compiler keeps one match context for the whole frame
%%     (no sub-binary of the rest, no {Term, Rest} tuple per value: the
%%     garbage that made a 5,000-item answer cost 3x per item what a
%%     1,000-item one did, as every garbage collection copied the growing
%%     result again);
%%   - the container being filled lives in the loop's arguments (kind,
%%     values still to read, values read so far, newest first), and is
%%     pushed on the stack only when a nested container starts, with its
%%     depth (push/4 refuses to go past MAX_DEPTH);
%%   - a finished array is reversed once; a finished map is built at once
%%     with maps:from_list/1 from its key/value pairs (no map updated once
%%     per key).
%% Strings and bins are sub-binaries of the frame (no copy).
-spec decode(binary()) -> {ok, term(), binary()} | {error, term()}.
decode(Bin) when is_binary(Bin) ->
    try val(Bin, top, 1, [], []) of
        {Term, Rest} -> {ok, Term, Rest}
    catch
        throw:{msgpack, Reason} -> {error, Reason};
        error:_ -> {error, incomplete}
    end.

%% @doc Decodes a binary holding exactly one value (one frame).
-spec decode_all(binary()) -> {ok, term()} | {error, term()}.
decode_all(Bin) ->
    case decode(Bin) of
        {ok, Term, <<>>} -> {ok, Term};
        {ok, _, Rest} -> {error, {trailing_bytes, byte_size(Rest)}};
        {error, _} = Err -> Err
    end.

%% val(Bin, Kind, Left, Acc, Stack): decodes the next value of the container
%% of kind Kind (top | array | map), which still has Left values to read
%% (a map's keys and values both count) and has read Acc (newest first).
%% Every clause either matches Bin or passes it on to val/5 itself: that is
%% what lets the compiler reuse one match context (erlc +bin_opt_info).
-define(PUT(V), val(R, K, N - 1, [V | A], S)).
-define(NEST(Kind, Len), val(R, Kind, Len, [], push(K, N - 1, A, S))).

val(<<R/binary>>, top, 0, [V], []) ->
    {V, R};
val(<<R/binary>>, K, 0, A, [{K1, N1, A1, _Depth} | S]) ->
    val(R, K1, N1, [finish(K, A) | A1], S);
val(<<16#c0, R/binary>>, K, N, A, S) -> ?PUT(nil);
val(<<16#c2, R/binary>>, K, N, A, S) -> ?PUT(false);
val(<<16#c3, R/binary>>, K, N, A, S) -> ?PUT(true);
val(<<0:1, I:7, R/binary>>, K, N, A, S) -> ?PUT(I);
val(<<2#111:3, I:5, R/binary>>, K, N, A, S) -> ?PUT(I - 32);  % negative fixint
%% The protocol's keys and common values: a literal costs no heap and keeps
%% no sub-binary of the frame alive (a 5,000-item answer has ~60,000 of them).
val(<<16#a3, "jid", R/binary>>, K, N, A, S) -> ?PUT(<<"jid">>);
val(<<16#a4, "name", R/binary>>, K, N, A, S) -> ?PUT(<<"name">>);
val(<<16#ac, "subscription", R/binary>>, K, N, A, S) -> ?PUT(<<"subscription">>);
val(<<16#a3, "ask", R/binary>>, K, N, A, S) -> ?PUT(<<"ask">>);
val(<<16#a8, "approved", R/binary>>, K, N, A, S) -> ?PUT(<<"approved">>);
val(<<16#a6, "groups", R/binary>>, K, N, A, S) -> ?PUT(<<"groups">>);
val(<<16#a5, "items", R/binary>>, K, N, A, S) -> ?PUT(<<"items">>);
val(<<16#a3, "ver", R/binary>>, K, N, A, S) -> ?PUT(<<"ver">>);
val(<<16#a7, "effects", R/binary>>, K, N, A, S) -> ?PUT(<<"effects">>);
val(<<16#a4, "type", R/binary>>, K, N, A, S) -> ?PUT(<<"type">>);
val(<<16#a4, "user", R/binary>>, K, N, A, S) -> ?PUT(<<"user">>);
val(<<16#a4, "item", R/binary>>, K, N, A, S) -> ?PUT(<<"item">>);
val(<<16#a7, "contact", R/binary>>, K, N, A, S) -> ?PUT(<<"contact">>);
val(<<16#a6, "status", R/binary>>, K, N, A, S) -> ?PUT(<<"status">>);
val(<<16#a4, "none", R/binary>>, K, N, A, S) -> ?PUT(<<"none">>);
val(<<16#a2, "to", R/binary>>, K, N, A, S) -> ?PUT(<<"to">>);
val(<<16#a4, "from", R/binary>>, K, N, A, S) -> ?PUT(<<"from">>);
val(<<16#a4, "both", R/binary>>, K, N, A, S) -> ?PUT(<<"both">>);
val(<<16#a9, "subscribe", R/binary>>, K, N, A, S) -> ?PUT(<<"subscribe">>);
val(<<16#aa, "subscribed", R/binary>>, K, N, A, S) -> ?PUT(<<"subscribed">>);
val(<<16#ab, "unsubscribe", R/binary>>, K, N, A, S) -> ?PUT(<<"unsubscribe">>);
val(<<16#ac, "unsubscribed", R/binary>>, K, N, A, S) -> ?PUT(<<"unsubscribed">>);
val(<<16#a2, "in", R/binary>>, K, N, A, S) -> ?PUT(<<"in">>);
val(<<16#a3, "out", R/binary>>, K, N, A, S) -> ?PUT(<<"out">>);
val(<<16#a4, "push", R/binary>>, K, N, A, S) -> ?PUT(<<"push">>);
val(<<16#a7, "deliver", R/binary>>, K, N, A, S) -> ?PUT(<<"deliver">>);
val(<<16#a5, "route", R/binary>>, K, N, A, S) -> ?PUT(<<"route">>);
val(<<16#aa, "askmessage", R/binary>>, K, N, A, S) -> ?PUT(<<"askmessage">>);
val(<<16#a4, "code", R/binary>>, K, N, A, S) -> ?PUT(<<"code">>);
val(<<16#a7, "message", R/binary>>, K, N, A, S) -> ?PUT(<<"message">>);
val(<<16#ac, "stanza_error", R/binary>>, K, N, A, S) -> ?PUT(<<"stanza_error">>);
val(<<16#a4, "text", R/binary>>, K, N, A, S) -> ?PUT(<<"text">>);
val(<<16#ae, "route_presence", R/binary>>, K, N, A, S) -> ?PUT(<<"route_presence">>);
val(<<16#ad, "send_presence", R/binary>>, K, N, A, S) -> ?PUT(<<"send_presence">>);
val(<<16#b0, "send_unavailable", R/binary>>, K, N, A, S) -> ?PUT(<<"send_unavailable">>);
val(<<16#ad, "presence_type", R/binary>>, K, N, A, S) -> ?PUT(<<"presence_type">>);
val(<<16#ae, "roster_changed", R/binary>>, K, N, A, S) -> ?PUT(<<"roster_changed">>);
val(<<16#a8, "protocol", R/binary>>, K, N, A, S) -> ?PUT(<<"protocol">>);
val(<<16#a7, "program", R/binary>>, K, N, A, S) -> ?PUT(<<"program">>);
val(<<16#ac, "capabilities", R/binary>>, K, N, A, S) -> ?PUT(<<"capabilities">>);
val(<<16#aa, "versioning", R/binary>>, K, N, A, S) -> ?PUT(<<"versioning">>);
val(<<16#ac, "pre_approval", R/binary>>, K, N, A, S) -> ?PUT(<<"pre_approval">>);
val(<<16#ad, "notifications", R/binary>>, K, N, A, S) -> ?PUT(<<"notifications">>);
val(<<16#a8, "requests", R/binary>>, K, N, A, S) -> ?PUT(<<"requests">>);
val(<<2#101:3, L:5, B:L/binary, R/binary>>, K, N, A, S) -> ?PUT(B);
val(<<2#1001:4, L:4, R/binary>>, K, N, A, S) -> ?NEST(array, L);
val(<<2#1000:4, L:4, R/binary>>, K, N, A, S) -> ?NEST(map, 2 * L);
val(<<16#cc, I:8, R/binary>>, K, N, A, S) -> ?PUT(I);
val(<<16#cd, I:16, R/binary>>, K, N, A, S) -> ?PUT(I);
val(<<16#ce, I:32, R/binary>>, K, N, A, S) -> ?PUT(I);
val(<<16#cf, I:64, R/binary>>, K, N, A, S) -> ?PUT(I);
val(<<16#d0, I:8/signed, R/binary>>, K, N, A, S) -> ?PUT(I);
val(<<16#d1, I:16/signed, R/binary>>, K, N, A, S) -> ?PUT(I);
val(<<16#d2, I:32/signed, R/binary>>, K, N, A, S) -> ?PUT(I);
val(<<16#d3, I:64/signed, R/binary>>, K, N, A, S) -> ?PUT(I);
val(<<16#ca, F:32/float, R/binary>>, K, N, A, S) -> ?PUT(F);
val(<<16#cb, F:64/float, R/binary>>, K, N, A, S) -> ?PUT(F);
val(<<16#ca, _:32, _/binary>>, _, _, _, _) -> throw({msgpack, non_finite_float});
val(<<16#cb, _:64, _/binary>>, _, _, _, _) -> throw({msgpack, non_finite_float});
val(<<16#d9, L:8, B:L/binary, R/binary>>, K, N, A, S) -> ?PUT(B);
val(<<16#da, L:16, B:L/binary, R/binary>>, K, N, A, S) -> ?PUT(B);
val(<<16#db, L:32, B:L/binary, R/binary>>, K, N, A, S) -> ?PUT(B);
val(<<16#c4, L:8, B:L/binary, R/binary>>, K, N, A, S) -> ?PUT(B);
val(<<16#c5, L:16, B:L/binary, R/binary>>, K, N, A, S) -> ?PUT(B);
val(<<16#c6, L:32, B:L/binary, R/binary>>, K, N, A, S) -> ?PUT(B);
val(<<16#dc, L:16, R/binary>>, K, N, A, S) -> ?NEST(array, L);
val(<<16#dd, L:32, R/binary>>, K, N, A, S) -> ?NEST(array, L);
val(<<16#de, L:16, R/binary>>, K, N, A, S) -> ?NEST(map, 2 * L);
val(<<16#df, L:32, R/binary>>, K, N, A, S) -> ?NEST(map, 2 * L);
val(<<16#c1, _/binary>>, _, _, _, _) -> throw({msgpack, {bad_type, 16#c1}});
val(<<T, _/binary>>, _, _, _, _) when T >= 16#c7, T =< 16#c9; T >= 16#d4, T =< 16#d8 ->
    throw({msgpack, {unsupported_ext, T}});
val(_, _, _, _, _) -> throw({msgpack, incomplete}).

%% The stack entry of the container that was being filled when a nested one
%% started; its depth is that of the nested one.
push(K, N, A, []) ->
    [{K, N, A, 1}];
push(_K, _N, _A, [{_, _, _, ?MAX_DEPTH} | _]) ->
    throw({msgpack, too_deep});
push(K, N, A, [{_, _, _, Depth} | _] = S) ->
    [{K, N, A, Depth + 1} | S].

finish(array, A) -> lists:reverse(A);
finish(map, A) -> maps:from_list(pairs(A, [])).

%% [Vn, Kn, ..., V1, K1] -> [{K1, V1}, ..., {Kn, Vn}]: maps:from_list/1
%% keeps the last of duplicate keys, as the wire order says.
pairs([V, K | T], Acc) -> pairs(T, [{K, V} | Acc]);
pairs([], Acc) -> Acc.
