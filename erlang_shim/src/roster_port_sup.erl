%%% @doc Supervisor of one host's port pool: the transcript writer (when a
%%% transcript file is configured) and pool_size workers; it also owns the
%%% pool's read cache table (roster_port_cache). A host has two pools for a
%%% moment during a reload (roster_port_pool:prepare/2): their processes and
%%% tables are named after the pool's slot, so they never clash; both
%%% transcript writers then append to the file, each record in one write.
%%%
%%% A worker restarts its own program with backoff and never dies because of
%%% it, so a worker crash here is a bug in the shim; the supervisor restarts
%%% the worker and, while it is gone, callers get {error, unavailable}.
-module(roster_port_sup).
-behaviour(supervisor).

-export([start_link/3, init/1, transcript_name/2]).

start_link(Host, Opts, Names) ->
    supervisor:start_link(?MODULE, {Host, Opts, Names}).

init({Host, Opts, Names}) ->
    %% The supervisor owns the read cache's table: it lives as long as the
    %% pool, and goes with it.
    ok = roster_port_cache:create_table(maps:get(cache, Opts)),
    Transcript = case maps:get(transcript, Opts) of
                     undefined -> undefined;
                     Path -> {transcript_name(Host, maps:get(slot, Opts, 1)), Path}
                 end,
    TranscriptSpecs =
        case Transcript of
            undefined -> [];
            {TName, TPath} ->
                [#{id => transcript,
                   start => {roster_port_transcript, start_link, [TName, TPath]}}]
        end,
    WorkerOpts = Opts#{transcript => case Transcript of
                                         undefined -> undefined;
                                         {TName1, _} -> TName1
                                     end},
    WorkerSpecs = [#{id => {worker, I},
                     start => {roster_port_worker, start_link,
                               [Host, I, element(I, Names), WorkerOpts]},
                     shutdown => 5000}
                   || I <- lists:seq(1, tuple_size(Names))],
    {ok, {#{strategy => one_for_one, intensity => 10, period => 60},
          TranscriptSpecs ++ WorkerSpecs}}.

transcript_name(Host, Slot) ->
    list_to_atom("roster_port_transcript_" ++ binary_to_list(Host) ++ "_" ++
                     integer_to_list(Slot)).
