%%% @doc The caller's side of the port pool: which worker serves a user, and
%%% the call with its deadline.
%%%
%%% A pool belongs to one virtual host. Its settings sit in a persistent_term
%%% so that a call costs no message to any pool process: the caller picks the
%%% worker by a hash of the user's bare JID (one user's requests are serialised
%%% by one worker, in order), sends the request with gen_server:send_request/2
%%% and waits for the worker's reply: the answer, or {error, timeout} once
%%% the request's deadline has passed (the worker says so itself). The
%%% deadline is call_timeout from now, or the caller's own deadline when
%%% that is sooner. A worker whose program is starting or restarting keeps
%%% the request until the program is up (roster_port_worker's module doc);
%%% one that has no program coming answers {error, unavailable} at once; a
%%% worker that is not running at all (being restarted by its supervisor)
%%% gives the same answer without any wait.
%%%
%%% Nothing here knows ejabberd: mod_roster_port builds the options and the
%%% handler that carries out effects which arrive without a caller.
-module(roster_port_pool).

-export([start/2, stop/1, call/4, call/5, sync_runner/2, capabilities/1, worker_names/1,
         set_capabilities/2, settings/1, cache/1]).
%% A pool that replaces another (mod_roster_port's reload).
-export([prepare/2, start_link/2, use/2, all_up/1, in_flight/1]).

-export_type([opts/0, call_result/0, settings/0]).

-type opts() :: #{command := [string()],
                  pool_size => pos_integer(),
                  call_timeout => pos_integer(),
                  max_frame_bytes => pos_integer(),
                  transcript => undefined | file:filename_all(),
                  handler => {module(), atom(), list()},
                  ping_interval => pos_integer(),
                  max_backoff => pos_integer(),
                  %% Records of the read cache (roster_port_cache); 0: no cache.
                  cache_size => non_neg_integer(),
                  %% The ejabberd node, sent in every hello.
                  node => binary(),
                  %% Set by prepare/2: the workers' names, the cache handle
                  %% and the slot of the pool's generation.
                  names => tuple(),
                  cache => roster_port_cache:cache(),
                  slot => 1 | 2}.
%% What callers read (persistent_term): the workers, call_timeout, the read
%% cache, and the generation (a reload starts the next one) with its slot.
-type settings() :: #{names := tuple(), call_timeout := pos_integer(),
                      cache := roster_port_cache:cache(),
                      generation := pos_integer(), slot := 1 | 2}.
-type call_result() :: {ok, map()}
                     | {error, unavailable | timeout | frame_too_large
                        | {program, map()}}.

-define(KEY(Host), {?MODULE, Host}).
%% Longer than the worker's sweep interval (at most 200 ms).
-define(WORKER_GRACE_MS, 500).
-define(CAPS_KEY(Host), {?MODULE, capabilities, Host}).

%% @doc Records the settings of Host's pool for callers and starts (links)
%% the pool's supervisor; the caller decides where that supervisor lives.
%% prepare/2, start_link/2 and use/2 in one go.
-spec start(binary(), opts()) -> {ok, pid()} | {error, term()}.
start(Host, Opts0) ->
    {Opts, Settings} = prepare(Host, Opts0),
    use(Host, Settings),
    start_link(Host, Opts).

%% @doc The options and the callers' settings of a new pool for Host, not
%% started yet, of the generation after the one callers use now: a pool
%% can be started while the one it replaces still serves (a reload).
%% Two generations that run at once have different worker names and cache
%% tables; names alternate between two slots, so a host never has more
%% than 2 x pool_size worker names (atoms are never freed), and generation
%% G + 2 may only start once generation G has stopped.
-spec prepare(binary(), opts()) -> {opts(), settings()}.
prepare(Host, Opts0) ->
    Generation = case settings(Host) of
                     #{generation := G} -> G + 1;
                     _ -> 1
                 end,
    Slot = slot(Generation),
    Opts1 = with_defaults(Opts0),
    Names = list_to_tuple([worker_name(Host, Slot, I)
                           || I <- lists:seq(1, maps:get(pool_size, Opts1))]),
    %% The table itself is created (and owned) by the pool's supervisor.
    Cache = case maps:get(cache_size, Opts1) of
                0 -> undefined;
                Max -> roster_port_cache:handle(cache_table(Host, Slot), Max, Host)
            end,
    {Opts1#{cache => Cache, names => Names, slot => Slot},
     #{names => Names, call_timeout => maps:get(call_timeout, Opts1), cache => Cache,
       generation => Generation, slot => Slot}}.

