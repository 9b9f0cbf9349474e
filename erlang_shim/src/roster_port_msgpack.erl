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
-module(roster_port_msgpack).

-export([encode/1, decode/1, decode_all/1]).

-define(MAX_UINT64, 16#FFFFFFFFFFFFFFFF).
-define(MIN_INT64, -16#8000000000000000).

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
-spec decode(binary()) -> {ok, term(), binary()} | {error, term()}.
decode(Bin) when is_binary(Bin) ->
    try dec(Bin) of
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

dec(<<16#c0, R/binary>>) -> {nil, R};
dec(<<16#c2, R/binary>>) -> {false, R};
dec(<<16#c3, R/binary>>) -> {true, R};
dec(<<0:1, I:7, R/binary>>) -> {I, R};
dec(<<I:8/signed, R/binary>>) when I >= -32, I < 0 -> {I, R};  % negative fixint
dec(<<16#cc, I:8, R/binary>>) -> {I, R};
dec(<<16#cd, I:16, R/binary>>) -> {I, R};
dec(<<16#ce, I:32, R/binary>>) -> {I, R};
dec(<<16#cf, I:64, R/binary>>) -> {I, R};
dec(<<16#d0, I:8/signed, R/binary>>) -> {I, R};
dec(<<16#d1, I:16/signed, R/binary>>) -> {I, R};
dec(<<16#d2, I:32/signed, R/binary>>) -> {I, R};
dec(<<16#d3, I:64/signed, R/binary>>) -> {I, R};
dec(<<16#ca, F:32/float, R/binary>>) -> {F, R};
dec(<<16#cb, F:64/float, R/binary>>) -> {F, R};
dec(<<2#101:3, N:5, B:N/binary, R/binary>>) -> {B, R};
dec(<<16#d9, N:8, B:N/binary, R/binary>>) -> {B, R};
dec(<<16#da, N:16, B:N/binary, R/binary>>) -> {B, R};
dec(<<16#db, N:32, B:N/binary, R/binary>>) -> {B, R};
dec(<<16#c4, N:8, B:N/binary, R/binary>>) -> {B, R};
dec(<<16#c5, N:16, B:N/binary, R/binary>>) -> {B, R};
dec(<<16#c6, N:32, B:N/binary, R/binary>>) -> {B, R};
dec(<<2#1001:4, N:4, R/binary>>) -> dec_array(N, R, []);
dec(<<16#dc, N:16, R/binary>>) -> dec_array(N, R, []);
dec(<<16#dd, N:32, R/binary>>) -> dec_array(N, R, []);
dec(<<2#1000:4, N:4, R/binary>>) -> dec_map(N, R, #{});
dec(<<16#de, N:16, R/binary>>) -> dec_map(N, R, #{});
dec(<<16#df, N:32, R/binary>>) -> dec_map(N, R, #{});
dec(<<16#c1, _/binary>>) -> throw({msgpack, {bad_type, 16#c1}});
dec(<<T, _/binary>>) when T >= 16#c7, T =< 16#c9; T >= 16#d4, T =< 16#d8 ->
    throw({msgpack, {unsupported_ext, T}});
dec(_) -> throw({msgpack, incomplete}).

dec_array(0, R, Acc) -> {lists:reverse(Acc), R};
dec_array(N, R, Acc) ->
    {E, R1} = dec(R),
    dec_array(N - 1, R1, [E | Acc]).

dec_map(0, R, Acc) -> {Acc, R};
dec_map(N, R, Acc) ->
    {K, R1} = dec(R),
    {V, R2} = dec(R1),
    dec_map(N - 1, R2, Acc#{K => V}).
