%%% @doc Appends every frame the shim exchanges with its programs to a file,
%%% for `roster-port replay`.
%%%
%%% The file is a plain stream of concatenated msgpack values, each
%%% [Direction, WorkerIndex, TimestampMs, Message]: Direction is "in" for a
%%% frame the shim sent to the program and "out" for one it received, Message
%%% the decoded frame. One process per host writes, so records never
%%% interleave. Workers cast to it: a slow disk costs memory here, never a
%%% stalled roster operation.
-module(roster_port_transcript).
-behaviour(gen_server).

-export([start_link/2, record/4]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-include_lib("kernel/include/logger.hrl").

start_link(Name, Path) ->
    gen_server:start_link({local, Name}, ?MODULE, Path, []).

%% @doc Records Message; a no-op when Name is undefined (no transcript).
-spec record(atom() | undefined, in | out, pos_integer(), term()) -> ok.
record(undefined, _Direction, _Index, _Message) ->
    ok;
record(Name, Direction, Index, Message) ->
    Ts = erlang:system_time(millisecond),
    gen_server:cast(Name, {record, [atom_to_binary(Direction), Index, Ts, Message]}).

init(Path) ->
    ok = filelib:ensure_dir(Path),
    case file:open(Path, [append, raw, binary]) of
        {ok, Fd} ->
            ?LOG_INFO("roster-port: writing the transcript to ~ts", [Path]),
            {ok, #{fd => Fd, path => Path}};
        {error, Reason} ->
            {stop, {transcript, Path, Reason}}
    end.

handle_call(_Request, _From, State) ->
    {reply, {error, badarg}, State}.

handle_cast({record, Record}, #{fd := Fd, path := Path} = State) ->
    case file:write(Fd, roster_port_msgpack:encode(Record)) of
        ok -> ok;
        {error, Reason} ->
            ?LOG_ERROR("roster-port: cannot write the transcript ~ts: ~p",
                       [Path, Reason])
    end,
    {noreply, State}.

handle_info(_Info, State) ->
    {noreply, State}.

terminate(_Reason, #{fd := Fd}) ->
    file:close(Fd).