%% @doc Starts (links) the supervisor of a pool prepare/2 made. Started
%% again by its own supervisor, it keeps its names and cache handle, so
%% the settings callers use stay right.
-spec start_link(binary(), opts()) -> {ok, pid()} | {error, term()}.
start_link(Host, #{names := Names} = Opts) ->
    roster_port_sup:start_link(Host, Opts, Names).

%% @doc From now on callers on Host use the pool of Settings (prepare/2's,
%% maybe with another cache). A caller that read the previous settings
%% just before still sends its request to the previous pool.
-spec use(binary(), settings()) -> ok.
use(Host, Settings) ->
    persistent_term:put(?KEY(Host), Settings).

%% @doc Forgets the pool's settings: from now on every call is unavailable.
%% The supervisor itself is stopped by whoever started it.
-spec stop(binary()) -> ok.
stop(Host) ->
    _ = persistent_term:erase(?KEY(Host)),
    ok.

%% @doc Whether every worker of the pool of Settings has a program that
%% answered its hello.
-spec all_up(settings()) -> boolean().
all_up(#{names := Names}) ->
    lists:all(fun(Name) -> maps:get(status, worker_status(Name), down) == up end,
              tuple_to_list(Names)).

%% @doc Requests in flight in the workers of the pool of Settings, sent or
%% waiting for a program (those that do not run count none).
-spec in_flight(settings()) -> non_neg_integer().
in_flight(#{names := Names}) ->
    lists:sum([maps:get(pending, Status, 0) + maps:get(waiting, Status, 0)
               || Name <- tuple_to_list(Names), Status <- [worker_status(Name)]]).

worker_status(Name) ->
    try gen_server:call(Name, status, 1000)
    catch exit:_ -> #{}
    end.

-spec settings(binary()) -> undefined | map().
settings(Host) ->
    persistent_term:get(?KEY(Host), undefined).

%% @doc Host's read cache (undefined: none, or no pool).
-spec cache(binary()) -> roster_port_cache:cache().
cache(Host) ->
    case settings(Host) of
        #{cache := Cache} -> Cache;
        _ -> undefined
    end.

-spec worker_names(binary()) -> [atom()].
worker_names(Host) ->
    case settings(Host) of
        undefined -> [];
        #{names := Names} -> tuple_to_list(Names)
    end.

%% @doc Sends Op about User (a bare JID binary) to the worker that serves
%% User. Args gets the "user" key. CallOpts: #{deadline => T}, T a time of
%% erlang:monotonic_time(millisecond): the request's deadline is T when
%% that is sooner than call_timeout from now (a caller with a budget of its
%% own); a T already past is {error, timeout} at once, nothing sent.
%% {error, timeout}: no answer by the deadline (the request may still be
%% carried out); {error, unavailable}: no program, or none came up by the
%% deadline (the request was not carried out, but for one in flight when the
%% program died); {error, {program, #{<<"code">> := <<"overloaded">> |
%% <<"timeout">>}}}: the program refused it, nothing was done. Any error
%% gets the operation's safe answer.
-spec call(binary(), binary(), binary(), map()) -> call_result().
call(Host, User, Op, Args) ->
    call(Host, User, Op, Args, #{}).

-spec call(binary(), binary(), binary(), map(), map()) -> call_result().
%% @doc Returns once the runner of the worker that serves User has carried
%% out every event given to it before (at most call_timeout).
-spec sync_runner(binary(), binary()) -> ok | timeout | unavailable.
sync_runner(Host, User) ->
    case settings(Host) of
        #{names := Names, call_timeout := Timeout} ->
            Name = element(erlang:phash2(User, tuple_size(Names)) + 1, Names),
            try gen_server:call(Name, runner, Timeout) of
                Runner when is_pid(Runner) -> roster_port_effects:sync(Runner, Timeout);
                _ -> unavailable
            catch exit:_ ->
                    unavailable
            end;
        _ ->
            unavailable
    end.

call(Host, User, Op, Args, CallOpts) ->
    case settings(Host) of
        undefined ->
            {error, unavailable};
        #{names := Names, call_timeout := Timeout} ->
            Name = element(erlang:phash2(User, tuple_size(Names)) + 1, Names),
            case whereis(Name) of
                undefined ->
                    {error, unavailable};
                Pid ->
                    Now = erlang:monotonic_time(millisecond),
                    case deadline(Now + Timeout, CallOpts) of
                        Deadline when Deadline =< Now ->
                            {error, timeout};
                        Deadline ->
                            Req = {request, Op, Args#{<<"user">> => User}, Deadline},
                            ReqId = gen_server:send_request(Pid, Req),
                            %% The worker answers itself at its sweep after
                            %% Deadline, so that an answer that comes late is
                            %% carried out by its runner, never lost between
                            %% the two; this wait only covers a worker that
                            %% does not answer at all. On timeout the monitor
                            %% alias is dropped, so a late reply never lands
                            %% in the caller's mailbox.
                            Wait = Deadline - Now + ?WORKER_GRACE_MS,
                            case gen_server:receive_response(ReqId, Wait) of
                                {reply, Reply} -> Reply;
                                timeout -> {error, timeout};
                                {error, _} -> {error, unavailable}
                            end
                    end
            end
    end.

deadline(Default, #{deadline := Deadline}) when is_integer(Deadline) ->
    min(Default, Deadline);
deadline(Default, _CallOpts) ->
    Default.

%% @doc The capabilities the program announced in its last hello on Host
%% (an empty map before the first successful hello).
-spec capabilities(binary()) -> map().
capabilities(Host) ->
    persistent_term:get(?CAPS_KEY(Host), #{}).

%% Called by workers after a hello. persistent_term writes are costly, so
%% only a change is written.
-spec set_capabilities(binary(), map()) -> ok.
set_capabilities(Host, Caps) ->
    case capabilities(Host) of
        Caps -> ok;
        _ -> persistent_term:put(?CAPS_KEY(Host), Caps)
    end.

%%%===================================================================
%%% Internal
%%%===================================================================

with_defaults(Opts) ->
    Defaults = #{pool_size => erlang:system_info(schedulers_online),
                 call_timeout => 5000,
                 max_frame_bytes => 8 * 1024 * 1024,
                 transcript => undefined,
                 handler => undefined,
                 ping_interval => 10000,
                 max_backoff => 30000,
                 cache_size => 0,
                 node => atom_to_binary(node())},
    maps:merge(Defaults, maps:filter(fun(_, V) -> V /= default end, Opts)).

slot(Generation) ->
    (Generation - 1) rem 2 + 1.

cache_table(Host, Slot) ->
    list_to_atom("roster_port_cache_" ++ binary_to_list(Host) ++ "_" ++
                     integer_to_list(Slot)).

worker_name(Host, Slot, Index) ->
    list_to_atom("roster_port_" ++ binary_to_list(Host) ++ "_" ++
                     integer_to_list(Slot) ++ "_" ++ integer_to_list(Index)).
