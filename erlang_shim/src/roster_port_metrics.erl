%%% @doc The shim's metrics, per host: counted on the hot path, collected
%%% and rendered (Prometheus text format 0.0.4) at a scrape.
%%%
%%% Counting. Each host has one `counters` array (write_concurrency), made
%%% by start/1 and kept in a persistent_term, so that counting costs a
%%% persistent_term lookup and a few counters:add/3, never a message
%%% (~0.6 us per request, ~0.1 us per cache lookup: bench/metrics_bench.escript). Counted here:
%%%   - per op (a fixed set: ops/0; any other op is `other`): requests
%%%     ended, errors by kind (error_kind/1, a fixed set), a latency
%%%     histogram of fixed buckets (?BUCKETS_US) with its sum, and the
%%%     requests in flight (sent through roster_port_call, not answered
%%%     yet: waiting for a program, or sent to it);
%%%   - cache lookups, hit or miss, per kind (roster, iq, jid_info);
%%%   - programs started, programs ended by reason (?EXIT_REASONS) and,
%%%     for those that exited, by exit status (0..255).
%%% Nothing is counted for a host without start/1 (a call before the
%%% module's start or after its stop): the counting functions then do
%%% nothing.
%%%
%%% Collecting (collect/2, at a scrape, never on the hot path): the
%%% counters, each worker's status (roster_port_worker: program up, os
%%% pid, requests sent and waiting per op), the journal's status
%%% (roster_port_journal:status/1) and each program's own metrics (the
%%% `metrics` request of docs/protocol.md), asked of every worker at once,
%%% each in a process of its own with one deadline for all: a part that is
%%% not there in time is reported as missing (`roster_port_program_metrics_ok`
%%% 0, no journal samples), and the scrape still answers. The programs'
%%% samples are summed per host (a pool has pool_size programs): counters,
%%% histograms and the in-flight gauges they report are sums by nature.
%%%
%%% Bounds. Labels are the host, the op, the kind, the worker index (at most
%%% pool_size), the exit status (at most 256): never a user, a JID or
%%% anything a client sends. A program's answer is checked before use:
%%% names under `roster_port_program_`, no `host` or `worker` label of its
%%% own, at most ?MAX_PROGRAM_SAMPLES samples and ?MAX_LABEL_BYTES per
%%% label value; an answer that breaks one is dropped whole (and said so
%%% by the ok gauge) rather than rendered in part.
%%%
%%% This module must never call ejabberd (mod_roster_port_metrics does: the
%%% HTTP handler and the ejabberdctl commands), never block a caller of
%%% roster_port_call, and never let a scrape wait for more than ?SCRAPE_MS
%%% (plus the time to render).
-module(roster_port_metrics).

-export([start/1, stop/1]).
%% Hot path.
-export([request_started/2, request_done/2, cache_lookup/3, program_started/1,
         program_down/2]).
%% Scrape.
-export([collect/1, collect/2, render/1, status_text/1]).
%% For tests.
-export([ops/0, error_kind/1, bucket/1, exit_reason/1, merge_program_samples/1,
         check_program_answer/1, format_value/1, with_worker/2]).

-define(KEY(Host), {?MODULE, Host}).
%% Families the shim renders under the programs' prefix (about the programs
%% as processes): a program's answer may not use them, with or without
%% _total.
-define(SHIM_PROGRAM_FAMILIES,
        [<<"roster_port_program_", N/binary>>
         || N <- [<<"up">>, <<"metrics_ok">>, <<"starts">>, <<"starts_total">>, <<"exits">>,
                  <<"exits_total">>, <<"exit_status">>, <<"exit_status_total">>]]).

-define(OPS, [<<"roster_get">>, <<"roster_iq">>, <<"in_subscription">>,
              <<"out_subscription">>, <<"jid_info">>, <<"pending_in">>,
              <<"remove_user">>, <<"store_get_roster">>, <<"store_get_item">>,
              <<"store_set_item">>, <<"store_del_item">>, <<"store_remove_user">>,
              <<"store_read_version">>, <<"other">>]).
%% The shim's own (timeout, unavailable, request_too_large), then the
%% program's error codes (docs/protocol.md): its `timeout` is `not_started`
%% here (refused before it began: nothing was done), unlike the shim's
%% `timeout` (no answer in time: it may have been carried out).
-define(KINDS, [<<"timeout">>, <<"unavailable">>, <<"request_too_large">>,
                <<"not_started">>, <<"overloaded">>, <<"store_unavailable">>,
                <<"stanza_error">>, <<"bad_request">>, <<"unknown_op">>,
                <<"bad_frame">>, <<"frame_too_large">>, <<"response_too_large">>,
                <<"internal">>, <<"other">>]).
%% Upper bounds of the latency buckets, in microseconds; the last bucket
%% (+Inf) follows.
-define(BUCKETS_US, [500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000,
                     500000, 1000000, 2500000, 5000000, 10000000]).
