%%% Property tests of the msgpack codec (roster_port_msgpack) with PropEr
%%% (Debian: erlang-proper), run by EUnit with a fixed budget of cases.
%%%
%%% Debian's erlang-proper ships no proper.hrl (that is erlang-proper-dev),
%%% so the properties call PropEr's API directly: forall/2 is what ?FORALL
%%% expands to, bind/3 ?LET, sized/1 ?SIZED, lazy/1 ?LAZY.
%%%
%%% What is checked:
%%%   - encode then decode gives the term back, over nested maps and lists,
%%%     binaries of every str width, integers of every width (both ends of
%%%     each, negative ones, the 64-bit bounds), floats, booleans and nil;
%%%   - decoding never raises: any binary gives {ok, _, _} or {error, _};
%%%   - a valid encoding cut short is an error, never a value;
%%%   - a length announced in the data (array 32 of 2^32-1 elements in 10
%%%     bytes) allocates nothing ahead of the bytes that are really there,
%%%     and a value nested deeper than the decoder's bound is refused: both
%%%     decoded in a process whose heap is capped, which dies if they do not.
-module(roster_port_msgpack_props_tests).
-include_lib("eunit/include/eunit.hrl").

-define(M, roster_port_msgpack).
-define(MAX_UINT64, 16#FFFFFFFFFFFFFFFF).
-define(MIN_INT64, -16#8000000000000000).
%% Heap cap of a decoding process, in words (~400 KB): far more than a
%% few hundred bytes of input need, far less than what announced lengths
%% or a stack as deep as the input would take.
-define(HEAP_CAP, 50000).

%%%===================================================================
%%% EUnit entry points
%%%===================================================================

properties_test_() ->
    {setup, fun proper_available/0,
     [{timeout, 60, {Title, fun() -> check(Prop, N) end}}
      || {Title, Prop, N} <-
             [{"encode/decode round trip", prop_round_trip(), 300},
              {"bins and atoms decode to binaries", prop_special_terms(), 200},
              {"decode never raises on any binary", prop_decode_total(), 1000},
              {"decode never raises on msgpack-like bytes", prop_decode_total_typed(), 1000},
              {"decode never raises on a valid encoding with a byte changed",
               prop_decode_mutated(), 300},
              {"a valid encoding cut short is an error", prop_truncated(), 200},
              {"announced lengths allocate nothing ahead of the data",
               prop_announced_lengths(), 300}]]}.

proper_available() ->
    case code:which(proper) of
        non_existing -> error("PropEr is missing: apt-get install erlang-proper");
        _ -> ok
    end.

check(Prop, NumTests) ->
    ?assertEqual(true, proper:quickcheck(Prop, [{numtests, NumTests}, quiet, long_result])).

%%%===================================================================
%%% Properties
%%%===================================================================

prop_round_trip() ->
    proper:forall(term(), fun(T) -> ?M:decode_all(?M:encode(T)) =:= {ok, T} end).

%% {bin, B} is sent as msgpack bin and other atoms as str: both come back
%% as binaries.
prop_special_terms() ->
    proper:forall({proper_types:binary(), proper_types:elements([ok, subscribe, both, 'é'])},
                  fun({B, A}) ->
                          ?M:decode_all(?M:encode([{bin, B}, A]))
                              =:= {ok, [B, atom_to_binary(A, utf8)]}
                  end).

prop_decode_total() ->
    proper:forall(proper_types:union([proper_types:binary(),
                                      proper_types:resize(1000, proper_types:binary())]),
                  fun decodes_or_refuses/1).

%% Random bytes rarely get past the first header; bytes drawn mostly from
%% msgpack's type bytes go deeper.
prop_decode_total_typed() ->
    Byte = proper_types:frequency([{3, proper_types:elements(type_bytes())},
                                   {1, proper_types:integer(0, 255)}]),
    proper:forall(proper_types:list(Byte),
                  fun(Bytes) -> decodes_or_refuses(list_to_binary(Bytes)) end).

prop_decode_mutated() ->
    proper:forall({term(), proper_types:integer(0, 1 bsl 32), proper_types:integer(0, 255)},
                  fun({T, Where, Byte}) ->
                          Bin = ?M:encode(T),
                          At = Where rem byte_size(Bin),
                          <<Before:At/binary, _, After/binary>> = Bin,
                          decodes_or_refuses(<<Before/binary, Byte, After/binary>>)
                  end).

prop_truncated() ->
    proper:forall(term(),
                  fun(T) ->
                          Bin = ?M:encode(T),
                          lists:all(fun(Cut) ->
                                            is_error(?M:decode(binary:part(Bin, 0, Cut)))
                                                andalso is_error(?M:decode_all(
                                                                   binary:part(Bin, 0, Cut)))
                                    end, cuts(byte_size(Bin)))
                  end).

%% A header announcing up to 2^32-1 elements or bytes, then a few bytes:
%% decoded with a capped heap, the answer is an error (or the value, when
%% the bytes happen to be enough), and the process lives.
prop_announced_lengths() ->
    Header = proper_types:union(
               [proper_types:bind({proper_types:elements([16#dd, 16#df, 16#db, 16#c6]),
                                   length_of(32)},
                                  fun({T, L}) -> <<T, L:32>> end, false),
                proper_types:bind({proper_types:elements([16#dc, 16#de, 16#da, 16#c5]),
                                   length_of(16)},
                                  fun({T, L}) -> <<T, L:16>> end, false)]),
    proper:forall({proper_types:list(Header), proper_types:binary()},
                  fun({Headers, Tail}) ->
                          Bin = iolist_to_binary([Headers, Tail]),
                          case capped_decode(Bin) of
                              {ok, Result} -> decodes_or_refuses_result(Result);
                              killed -> false
                          end
                  end).

%%%===================================================================
%%% Plain cases of the same rules
%%%===================================================================

%% The case the issue names: 2^32-1 elements announced in 10 bytes.
huge_announced_length_test() ->
    ?assertEqual({ok, {error, incomplete}},
                 capped_decode(<<16#dd, 255, 255, 255, 255, 1, 2, 3, 4, 5>>)),
    ?assertEqual({ok, {error, incomplete}},
                 capped_decode(<<16#df, 255, 255, 255, 255, 1, 2, 3, 4, 5>>)),
    ?assertEqual({ok, {error, incomplete}},
                 capped_decode(<<16#db, 255, 255, 255, 255, 1, 2, 3, 4, 5>>)).

%% Deeper than the decoder's bound (512): refused, in bounded memory,
%% however deep the input claims to go; 512 levels are still decoded.
deep_nesting_test_() ->
    Nested = fun(Depth) -> <<(binary:copy(<<16#91>>, Depth))/binary, 16#c0>> end,
    Value = fun(Depth) -> lists:foldl(fun(_, Acc) -> [Acc] end, nil, lists:seq(1, Depth)) end,
    [?_assertEqual({ok, Value(512)}, ?M:decode_all(Nested(512))),
     ?_assertEqual({error, too_deep}, ?M:decode_all(Nested(513))),
     ?_assertEqual({ok, {error, too_deep}}, capped_decode(Nested(1000000))),
     ?_assertEqual({ok, {error, too_deep}},
                   capped_decode(binary:copy(<<16#81, 16#a1, $k>>, 1000000))),
     %% Depth counts open containers only: a long flat list is not deep.
     ?_assertMatch({ok, [_ | _]},
                   ?M:decode_all(?M:encode(lists:duplicate(2000, [[]]))))].

%% NaN and the infinities are valid msgpack but no Erlang float: refused as
%% such, not taken for a short read.
non_finite_floats_test_() ->
    [?_assertEqual({error, non_finite_float}, ?M:decode(Bin))
     || Bin <- [<<16#cb, 16#7ff8000000000000:64>>, <<16#cb, 16#7ff0000000000000:64>>,
                <<16#cb, 16#fff0000000000000:64>>, <<16#ca, 16#7fc00000:32>>,
                <<16#ca, 16#ff800000:32>>]].

%% Strings, lists and maps at the edges of their header widths (too slow to
%% leave to the generators), whole and cut short.
container_widths_test_() ->
    [?_test(begin
                Bin = ?M:encode(T),
                ?assertEqual({ok, T}, ?M:decode_all(Bin)),
                [?assertMatch({error, _}, ?M:decode(binary:part(Bin, 0, Cut)))
                 || Cut <- [0, 1, 2, 3, 4, 5, byte_size(Bin) div 2, byte_size(Bin) - 1]]
            end)
     || N <- [15, 16, 31, 32, 65535, 65536],
        T <- [lists:seq(1, N), maps:from_list([{I, I} || I <- lists:seq(1, N)]),
              binary:copy(<<"s">>, N)]].

%%%===================================================================
%%% Generators
%%%===================================================================

term() ->
    proper_types:sized(fun(Size) -> term(Size) end).

term(Size) when Size =< 1 ->
    scalar();
term(Size) ->
    Smaller = proper_types:lazy(fun() -> term(Size div 3) end),
    proper_types:frequency(
      [{4, scalar()},
       {1, proper_types:list(Smaller)},
       {1, proper_types:bind(proper_types:list({key(), Smaller}), fun maps:from_list/1,
                             false)}]).

scalar() ->
    proper_types:union([nil, true, false, int(), proper_types:float(), text()]).

key() ->
    proper_types:union([text(), int()]).

%% Every width of msgpack's ints, both signs, and both ends of each width.
int() ->
    Edges = [0, 16#7f, 16#80, 16#ff, 16#100, 16#ffff, 16#10000, 16#ffffffff, 16#100000000,
             ?MAX_UINT64, -1, -32, -33, -16#80, -16#81, -16#8000, -16#8001,
             -16#80000000, -16#80000001, ?MIN_INT64],
    proper_types:union(
      [proper_types:integer(),
       proper_types:integer(?MIN_INT64, ?MAX_UINT64),
       proper_types:bind({proper_types:elements(Edges), proper_types:integer(-2, 2)},
                         fun({E, D}) -> max(?MIN_INT64, min(?MAX_UINT64, E + D)) end,
                         false)]).

%% Binaries, some at the edges of fixstr / str 8 / str 16 (those of str 32
%% are in container_widths_test_: 64 KB strings would make most of the
%% budget), some UTF-8 text, some the protocol's own words (decoded to
%% literals).
text() ->
    proper_types:frequency(
      [{4, proper_types:binary()},
       {2, proper_types:elements([<<"jid">>, <<"subscription">>, <<"both">>, <<"ask">>,
                                  <<"approved">>, <<"groups">>, <<"items">>, <<"effects">>])},
       {1, proper_types:bind(proper_types:list(proper_types:integer(0, 16#10ffff)),
                             fun text_of/1, false)},
       {1, proper_types:bind(proper_types:elements([31, 32, 255, 256]),
                             fun(N) -> binary:copy(<<"x">>, N) end, false)}]).

text_of(CodePoints) ->
    unicode:characters_to_binary([C || C <- CodePoints, C < 16#d800 orelse C > 16#dfff]).

length_of(Bits) ->
    Max = (1 bsl Bits) - 1,
    proper_types:union([proper_types:integer(0, 20), proper_types:integer(0, Max),
                        proper_types:exactly(Max)]).

%% msgpack's type bytes: fixint, fixmap, fixarray, fixstr, nil, bool, bin,
%% ext (refused), floats, ints, str, array, map, negative fixint.
type_bytes() ->
    [16#00, 16#7f, 16#80, 16#81, 16#8f, 16#90, 16#91, 16#9f, 16#a0, 16#a1, 16#bf,
     16#c0, 16#c1, 16#c2, 16#c3, 16#c4, 16#c5, 16#c6, 16#c7, 16#d4, 16#ca, 16#cb,
     16#cc, 16#cd, 16#ce, 16#cf, 16#d0, 16#d1, 16#d2, 16#d3, 16#d9, 16#da, 16#db,
     16#dc, 16#dd, 16#de, 16#df, 16#e0, 16#ff].

%%%===================================================================
%%% Helpers
%%%===================================================================

decodes_or_refuses(Bin) ->
    decodes_or_refuses_result(catch ?M:decode(Bin))
        andalso case catch ?M:decode_all(Bin) of
                    {ok, _} -> true;
                    {error, _} -> true;
                    _ -> false
                end.

decodes_or_refuses_result({ok, _, Rest}) -> is_binary(Rest);
decodes_or_refuses_result({error, _}) -> true;
decodes_or_refuses_result(_) -> false.

is_error({error, _}) -> true;
is_error(_) -> false.

%% Every cut of a short encoding; of a long one, the first and last bytes
%% and some in between.
cuts(Size) when Size =< 300 ->
    lists:seq(0, Size - 1);
cuts(Size) ->
    lists:usort(lists:seq(0, 100) ++ lists:seq(Size - 100, Size - 1)
                ++ lists:seq(0, Size - 1, max(1, Size div 50))).

%% decode/1 in a process that is killed if its heap passes HEAP_CAP words.
capped_decode(Bin) ->
    Self = self(),
    {Pid, Ref} = spawn_opt(fun() -> Self ! {self(), ?M:decode(Bin)} end,
                           [monitor, {max_heap_size, #{size => ?HEAP_CAP, kill => true,
                                                       error_logger => false}}]),
    receive
        {Pid, Result} ->
            erlang:demonitor(Ref, [flush]),
            {ok, Result};
        {'DOWN', Ref, process, Pid, killed} ->
            killed;
        {'DOWN', Ref, process, Pid, Reason} ->
            {crashed, Reason}
    end.
