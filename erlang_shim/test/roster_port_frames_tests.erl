%%% EUnit tests of the frame decoder (roster_port_frames): bytes in the
%%% order the port delivers them, frames out, the announced length checked
%%% before anything is kept.
-module(roster_port_frames_tests).
-include_lib("eunit/include/eunit.hrl").

-define(F, roster_port_frames).

frame(Body) ->
    iolist_to_binary(?F:encode(Body)).

%% Feeds the chunks in order; all the frames they held, and the state.
feed_all(Chunks, State) ->
    lists:foldl(fun(Chunk, {Acc, S}) ->
                        {ok, Frames, S1} = ?F:feed(Chunk, S),
                        {Acc ++ Frames, S1}
                end, {[], State}, Chunks).

encode_test() ->
    ?assertEqual(<<0, 0, 0, 3, "abc">>, frame(<<"abc">>)),
    ?assertEqual(<<0, 0, 0, 0>>, frame(<<>>)),
    ?assertEqual(<<0, 0, 1, 44, (binary:copy(<<"x">>, 300))/binary>>,
                 frame(binary:copy(<<"x">>, 300))).

one_frame_test() ->
    {ok, [<<"hello">>], S} = ?F:feed(frame(<<"hello">>), ?F:new(100)),
    ?assertEqual(0, ?F:buffered(S)).

%% Two frames (an empty one between them) cut at every byte offset, and
%% byte by byte: always the same frames, in order.
split_at_every_offset_test() ->
    Bodies = [<<"first frame">>, <<>>, binary:copy(<<"z">>, 70)],
    Stream = iolist_to_binary([?F:encode(B) || B <- Bodies]),
    [begin
         <<A:Cut/binary, B/binary>> = Stream,
         {Frames, S} = feed_all([A, B], ?F:new(1000)),
         ?assertEqual({Cut, Bodies}, {Cut, Frames}),
         ?assertEqual(0, ?F:buffered(S))
     end || Cut <- lists:seq(0, byte_size(Stream))],
    {Frames, S} = feed_all([<<Byte>> || <<Byte>> <= Stream], ?F:new(1000)),
    ?assertEqual(Bodies, Frames),
    ?assertEqual(0, ?F:buffered(S)).

%% Three pieces, cut at every pair of offsets of a short stream.
split_in_three_test() ->
    Stream = iolist_to_binary([?F:encode(<<"ab">>), ?F:encode(<<"cde">>)]),
    Size = byte_size(Stream),
    [begin
         <<A:I/binary, B:(J - I)/binary, C/binary>> = Stream,
         ?assertMatch({[<<"ab">>, <<"cde">>], _}, feed_all([A, B, C], ?F:new(10)))
     end || I <- lists:seq(0, Size), J <- lists:seq(I, Size)].

many_frames_in_one_chunk_test() ->
    Bodies = [integer_to_binary(N) || N <- lists:seq(1, 1000)],
    Stream = iolist_to_binary([?F:encode(B) || B <- Bodies]),
    ?assertMatch({ok, Bodies, _}, ?F:feed(Stream, ?F:new(10))),
    %% And the last one incomplete: kept for the next chunk.
    {ok, Frames, S} = ?F:feed(<<Stream/binary, 0, 0, 0, 2, $x>>, ?F:new(10)),
    ?assertEqual(Bodies, Frames),
    ?assertEqual(1, ?F:buffered(S)),
    ?assertMatch({ok, [<<"xy">>], _}, ?F:feed(<<$y>>, S)).

%% A frame is a binary of its own, never a part of a larger read (a cached
%% answer keeps its own frame alive, nothing more).
frames_are_binaries_of_their_own_test() ->
    Big = binary:copy(<<"b">>, 1000),
    Stream = iolist_to_binary([?F:encode(Big), ?F:encode(Big), ?F:encode(<<"tail">>)]),
    {ok, Frames, _} = ?F:feed(Stream, ?F:new(10000)),
    ?assertEqual([Big, Big, <<"tail">>], Frames),
    [?assertEqual(byte_size(F), binary:referenced_byte_size(F)) || F <- Frames],
    <<A:600/binary, B/binary>> = Stream,
    {Frames2, _} = feed_all([A, B], ?F:new(10000)),
    [?assertEqual(byte_size(F), binary:referenced_byte_size(F)) || F <- Frames2].

%% Pieces of a large frame are kept as they come and joined once.
large_frame_in_pieces_test() ->
    Body = crypto:strong_rand_bytes(1 bsl 20),
    Stream = frame(Body),
    Pieces = [binary:part(Stream, Off, min(65536, byte_size(Stream) - Off))
              || Off <- lists:seq(0, byte_size(Stream) - 1, 65536)],
    {Frames, S} = feed_all(Pieces, ?F:new(1 bsl 20)),
    ?assertEqual([Body], Frames),
    ?assertEqual(0, ?F:buffered(S)).

limit_is_inclusive_test() ->
    ?assertMatch({ok, [<<"abcd">>], _}, ?F:feed(frame(<<"abcd">>), ?F:new(4))),
    ?assertMatch({error, {frame_too_large, 5, _}, []}, ?F:feed(frame(<<"abcde">>), ?F:new(4))).

%% An announced length over the limit is refused as soon as its 4 bytes are
%% in, before any byte of the body is kept; the frames before it are given.
over_limit_length_test() ->
    Max = 8 * 1024 * 1024,
    ?assertEqual({error, {frame_too_large, 16#ffffffff, <<255, 255, 255, 255>>}, []},
                 ?F:feed(<<255, 255, 255, 255>>, ?F:new(Max))),
    %% A traceback line: "Trac" is 1.4 GB.
    Line = <<"Traceback (most recent call last):\n">>,
    {error, {frame_too_large, 16#54726163, Head}, []} = ?F:feed(Line, ?F:new(Max)),
    ?assertEqual(binary:part(Line, 0, 32), Head),
    %% Announced in pieces, after a good frame: refused on its 4th byte.
    {ok, [<<"ok">>], S1} = ?F:feed(<<0, 0, 0, 2, "ok", 255>>, ?F:new(Max)),
    {ok, [], S2} = ?F:feed(<<255>>, S1),
    {ok, [], S3} = ?F:feed(<<255>>, S2),
    ?assertEqual(3, ?F:buffered(S3)),
    ?assertEqual({error, {frame_too_large, 16#ffffff00, <<255, 255, 255, 0>>}, []},
                 ?F:feed(<<0>>, S3)),
    %% Good frames in the same chunk before it are not lost.
    ?assertMatch({error, {frame_too_large, 16#ffffffff, _}, [<<"a">>, <<"b">>]},
                 ?F:feed(<<0, 0, 0, 1, "a", 0, 0, 0, 1, "b", 255, 255, 255, 255, "junk">>,
                         ?F:new(Max))).
