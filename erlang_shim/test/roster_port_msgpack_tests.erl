%%% EUnit tests of the msgpack codec. The byte strings were produced by
%%% Python's msgpack 1.x (the program's codec), e.g.
%%%   python -c 'import msgpack; print(msgpack.packb(2**64-1).hex())'
%%% so these tests check the shim against the other side, not against itself.
-module(roster_port_msgpack_tests).
-include_lib("eunit/include/eunit.hrl").

-define(M, roster_port_msgpack).

hex(Hex) -> binary:decode_hex(list_to_binary(Hex)).

%% {Erlang term, bytes from Python}. Each pair must decode to the term and
%% the term must encode to exactly these bytes (maps here have keys whose
%% sorted order is Python's insertion order, as the encoder sorts keys).
python_cases() ->
    [{nil, "c0"},
     {true, "c3"},
     {false, "c2"},
     {127, "7f"},
     {200, "ccc8"},
     {65535, "cdffff"},
     {16#ffffffff, "ceffffffff"},
     {16#ffffffffffffffff, "cfffffffffffffffff"},
     {-32, "e0"},
     {-128, "d080"},
     {-32768, "d18000"},
     {-16#80000000, "d280000000"},
     {-16#8000000000000000, "d38000000000000000"},
     {1.5, "cb3ff8000000000000"},
     {<<"héllo"/utf8>>, "a668c3a96c6c6f"},
     {binary:copy(<<"x">>, 40),
      "d928" ++ lists:append(lists:duplicate(40, "78"))},
     {binary:copy(<<"y">>, 300),
      "da012c" ++ lists:append(lists:duplicate(300, "79"))},
     {[1, <<"a">>, nil], "9301a161c0"},
     {lists:seq(0, 19), "dc0014000102030405060708090a0b0c0d0e0f10111213"},
     {#{<<"a">> => 1, <<"b">> => [true]}, "82a16101a16291c3"},
     {[0, 7, <<"roster_get">>, #{<<"user">> => <<"alice@localhost">>}],
      "940007aa726f737465725f67657481a475736572af616c696365406c6f63616c686f7374"}].

decode_python_test_() ->
    [?_assertEqual({ok, Term}, ?M:decode_all(hex(Hex))) || {Term, Hex} <- python_cases()].

encode_like_python_test_() ->
    [?_assertEqual(hex(Hex), ?M:encode(Term)) || {Term, Hex} <- python_cases()].

decode_python_only_forms_test_() ->
    Map16 = maps:from_list([{integer_to_binary(I), I} || I <- lists:seq(0, 15)]),
    [%% bin decodes to a binary
     ?_assertEqual({ok, <<0, 255>>}, ?M:decode_all(hex("c40200ff"))),
     %% float 32
     ?_assertEqual({ok, 1.5}, ?M:decode_all(hex("ca3fc00000"))),
     %% map 16 in Python's key order
     ?_assertEqual({ok, Map16}, ?M:decode_all(hex(
        "de0010a13000a13101a13202a13303a13404a13505a13606a13707a13808a13909"
        "a231300aa231310ba231320ca231330da231340ea231350f"))),
     %% a response as the program writes it
     ?_assertEqual(
        {ok, [1, 7, nil,
              #{<<"effects">> => [],
                <<"items">> => [#{<<"jid">> => <<"bob@localhost">>,
                                  <<"name">> => <<"Bob">>,
                                  <<"subscription">> => <<"both">>,
                                  <<"ask">> => nil,
                                  <<"approved">> => false,
                                  <<"groups">> => [<<"Friends">>]}]}]},
        ?M:decode_all(hex(
          "940107c082a76566666563747390a56974656d739186a36a6964ad626f62406c6f63616c"
          "686f7374a46e616d65a3426f62ac737562736372697074696f6ea4626f7468a361736bc0"
          "a8617070726f766564c2a667726f75707391a7467269656e6473")))].

round_trip_test_() ->
    Terms = [0, 1, -1, -33, 128, 255, 256, 65536, -129, -32769, 1 bsl 40,
             -(1 bsl 40), 0.25, -1.0e300, <<>>, binary:copy(<<"z">>, 70000),
             [], lists:seq(1, 70000), #{}, #{<<"k">> => #{<<"n">> => [nil, true]}},
             maps:from_list([{integer_to_binary(I), I} || I <- lists:seq(1, 100)])],
    [?_assertEqual({ok, T}, ?M:decode_all(?M:encode(T))) || T <- Terms].

encode_special_terms_test_() ->
    [?_assertEqual(hex("c40200ff"), ?M:encode({bin, <<0, 255>>})),
     ?_assertEqual(hex("a9737562736372696265"), ?M:encode(subscribe)),
     ?_assertError({badarg, _}, ?M:encode(1 bsl 64)),
     ?_assertError({badarg, _}, ?M:encode(-(1 bsl 63) - 1)),
     ?_assertError({badarg, _}, ?M:encode({a, tuple}))].

decode_errors_test_() ->
    [?_assertEqual({error, incomplete}, ?M:decode(<<>>)),
     ?_assertEqual({error, incomplete}, ?M:decode(hex("92c0"))),
     ?_assertEqual({error, incomplete}, ?M:decode(hex("a568"))),
     ?_assertEqual({error, {bad_type, 16#c1}}, ?M:decode(hex("c1"))),
     ?_assertEqual({error, {unsupported_ext, 16#d4}}, ?M:decode(hex("d40100"))),
     ?_assertEqual({error, {trailing_bytes, 1}}, ?M:decode_all(hex("c0c0"))),
     ?_assertEqual({ok, nil, <<16#c3>>}, ?M:decode(hex("c0c3")))].

%% The protocol's words are decoded to equal binaries (as literals), in any
%% position, and other strings of the same lengths are not taken for them.
protocol_words_test_() ->
    Words = [<<"jid">>, <<"name">>, <<"subscription">>, <<"ask">>, <<"approved">>,
             <<"groups">>, <<"items">>, <<"ver">>, <<"effects">>, <<"both">>,
             <<"none">>, <<"to">>, <<"from">>, <<"subscribe">>, <<"push">>],
    Others = [<<"jie">>, <<"nam">>, <<"bothx">>, <<"tO">>, <<"">>],
    Map = maps:from_list([{W, W} || W <- Words ++ Others]),
    [?_assertEqual({ok, Words ++ Others}, ?M:decode_all(?M:encode(Words ++ Others))),
     ?_assertEqual({ok, Map}, ?M:decode_all(?M:encode(Map)))].

nested_test_() ->
    Deep = lists:foldl(fun(I, Acc) -> #{<<"k">> => [I, Acc, #{}, []]} end, nil,
                       lists:seq(1, 200)),
    [?_assertEqual({ok, Deep}, ?M:decode_all(?M:encode(Deep))),
     ?_assertEqual({ok, [[], #{}, [[]], #{<<"a">> => []}]},
                   ?M:decode_all(?M:encode([[], #{}, [[]], #{<<"a">> => []}]))),
     %% A map's duplicate keys: the last one wins, as before.
     ?_assertEqual({ok, #{<<"a">> => 2}}, ?M:decode_all(hex("82a16101a16102"))),
     %% Cut anywhere inside a nested value: incomplete, never a crash.
     ?_assertEqual([{error, incomplete}],
                   lists:usort([?M:decode(binary:part(F, 0, L))
                                || F <- [?M:encode(Deep)], L <- lists:seq(0, 300)]))].

%% A 5,000-item roster answer as the program writes it decodes to what was
%% encoded. The timings are printed, not checked (a shared machine is no
%% place for a pass/fail timing test): per item, the 5,000-item decode should
%% cost about what the 1,000-item one does. test/decode_bench.escript prints
%% the same figures with more repetitions.
large_answer_test_() ->
    {timeout, 120,
     fun() ->
             Times = [begin
                          Answer = roster_answer(N),
                          Frame = ?M:encode(Answer),
                          {ok, Decoded} = ?M:decode_all(Frame),
                          ?assertEqual(Answer, Decoded),
                          {N, best_decode_us(Frame)}
                      end || N <- [1000, 5000]],
             [?debugFmt("decoding a ~B-item answer: ~.1f ms, ~.2f us/item", [N, T / 1000, T / N])
              || {N, T} <- Times]
     end}.

roster_answer(N) ->
    Items = [#{<<"jid">> => <<"contact", (integer_to_binary(I))/binary, "@example.net">>,
               <<"name">> => <<"Contact ", (integer_to_binary(I))/binary>>,
               <<"subscription">> => <<"both">>, <<"ask">> => nil,
               <<"approved">> => false, <<"groups">> => [<<"Friends">>]}
             || I <- lists:seq(1, N)],
    [1, 7, nil, #{<<"items">> => Items, <<"ver">> => <<"abc">>, <<"effects">> => []}].

%% Best of 5, each in a fresh process spawned as a pool worker is.
best_decode_us(Frame) ->
    lists:min([begin
                   Self = self(),
                   Pid = spawn_opt(fun() ->
                                           T0 = erlang:monotonic_time(microsecond),
                                           {ok, _} = ?M:decode_all(Frame),
                                           Self ! {us, self(),
                                                   erlang:monotonic_time(microsecond) - T0}
                                   end, roster_port_worker:spawn_opts()),
                   receive {us, Pid, Us} -> Us end
               end || _ <- lists:seq(1, 5)]).