-define(BUCKET_LE, [<<"0.0005">>, <<"0.001">>, <<"0.0025">>, <<"0.005">>, <<"0.01">>,
                    <<"0.025">>, <<"0.05">>, <<"0.1">>, <<"0.25">>, <<"0.5">>, <<"1">>,
                    <<"2.5">>, <<"5">>, <<"10">>, <<"+Inf">>]).
-define(CACHE_KINDS, [roster, iq, jid_info]).
%% Why a program ended (roster_port_worker:program_down/2's first element).
-define(EXIT_REASONS, [exit_status, hung, stdin_unread, stdin_full, not_frames, port_exit,
                       cannot_start, unsupported_protocol, bad_hello, hello_too_large,
                       hello_not_sent, other]).

-define(N_OPS, 14).
-define(N_KINDS, 14).
-define(N_BUCKETS, 15).
%% Slots of one op: requests, in flight, sum (us), errors, buckets.
-define(OP_REQUESTS, 1).
-define(OP_IN_FLIGHT, 2).
-define(OP_SUM_US, 3).
-define(OP_ERRORS, 3).      % + kind index (1..N_KINDS)
-define(OP_BUCKETS, (3 + ?N_KINDS)).  % + bucket index (1..N_BUCKETS)
-define(OP_SLOTS, (3 + ?N_KINDS + ?N_BUCKETS)).
-define(HOST_BASE, (?N_OPS * ?OP_SLOTS)).
%% Host slots: cache (kind, hit|miss), starts, exit reasons, exit statuses.
-define(CACHE_SLOT(KindIx, Hit), (?HOST_BASE + (KindIx - 1) * 2 + Hit)).
-define(STARTS_SLOT, (?HOST_BASE + 7)).
-define(REASON_SLOT(Ix), (?HOST_BASE + 7 + Ix)).
-define(N_REASONS, 12).
-define(STATUS_SLOT(S), (?HOST_BASE + 7 + ?N_REASONS + 1 + S)).
-define(N_SLOTS, (?HOST_BASE + 7 + ?N_REASONS + 256)).

%% A scrape's deadline for every part it asks for.
-define(SCRAPE_MS, 2000).
-define(MAX_PROGRAM_SAMPLES, 5000).
-define(MAX_PROGRAM_FAMILIES, 100).
-define(MAX_LABEL_BYTES, 128).

%%%===================================================================
%%% Lifecycle
%%%===================================================================

%% @doc Counting starts for Host (kept if it has started already: a
%% reload keeps its counts).
-spec start(binary()) -> ok.
start(Host) ->
    case persistent_term:get(?KEY(Host), undefined) of
        undefined -> persistent_term:put(?KEY(Host), counters:new(?N_SLOTS, [write_concurrency]));
        _ -> ok
    end.

-spec stop(binary()) -> ok.
stop(Host) ->
    _ = persistent_term:erase(?KEY(Host)),
    ok.

%%%===================================================================
%%% Hot path
%%%===================================================================

%% @doc A request of Op is about to be sent; give the token to
%% request_done/2 once it is answered.
-spec request_started(binary(), binary()) -> undefined | {counters:counters_ref(), pos_integer(), integer()}.
request_started(Host, Op) ->
    case persistent_term:get(?KEY(Host), undefined) of
        undefined ->
            undefined;
        Ref ->
            Base = op_base(op_index(Op)),
            counters:add(Ref, Base + ?OP_IN_FLIGHT, 1),
            {Ref, Base, erlang:monotonic_time(microsecond)}
    end.

-spec request_done(undefined | tuple(), term()) -> ok.
request_done(undefined, _Reply) ->
    ok;
request_done({Ref, Base, Started}, Reply) ->
    Us = max(0, erlang:monotonic_time(microsecond) - Started),
    counters:sub(Ref, Base + ?OP_IN_FLIGHT, 1),
    counters:add(Ref, Base + ?OP_REQUESTS, 1),
    counters:add(Ref, Base + ?OP_SUM_US, Us),
    counters:add(Ref, Base + ?OP_BUCKETS + bucket(Us), 1),
    case Reply of
        {ok, _} -> ok;
        _ -> counters:add(Ref, Base + ?OP_ERRORS + index(error_kind(Reply), ?KINDS), 1)
    end.

%% @doc A lookup of the read cache: Result is the lookup's answer
%% ({ok, _}: a hit; `off`: the cache does not answer now, not counted).
-spec cache_lookup(binary(), roster | iq | jid_info, term()) -> ok.
cache_lookup(_Host, _Kind, off) ->
    ok;
cache_lookup(Host, Kind, Result) ->
    case persistent_term:get(?KEY(Host), undefined) of
        undefined ->
            ok;
        Ref ->
            Hit = case Result of {ok, _} -> 1; _ -> 2 end,
            counters:add(Ref, ?CACHE_SLOT(cache_index(Kind), Hit), 1)
    end.

-spec program_started(binary()) -> ok.
program_started(Host) ->
    add(Host, ?STARTS_SLOT).

%% @doc A program ended (roster_port_worker's reason, e.g. {exit_status, 1}).
-spec program_down(binary(), term()) -> ok.
program_down(Host, Why) ->
    add(Host, ?REASON_SLOT(index(exit_reason(Why), ?EXIT_REASONS))),
    case Why of
        {exit_status, Status} when is_integer(Status), Status >= 0, Status =< 255 ->
            add(Host, ?STATUS_SLOT(Status));
        _ ->
            ok
    end.

add(Host, Slot) ->
    case persistent_term:get(?KEY(Host), undefined) of
        undefined -> ok;
        Ref -> counters:add(Ref, Slot, 1)
    end.

%%%===================================================================
%%% Classification
%%%===================================================================

-spec ops() -> [binary()].
ops() -> ?OPS.

op_index(<<"roster_get">>) -> 1;
op_index(<<"roster_iq">>) -> 2;
op_index(<<"in_subscription">>) -> 3;
op_index(<<"out_subscription">>) -> 4;
op_index(<<"jid_info">>) -> 5;
op_index(<<"pending_in">>) -> 6;
op_index(<<"remove_user">>) -> 7;
op_index(<<"store_get_roster">>) -> 8;
op_index(<<"store_get_item">>) -> 9;
op_index(<<"store_set_item">>) -> 10;
op_index(<<"store_del_item">>) -> 11;
op_index(<<"store_remove_user">>) -> 12;
op_index(<<"store_read_version">>) -> 13;
op_index(_) -> 14.

op_base(Ix) -> (Ix - 1) * ?OP_SLOTS.

op_label(Op) -> lists:nth(op_index(Op), ?OPS).

%% @doc The kind of a failed call (roster_port_pool:call_result()).
-spec error_kind(term()) -> binary().
error_kind({error, timeout}) -> <<"timeout">>;
error_kind({error, unavailable}) -> <<"unavailable">>;
error_kind({error, frame_too_large}) -> <<"request_too_large">>;
error_kind({error, {program, #{<<"code">> := <<"timeout">>}}}) -> <<"not_started">>;
error_kind({error, {program, #{<<"code">> := Code}}}) when is_binary(Code) ->
    case lists:member(Code, ?KINDS) of
        true -> Code;
        false -> <<"other">>
    end;
error_kind(_) -> <<"other">>.

%% @doc The bucket (1..N_BUCKETS) of a latency in microseconds.
-spec bucket(non_neg_integer()) -> pos_integer().
bucket(Us) when Us =< 500 -> 1;
bucket(Us) when Us =< 1000 -> 2;
bucket(Us) when Us =< 2500 -> 3;
bucket(Us) when Us =< 5000 -> 4;
bucket(Us) when Us =< 10000 -> 5;
bucket(Us) when Us =< 25000 -> 6;
bucket(Us) when Us =< 50000 -> 7;
bucket(Us) when Us =< 100000 -> 8;
bucket(Us) when Us =< 250000 -> 9;
bucket(Us) when Us =< 500000 -> 10;
bucket(Us) when Us =< 1000000 -> 11;
bucket(Us) when Us =< 2500000 -> 12;
bucket(Us) when Us =< 5000000 -> 13;
bucket(Us) when Us =< 10000000 -> 14;
bucket(_) -> 15.

-spec exit_reason(term()) -> atom().
exit_reason(Why) when is_tuple(Why), tuple_size(Why) >= 1 ->
    Reason = element(1, Why),
    case lists:member(Reason, ?EXIT_REASONS) of
        true -> Reason;
        false -> other
    end;
exit_reason(_) -> other.

cache_index(roster) -> 1;
cache_index(iq) -> 2;
cache_index(jid_info) -> 3.

index(X, List) -> index(X, List, 1).
index(X, [X | _], N) -> N;
index(X, [_ | T], N) -> index(X, T, N + 1);
index(_, [], N) -> N - 1.  % the last: `other`

%%%===================================================================
%%% Collecting
%%%===================================================================

%% @doc The figures of each host, each part asked for with one deadline.
-spec collect([binary()]) -> [map()].
collect(Hosts) ->
    collect(Hosts, ?SCRAPE_MS).

-spec collect([binary()], pos_integer()) -> [map()].
collect(Hosts, TimeoutMs) ->
    Deadline = erlang:monotonic_time(millisecond) + TimeoutMs,
    Jobs = lists:append([host_jobs(Host, Deadline) || Host <- Hosts]),
    Results = run_all(Jobs, Deadline),
    [host_figures(Host, [{Part, R} || {{H, Part}, R} <- Results, H == Host]) || Host <- Hosts].

host_jobs(Host, Deadline) ->
    Names = roster_port_pool:worker_names(Host),
    Indexed = lists:zip(lists:seq(1, length(Names)), Names),
    [{{Host, journal}, fun() -> roster_port_journal:status(Host) end}
     | lists:append([[{{Host, {status, I}}, fun() -> gen_server:call(Name, status, infinity) end},
                      {{Host, {program, I}}, fun() -> program_metrics(Name, Deadline) end}]
                     || {I, Name} <- Indexed])].

%% The worker answers the request itself once its deadline has passed
%% (at most 200 ms later: roster_port_worker's sweep).
program_metrics(Name, Deadline) ->
    gen_server:call(Name, {request, <<"metrics">>, #{}, Deadline}, infinity).

%% Each job in a process of its own, all waited for until Deadline: a job
%% not done by then is `missing` (and killed).
run_all(Jobs, Deadline) ->
    Self = self(),
    Running = [{Key, spawn_monitor(fun() -> Self ! {self(), job_result(Fun)} end)}
               || {Key, Fun} <- Jobs],
    [{Key, wait_job(Pid, Mon, Deadline)} || {Key, {Pid, Mon}} <- Running].

job_result(Fun) ->
    try Fun()
    catch _:_ -> missing
    end.

wait_job(Pid, Mon, Deadline) ->
    Left = max(0, Deadline - erlang:monotonic_time(millisecond)),
    receive
        {Pid, Result} ->
            erlang:demonitor(Mon, [flush]),
            Result;
        {'DOWN', Mon, process, Pid, _} ->
            missing
    after Left ->
            erlang:demonitor(Mon, [flush]),
            exit(Pid, kill),
            %% A result sent just before the kill.
            receive {Pid, _} -> ok after 0 -> ok end,
            missing
    end.

host_figures(Host, Parts) ->
    Counters = case persistent_term:get(?KEY(Host), undefined) of
                   undefined -> undefined;
                   Ref -> read_counters(Ref)
               end,
    Workers = lists:sort([{I, S} || {{status, I}, S} <- Parts]),
    Programs = lists:sort([{I, program_answer(R)} || {{program, I}, R} <- Parts]),
    Cache = roster_port_pool:cache(Host),
    #{host => Host,
      counters => Counters,
      journal => case proplists:get_value(journal, Parts) of
                     #{} = J -> J;
                     _ -> missing
                 end,
      workers => Workers,
      programs => [{I, element(1, P)} || {I, P} <- Programs],
      program_families => merge_program_samples([with_worker(I, F)
                                                  || {I, {ok, F}} <- Programs]),
      cache => #{live => roster_port_cache:is_live(Cache),
                 on => Cache /= undefined,
                 records => roster_port_cache:records(Cache)}}.

read_counters(Ref) ->
    list_to_tuple([counters:get(Ref, I) || I <- lists:seq(1, ?N_SLOTS)]).

%% A program's samples labelled with its worker: each program counts from
%% its own start, so the series are per worker. Summed over a host's
%% programs, one that restarted or did not answer this scrape in time would
%% make the sum drop, which Prometheus takes for a reset of the counter
%% (rate() and increase() then count the rest again); per worker, a
%% restart is that series' own reset and a missing answer leaves it stale.
with_worker(I, Families) ->
    W = {<<"worker">>, integer_to_binary(I)},
    [{Name, Type, Help, [{SName, lists:sort([W | Labels]), V} || {SName, Labels, V} <- Samples]}
     || {Name, Type, Help, Samples} <- Families].

%% {ok, Families} or {Why, []}: Why says what the program did instead.
program_answer({ok, #{<<"families">> := Families}}) ->
    case check_program_answer(Families) of
        {ok, Checked} -> {ok, Checked};
        {error, _} -> {bad_answer, []}
    end;
program_answer({ok, _}) -> {bad_answer, []};
program_answer({error, {program, #{<<"code">> := <<"unknown_op">>}}}) -> {unknown_op, []};
program_answer({error, timeout}) -> {timeout, []};
program_answer({error, unavailable}) -> {unavailable, []};
program_answer(missing) -> {timeout, []};
program_answer(_) -> {error, []}.

%% @doc A program's `metrics` answer, checked (see the module doc):
%% {ok, [{Name, Type, Help, [{SampleName, Labels, Value}]}]}, Labels sorted.
-spec check_program_answer(term()) -> {ok, list()} | {error, term()}.
check_program_answer(Families) when is_list(Families), length(Families) =< ?MAX_PROGRAM_FAMILIES ->
    try
        Checked = [check_family(F) || F <- Families],
        N = lists:sum([length(S) || {_, _, _, S} <- Checked]),
        N =< ?MAX_PROGRAM_SAMPLES orelse throw(too_many_samples),
        {ok, Checked}
    catch throw:Why -> {error, Why};
          error:_ -> {error, bad_family}
    end;
check_program_answer(_) ->
    {error, bad_families}.

check_family(#{<<"name">> := Name, <<"type">> := Type, <<"help">> := Help,
               <<"samples">> := Samples}) when is_list(Samples) ->
    program_name(Name) orelse throw({bad_name, Name}),
    lists:member(Name, ?SHIM_PROGRAM_FAMILIES) andalso throw({shim_family, Name}),
    lists:member(Type, [<<"counter">>, <<"gauge">>, <<"histogram">>]) orelse throw(bad_type),
    is_binary(Help) andalso byte_size(Help) =< 1024 andalso utf8(Help) orelse throw(bad_help),
    Checked = [check_sample(S) || S <- Samples],
    Allowed = sample_names(Name, Type),
    lists:all(fun({SName, _, _}) -> lists:member(SName, Allowed) end, Checked)
        orelse throw({sample_of_another_family, Name}),
    {Name, Type, Help, Checked};
check_family(_) ->
    throw(bad_family).

check_sample([Name, Labels, Value]) when is_map(Labels), is_number(Value) ->
    program_name(Name) orelse throw({bad_name, Name}),
    map_size(Labels) =< 8 orelse throw(too_many_labels),
    Checked = lists:sort(
                [begin
                     label_name(K) andalso K /= <<"host">> andalso K /= <<"worker">>
                         orelse throw({bad_label, K}),
                     is_binary(V) andalso byte_size(V) =< ?MAX_LABEL_BYTES andalso utf8(V)
                         orelse throw(bad_label_value),
                     {K, V}
                 end || {K, V} <- maps:to_list(Labels)]),
    {Name, Checked, Value};
check_sample(_) ->
    throw(bad_sample).

%% The sample names a family of Type may have (prometheus_client's).
sample_names(Name, <<"counter">>) -> [Name, <<Name/binary, "_total">>];
sample_names(Name, <<"gauge">>) -> [Name];
sample_names(Name, <<"histogram">>) ->
    [<<Name/binary, S/binary>> || S <- [<<"_bucket">>, <<"_sum">>, <<"_count">>]].

%% The text format is UTF-8: one invalid byte spoils the whole scrape.
utf8(B) ->
    unicode:characters_to_binary(B) =:= B.

program_name(<<"roster_port_program_", Rest/binary>>) when byte_size(Rest) > 0,
                                                           byte_size(Rest) =< 100 ->
    lists:all(fun(C) -> (C >= $a andalso C =< $z) orelse (C >= $0 andalso C =< $9)
                            orelse C == $_ end, binary_to_list(Rest));
program_name(_) -> false.

label_name(<<C, Rest/binary>>) when byte_size(Rest) < 64, ((C >= $a andalso C =< $z) orelse C == $_) ->
    lists:all(fun(X) -> (X >= $a andalso X =< $z) orelse (X >= $0 andalso X =< $9)
                            orelse X == $_ end, binary_to_list(Rest));
label_name(_) -> false.

%% @doc The checked answers of a host's programs, summed sample by sample
%% (same name and labels); families in the order first seen.
-spec merge_program_samples([list()]) -> list().
merge_program_samples(Answers) ->
    {Order, Meta, Sums} =
        lists:foldl(
          fun({Name, Type, Help, Samples}, {O, M, S}) ->
                  {O1, M1} = case maps:is_key(Name, M) of
                                 true -> {O, M};
                                 false -> {[Name | O], M#{Name => {Type, Help, []}}}
                             end,
                  lists:foldl(
                    fun({SName, Labels, Value}, {O2, M2, S2}) ->
                            Key = {SName, Labels},
                            {Type0, Help0, Keys} = maps:get(Name, M2),
                            case S2 of
                                #{Key := {Fam, Old}} when Fam == Name ->
                                    {O2, M2, S2#{Key => {Fam, Old + Value}}};
                                #{Key := _} ->
                                    %% Same sample in two families: keep the first.
                                    {O2, M2, S2};
                                _ ->
                                    {O2, M2#{Name => {Type0, Help0, [Key | Keys]}},
                                     S2#{Key => {Name, Value}}}
                            end
                    end, {O1, M1, S}, Samples)
          end, {[], #{}, #{}}, lists:append(Answers)),
    [begin
         {Type, Help, Keys} = maps:get(Name, Meta),
         {Name, Type, Help, [{SName, Labels, element(2, maps:get(K, Sums))}
                             || {SName, Labels} = K <- lists:reverse(Keys)]}
     end || Name <- lists:reverse(Order)].

%%%===================================================================
%%% Rendering: Prometheus text format 0.0.4
%%%===================================================================

%% @doc The figures of collect/1,2 as the text format (an iolist).
-spec render([map()]) -> iodata().
render(HostFigures) ->
    Families = families(HostFigures),
    [render_family(F) || F = {_, _, _, [_ | _]} <- Families].

%% Every family, each with the samples of every host, in a fixed order.
families(Hosts) ->
    Shim = [shim_families(H) || H <- Hosts],
    ShimMerged = merge_by_name(lists:append(Shim)),
    Program = merge_by_name(lists:append([labelled_program_families(H) || H <- Hosts])),
    ShimMerged ++ Program.

merge_by_name(Families) ->
    {Order, Map} = lists:foldl(
                     fun({Name, Type, Help, Samples}, {O, M}) ->
                             case M of
                                 #{Name := {T, H, S}} -> {O, M#{Name => {T, H, S ++ Samples}}};
                                 _ -> {[Name | O], M#{Name => {Type, Help, Samples}}}
                             end
                     end, {[], #{}}, Families),
    [begin {T, H, S} = maps:get(N, Map), {N, T, H, S} end || N <- lists:reverse(Order)].

labelled_program_families(#{host := Host, program_families := Families}) ->
    [{Name, Type, Help, [{SName, [{<<"host">>, Host} | Labels], V} || {SName, Labels, V} <- S]}
     || {Name, Type, Help, S} <- Families].

shim_families(#{host := Host, counters := C} = Figures) ->
    HL = [{<<"host">>, Host}],
    OpFamilies = case C of
                     undefined -> [];
                     _ -> op_families(HL, C)
                 end,
    OpFamilies ++ host_families(HL, C, Figures).

op_families(HL, C) ->
    Ops = lists:zip(lists:seq(1, ?N_OPS), ?OPS),
    Get = fun(Ix, Slot) -> element(op_base(Ix) + Slot, C) end,
    Used = [{Ix, Op} || {Ix, Op} <- Ops,
                        Get(Ix, ?OP_REQUESTS) > 0 orelse Get(Ix, ?OP_IN_FLIGHT) /= 0],
    [{<<"roster_port_requests_total">>, counter,
      <<"Requests to the program from ejabberd (hooks, roster IQs, storage calls) that ended, "
        "by op">>,
      [{<<"roster_port_requests_total">>, HL ++ [{<<"op">>, Op}], Get(Ix, ?OP_REQUESTS)}
       || {Ix, Op} <- Used]},
     {<<"roster_port_request_errors_total">>, counter,
      <<"Requests that ended in an error, by op and kind (timeout: no answer by the "
        "deadline; unavailable: no program; the others: the program's error codes)">>,
      [{<<"roster_port_request_errors_total">>, HL ++ [{<<"op">>, Op}, {<<"kind">>, Kind}], N}
       || {Ix, Op} <- Used, {K, Kind} <- lists:zip(lists:seq(1, ?N_KINDS), ?KINDS),
          N <- [Get(Ix, ?OP_ERRORS + K)], N > 0]},
     {<<"roster_port_request_duration_seconds">>, histogram,
      <<"Time from sending a request to its answer, as its caller in ejabberd waited "
        "(waiting for a starting program included)">>,
      lists:append(
        [histogram_samples(<<"roster_port_request_duration_seconds">>, HL ++ [{<<"op">>, Op}],
                           [Get(Ix, ?OP_BUCKETS + B) || B <- lists:seq(1, ?N_BUCKETS)],
                           Get(Ix, ?OP_SUM_US) / 1000000)
         || {Ix, Op} <- Used])},
     {<<"roster_port_requests_in_flight">>, gauge,
      <<"Requests sent by ejabberd's processes and not answered yet (waiting for a program "
        "or sent to it), by op">>,
      [{<<"roster_port_requests_in_flight">>, HL ++ [{<<"op">>, Op}], Get(Ix, ?OP_IN_FLIGHT)}
       || {Ix, Op} <- Used]}].

histogram_samples(Name, Labels, Buckets, Sum) ->
    Cumulative = tl(lists:reverse(lists:foldl(fun(N, [Acc | _] = L) -> [Acc + N | L] end,
                                              [0], Buckets))),
    [{<<Name/binary, "_bucket">>, Labels ++ [{<<"le">>, Le}], N}
     || {Le, N} <- lists:zip(?BUCKET_LE, Cumulative)]
        ++ [{<<Name/binary, "_sum">>, Labels, Sum},
            {<<Name/binary, "_count">>, Labels, lists:last(Cumulative)}].

host_families(HL, C, #{workers := Workers, programs := Programs, journal := Journal,
                       cache := Cache}) ->
    Slot = fun(S) -> case C of undefined -> 0; _ -> element(S, C) end end,
    WL = fun(I) -> HL ++ [{<<"worker">>, integer_to_binary(I)}] end,
    StatusOf = fun(I) -> case lists:keyfind(I, 1, Workers) of
                             {_, #{} = S} -> S;
                             _ -> #{}
                         end end,
    Indices = lists:usort([I || {I, _} <- Workers] ++ [I || {I, _} <- Programs]),
    WaitingByOp = lists:foldl(
                    fun({_, #{waiting_ops := W}}, Acc) ->
                            maps:fold(fun(Op, N, A) ->
                                              maps:update_with(op_label(Op), fun(X) -> X + N end,
                                                               N, A)
                                      end,
                                      Acc, W);
                       (_, Acc) -> Acc
                    end, #{}, Workers),
    [{<<"roster_port_cache_lookups_total">>, counter,
      <<"Lookups of the shim's read cache, by kind (roster: roster_get; iq: roster IQ get; "
        "jid_info) and result (hit: answered from the cache; miss: asked the program)">>,
      [{<<"roster_port_cache_lookups_total">>,
        HL ++ [{<<"kind">>, atom_to_binary(K)}, {<<"result">>, R}],
        Slot(?CACHE_SLOT(KIx, Hit))}
       || C /= undefined,
          {KIx, K} <- lists:zip([1, 2, 3], ?CACHE_KINDS),
          {Hit, R} <- [{1, <<"hit">>}, {2, <<"miss">>}]]},
     {<<"roster_port_cache_live">>, gauge,
      <<"1 when the read cache answers (its program's change feed is known open), else 0">>,
      [{<<"roster_port_cache_live">>, HL, bool(maps:get(live, Cache))} || maps:get(on, Cache)]},
     {<<"roster_port_cache_records">>, gauge, <<"Records in the read cache">>,
      [{<<"roster_port_cache_records">>, HL, maps:get(records, Cache)} || maps:get(on, Cache)]},
     {<<"roster_port_program_starts_total">>, counter,
      <<"Programs started by the pool's workers (the first start included)">>,
      [{<<"roster_port_program_starts_total">>, HL, Slot(?STARTS_SLOT)} || C /= undefined]},
     {<<"roster_port_program_exits_total">>, counter,
      <<"Programs that ended, by reason (exit_status: it exited by itself; hung, not_frames, "
        "stdin_unread, stdin_full: killed by the shim; ...); each is restarted">>,
      [{<<"roster_port_program_exits_total">>, HL ++ [{<<"reason">>, atom_to_binary(R)}], N}
       || C /= undefined, {RIx, R} <- lists:zip(lists:seq(1, ?N_REASONS), ?EXIT_REASONS),
          N <- [Slot(?REASON_SLOT(RIx))], N > 0]},
     {<<"roster_port_program_exit_status_total">>, counter,
      <<"Programs that exited by themselves, by exit status (128 + N: killed by signal N)">>,
      [{<<"roster_port_program_exit_status_total">>,
        HL ++ [{<<"status">>, integer_to_binary(S)}], N}
       || C /= undefined, S <- lists:seq(0, 255), N <- [Slot(?STATUS_SLOT(S))], N > 0]},
     {<<"roster_port_program_up">>, gauge,
      <<"1 when the worker's program has answered its hello and serves, else 0">>,
      [{<<"roster_port_program_up">>, WL(I), bool(maps:get(status, StatusOf(I), down) == up)}
       || I <- Indices]},
     {<<"roster_port_requests_sent">>, gauge,
      <<"Requests written to the worker's program and not answered yet">>,
      [{<<"roster_port_requests_sent">>, WL(I), maps:get(pending, StatusOf(I), 0)}
       || I <- Indices, maps:is_key(pending, StatusOf(I))]},
     {<<"roster_port_requests_waiting">>, gauge,
      <<"Requests queued in the workers for a program that is starting, by op">>,
      [{<<"roster_port_requests_waiting">>, HL ++ [{<<"op">>, Op}], N}
       || {Op, N} <- lists:sort(maps:to_list(WaitingByOp))]},
     {<<"roster_port_requests_late">>, gauge,
      <<"Requests past their deadline whose answer is still awaited (carried out when it "
        "comes)">>,
      [{<<"roster_port_requests_late">>, WL(I), maps:get(late, StatusOf(I), 0)}
       || I <- Indices, maps:is_key(late, StatusOf(I))]},
     {<<"roster_port_program_metrics_ok">>, gauge,
      <<"1 when the worker's program answered the scrape's metrics request in time, else 0 "
        "(the program's own roster_port_program_* figures then lack its share)">>,
      [{<<"roster_port_program_metrics_ok">>, WL(I), bool(Why == ok)} || {I, Why} <- Programs]},
     {<<"roster_port_journal_entries">>, gauge,
      <<"Subscription presences in the journal, by state (pending: all not done yet; "
        "retrying: waiting for a retry; running: being applied)">>,
      case Journal of
          #{} ->
              [{<<"roster_port_journal_entries">>, HL ++ [{<<"state">>, atom_to_binary(S)}],
                maps:get(S, Journal, 0)} || S <- [pending, retrying, running]];
          missing -> []
      end},
     {<<"roster_port_journal_dropped_total">>, counter,
      <<"Journal entries given up (refused for good by the program, or crashed or "
        "answered internal at every attempt)">>,
      case Journal of
          #{dropped := D} -> [{<<"roster_port_journal_dropped_total">>, HL, D}];
          _ -> []
      end}].

bool(true) -> 1;
bool(false) -> 0.

%% A counter's family is named with its `_total` (as prometheus_client
%% writes it); the programs' families come without it.
render_family({Name0, Type, Help, Samples}) ->
    TypeText = if is_atom(Type) -> atom_to_binary(Type); true -> Type end,
    Name = case TypeText == <<"counter">> andalso
               binary:longest_common_suffix([Name0, <<"_total">>]) /= 6 of
               true -> <<Name0/binary, "_total">>;
               false -> Name0
           end,
    [<<"# HELP ">>, Name, $\s, escape_help(Help), $\n,
     <<"# TYPE ">>, Name, $\s, TypeText, $\n,
     [[SName, render_labels(Labels), $\s, format_value(V), $\n] || {SName, Labels, V} <- Samples]].

render_labels([]) -> [];
render_labels(Labels) ->
    [${, lists:join($,, [[K, <<"=\"">>, escape_label(V), $"] || {K, V} <- Labels]), $}].

escape_help(Text) ->
    binary:replace(binary:replace(Text, <<"\\">>, <<"\\\\">>, [global]),
                   <<"\n">>, <<"\\n">>, [global]).

escape_label(V) ->
    << <<(case C of
              $\\ -> <<"\\\\">>;
              $" -> <<"\\\"">>;
              $\n -> <<"\\n">>;
              _ -> <<C>>
          end)/binary>> || <<C>> <= V >>.

-spec format_value(number()) -> binary().
format_value(V) when is_integer(V) -> integer_to_binary(V);
format_value(V) when is_float(V) ->
    case V == trunc(V) andalso abs(V) < 1.0e15 of
        true -> integer_to_binary(trunc(V));
        false -> float_to_binary(V, [short])
    end.

%%%===================================================================
%%% For a person (ejabberdctl roster_port_status)
%%%===================================================================

%% @doc The same figures as render/1, as lines for a person to read.
-spec status_text([map()]) -> iodata().
status_text(HostFigures) ->
    [host_text(H) || H <- HostFigures].

host_text(#{host := Host, counters := C, workers := Workers, programs := Programs,
            journal := Journal, cache := Cache, program_families := PF}) ->
    Get = fun(S) -> case C of undefined -> 0; _ -> element(S, C) end end,
    [io_lib:format("host ~ts~n", [Host]),
     [io_lib:format("  program ~B: ~ts, os pid ~ts, started ~B times, ~B sent, ~B waiting, "
                    "~B late; metrics: ~ts~n",
                    [I, maps:get(status, S, unknown), pid_text(maps:get(os_pid, S, undefined)),
                     maps:get(starts, S, 0), maps:get(pending, S, 0), maps:get(waiting, S, 0),
                     maps:get(late, S, 0), proplists:get_value(I, Programs, missing)])
      || {I, S0} <- Workers, S <- [case S0 of #{} -> S0; _ -> #{} end]],
     io_lib:format("  programs started ~B, ended ~B~ts~n",
                   [Get(?STARTS_SLOT),
                    lists:sum([Get(?REASON_SLOT(R)) || R <- lists:seq(1, ?N_REASONS)]),
                    exits_text(Get)]),
     io_lib:format("  ~-20s ~9s ~9s ~9s ~11s~n", ["op", "requests", "errors", "in flight",
                                                 "mean (ms)"]),
     [begin
          B = op_base(Ix),
          N = Get(B + ?OP_REQUESTS),
          Errors = lists:sum([Get(B + ?OP_ERRORS + K) || K <- lists:seq(1, ?N_KINDS)]),
          Mean = case N of 0 -> 0.0; _ -> Get(B + ?OP_SUM_US) / N / 1000 end,
          [io_lib:format("  ~-20ts ~9B ~9B ~9B ~11.2f~n",
                         [Op, N, Errors, Get(B + ?OP_IN_FLIGHT), Mean]),
           [io_lib:format("    ~ts: ~B~n", [Kind, E])
            || {K, Kind} <- lists:zip(lists:seq(1, ?N_KINDS), ?KINDS),
               E <- [Get(B + ?OP_ERRORS + K)], E > 0]]
      end || {Ix, Op} <- lists:zip(lists:seq(1, ?N_OPS), ?OPS),
             Get(op_base(Ix) + ?OP_REQUESTS) > 0 orelse Get(op_base(Ix) + ?OP_IN_FLIGHT) /= 0],
     case maps:get(on, Cache) of
         true ->
             io_lib:format("  cache: ~ts, ~B records; ~ts~n",
                           [case maps:get(live, Cache) of true -> "live"; false -> "off" end,
                            maps:get(records, Cache),
                            lists:join(", ", [io_lib:format("~ts ~B hits ~B misses",
                                                            [K, Get(?CACHE_SLOT(KIx, 1)),
                                                             Get(?CACHE_SLOT(KIx, 2))])
                                              || {KIx, K} <- lists:zip([1, 2, 3], ?CACHE_KINDS)])]);
         false ->
             "  cache: none\n"
     end,
     case Journal of
         #{} -> io_lib:format("  journal: ~B pending, ~B retrying, ~B running, ~B dropped~n",
                              [maps:get(K, Journal, 0) || K <- [pending, retrying, running, dropped]]);
         missing -> "  journal: no answer\n"
     end,
     program_text(PF)].

pid_text(undefined) -> "none";
pid_text(Pid) -> integer_to_list(Pid).

exits_text(Get) ->
    Reasons = [io_lib:format("~ts ~B", [R, N])
               || {RIx, R} <- lists:zip(lists:seq(1, ?N_REASONS), ?EXIT_REASONS),
                  N <- [Get(?REASON_SLOT(RIx))], N > 0],
    Statuses = [io_lib:format("status ~B: ~B", [S, N])
                || S <- lists:seq(0, 255), N <- [Get(?STATUS_SLOT(S))], N > 0],
    case Reasons ++ Statuses of
        [] -> "";
        All -> [" (", lists:join(", ", All), ")"]
    end.

%% The programs' own figures (summed): each sample on a line, but the
%% buckets of histograms.
program_text([]) ->
    "  program figures: none\n";
program_text(Families) ->
    ["  program figures (summed over the host's programs):\n",
     [[io_lib:format("    ~ts~ts ~ts~n", [SName, render_labels(Labels), format_value(V)])
       || {SName, Labels, V} <- Samples,
          binary:longest_common_suffix([SName, <<"_bucket">>]) /= 7]
      || {_, _, _, Samples} <- Families]].
