%%% @doc The protocol's framing (docs/protocol.md): a 4-byte big-endian
%%% length N, then N bytes. Pure: bytes in, in the order the port delivered
%%% them, complete frames out.
%%%
%%% Why the shim does it and not the VM: a port opened with {packet, 4}
%%% allocates whatever length the 4 bytes announce before a single byte of
%%% the body arrives, so a stray line on the program's stdout
%%% ("Trac" is 1.4 GB, ffffffff 4 GB) made the VM reserve gigabytes before
%%% anyone could compare the length with max_frame_bytes. The worker reads
%%% its port in stream mode and feeds this decoder instead.
%%%
%%% Invariants:
%%%   - An announced length is compared with the limit as soon as its four
%%%     bytes are in, before any byte of the body is kept; over it, feed/2
%%%     answers {error, {frame_too_large, Length, Head}, Frames} (Head: the
%%%     first bytes from the prefix on, for the log; Frames: the complete
%%%     frames that came before it). The stream cannot be read any further
%%%     (nothing says where the next frame starts): the state is gone.
%%%   - What is kept between reads is at most one frame's bytes, as the
%%%     chunks came (newest first), joined once, when the frame is complete:
%%%     the cost of a read is linear in its size, never in what was kept.
%%%   - Every frame handed out is a binary of its own (copied when it shares
%%%     a read with other bytes): a decoded answer kept in the read cache
%%%     keeps its own frame alive, not the reads around it.
-module(roster_port_frames).

-export([new/1, feed/2, encode/1, buffered/1]).

-export_type([state/0]).

-record(frames,
        {max :: non_neg_integer(),
         %% The length of the frame being read, once its prefix is complete.
         need = undefined :: undefined | non_neg_integer(),
         %% Its bytes received so far (the prefix's, while `need` is
         %% undefined), newest first; `size` is their total.
         chunks = [] :: [binary()],
         size = 0 :: non_neg_integer()}).

-opaque state() :: #frames{}.

-define(HEAD_BYTES, 32).

%% @doc A decoder refusing frames longer than Max bytes.
-spec new(non_neg_integer()) -> state().
new(Max) ->
    #frames{max = Max}.

%% @doc The frames completed by Data, in order.
-spec feed(binary(), state()) ->
          {ok, [binary()], state()}
        | {error, {frame_too_large, non_neg_integer(), binary()}, [binary()]}.
feed(Data, #frames{need = undefined, chunks = []} = S) ->
    frames(Data, S, []);
feed(Data, #frames{need = undefined, chunks = Prefix} = S) ->
    %% At most 3 bytes of a prefix are kept: joining them costs nothing.
    frames(iolist_to_binary(lists:reverse(Prefix, [Data])), S#frames{chunks = [], size = 0}, []);
feed(Data, #frames{need = Need, chunks = Chunks, size = Size} = S) ->
    case Size + byte_size(Data) of
        Total when Total < Need ->
            {ok, [], S#frames{chunks = [Data | Chunks], size = Total}};
        _ ->
            Missing = Need - Size,
            <<Last:Missing/binary, Rest/binary>> = Data,
            Frame = case Chunks of
                        [] -> own(Last);
                        _ -> iolist_to_binary(lists:reverse(Chunks, [Last]))
                    end,
            frames(Rest, S#frames{need = undefined, chunks = [], size = 0}, [Frame])
    end.

%% Bytes at a frame boundary.
frames(<<Len:32, Rest/binary>> = Buf, #frames{max = Max} = S, Acc) ->
    if Len > Max ->
            {error, {frame_too_large, Len, binary:part(Buf, 0, min(?HEAD_BYTES, byte_size(Buf)))},
             lists:reverse(Acc)};
       byte_size(Rest) >= Len ->
            <<Frame:Len/binary, Next/binary>> = Rest,
            frames(Next, S, [own(Frame) | Acc]);
       Rest == <<>> ->
            {ok, lists:reverse(Acc), S#frames{need = Len}};
       true ->
            {ok, lists:reverse(Acc), S#frames{need = Len, chunks = [Rest], size = byte_size(Rest)}}
    end;
frames(<<>>, S, Acc) ->
    {ok, lists:reverse(Acc), S};
frames(Prefix, S, Acc) ->
    {ok, lists:reverse(Acc), S#frames{chunks = [binary:copy(Prefix)], size = byte_size(Prefix)}}.

own(Frame) ->
    case binary:referenced_byte_size(Frame) > byte_size(Frame) of
        true -> binary:copy(Frame);
        false -> Frame
    end.

%% @doc A frame as the program reads it: the 4-byte length, then Body.
-spec encode(iodata()) -> iodata().
encode(Body) ->
    [<<(iolist_size(Body)):32>>, Body].

%% @doc Bytes received and kept, waiting for the rest of their frame.
-spec buffered(state()) -> non_neg_integer().
buffered(#frames{size = Size}) ->
    Size.
