%%% @doc The caller's side of the port pool: which worker serves a user, and
%%% the call with its deadline.
%%%
%%% A pool belongs to one virtual host. Its settings sit in a persistent_term
%%% so that a call costs no message to any pool process: the caller picks the
%%% worker by a hash of the user's bare JID (one user's requests are serialised
%%% by one worker, in order), sends the request with gen_server:send_request/2
%%% and waits for the worker's reply: the answer, or {error, timeout} once
%%% call_timeout has passed (the worker says so itself). A worker whose program is down answers
%%% {error, unavailable} at once; a worker that is not running at all (being
%%% restarted by its supervisor) gives the same answer without any wait.
%%%
%%% Nothing here knows ejabberd: mod_roster_port builds the options and the
%%% handler that carries out effects which arrive without a caller.
-module(roster_port_pool).

-export([start/2, stop/1, call/4, call/5, capabilities/1, worker_names/1,
         set_capabilities/2, settings/1, cache/1]).

-export_type([opts/0, call_result/0]).

-type opts() :: #{command := [string()],
                  pool_size => pos_integer(),
                  call_timeout => pos_integer(),
                  max_frame_bytes => pos_integer(),
                  transcript => undefined | file:filename_all(),
                  handler => {module(), atom(), list()},
                  ping_interval => pos_integer(),
                  max_kept => non_neg_integer(),
                  max_backoff => pos_integer(),
                  %% Records of the read cache (roster_port_cache); 0: no cache.
                  cache_size => non_neg_integer(),
                  %% The ejabberd node, sent in every hello.
                  node => binary()}.
-type call_result() :: {ok, map()}
                     | {error, unavailable | timeout | frame_too_large
                        | {program, map()}}.

-define(KEY(Host), {?MODULE, Host}).
%% Longer than the worker's sweep interval (at most 200 ms).
-define(WORKER_GRACE_MS, 500).
-define(CAPS_KEY(Host), {?MODULE, capabilities, Host}).

%% @doc Records the settings of Host's pool for callers and starts (links)
%% the pool's supervisor; the caller decides where that supervisor lives.
-spec start(binary(), opts()) -> {ok, pid()} | {error, term()}.
start(Host, Opts0) ->
    Opts1 = with_defaults(Opts0),
    Names = list_to_tuple([worker_name(Host, I)
                           || I <- lists:seq(1, maps:get(pool_size, Opts1))]),
    %% The table itself is created (and owned) by the pool's supervisor.
    Cache = case maps:get(cache_size, Opts1) of
                0 -> undefined;
                Max -> roster_port_cache:handle(cache_table(Host), Max)
            end,
    Opts = Opts1#{cache => Cache},
    persistent_term:put(?KEY(Host), #{names => Names,
                                      call_timeout => maps:get(call_timeout, Opts),
                                      cache => Cache}),
    roster_port_sup:start_link(Host, Opts, Names).

%% @doc Forgets the pool's settings: from now on every call is unavailable.
%% The supervisor itself is stopped by whoever started it.
-spec stop(binary()) -> ok.
stop(Host) ->
    _ = persistent_term:erase(?KEY(Host)),
    ok.

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
%% User. Args gets the "user" key. With #{keep => true}, a request that cannot
%% be forwarded because the program is down is kept by the worker and replayed
%% when the program is back (the caller still gets {error, unavailable}).
%% {error, timeout}: no answer within call_timeout (the request may still be
%% carried out); {error, {program, #{<<"code">> := <<"overloaded">> |
%% <<"timeout">>}}}: the program refused it, nothing was done. Any error
%% gets the operation's safe answer.
-spec call(binary(), binary(), binary(), map()) -> call_result().
call(Host, User, Op, Args) ->
    call(Host, User, Op, Args, #{}).

-spec call(binary(), binary(), binary(), map(), map()) -> call_result().
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
                    Deadline = erlang:monotonic_time(millisecond) + Timeout,
                    Keep = maps:get(keep, CallOpts, false),
                    Req = {request, Op, Args#{<<"user">> => User}, Deadline, Keep},
                    ReqId = gen_server:send_request(Pid, Req),
                    %% The worker answers {error, timeout} itself at its
                    %% sweep after Deadline, so that an answer that comes
                    %% late is carried out by its runner, never lost
                    %% between the two; this wait only covers a worker that
                    %% does not answer at all. On timeout the monitor alias
                    %% is dropped, so a late reply never lands in the
                    %% caller's mailbox.
                    case gen_server:receive_response(ReqId, Timeout + ?WORKER_GRACE_MS) of
                        {reply, Reply} -> Reply;
                        timeout -> {error, timeout};
                        {error, _} -> {error, unavailable}
                    end
            end
    end.

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
                 max_kept => 1000,
                 max_backoff => 30000,
                 cache_size => 0,
                 node => atom_to_binary(node())},
    maps:merge(Defaults, maps:filter(fun(_, V) -> V /= default end, Opts)).

cache_table(Host) ->
    list_to_atom("roster_port_cache_" ++ binary_to_list(Host)).

worker_name(Host, Index) ->
    list_to_atom("roster_port_" ++ binary_to_list(Host) ++ "_" ++
                     integer_to_list(Index)).
