%%% roster_bench: the load generator of bench/run, loaded into a running ejabberd node.
%%%
%%% It calls the roster hooks exactly as ejabberd's own code does (ejabberd_c2s,
%%% ejabberd_sm, mod_admin_extra), from one or several concurrent processes, and
%%% reports how many calls it made, the wall time and the latency percentiles.
%%% It does not know which roster backend is configured: the same calls measure
%%% stock mod_roster (Mnesia, SQL) and mod_roster_port.
%%%
%%% Every call checks its answer (roster length, subscription state, hook
%%% verdict) and crashes on a wrong one: a backend that fails fast with a safe
%%% answer must not look fast.
%%%
%%% The data set, mirrored by bench/bench.py for the stores it loads itself:
%%%   users u0..u{N-1}; user I's contacts are its K ring neighbours
%%%   u(I-K/2)..u(I+K/2) minus itself, subscription both, group "Friends";
%%%   users size<S> (one per roster size S) with contacts s0..s{S-1}.
-module(roster_bench).

-export([populate/4, roster_sizes/2, suite/5, touch/4]).

-include("mod_roster.hrl").
-include("xmpp.hrl").

-type result() :: {binary(), pos_integer(), non_neg_integer(), non_neg_integer(),
                   float(), float()}.

%%% ---------------------------------------------------------------------------
%%% Data set
%%% ---------------------------------------------------------------------------

user(I) -> <<"u", (integer_to_binary(I))/binary>>.

ring(I, N, K) ->
    [(I + D + N) rem N || D <- lists:seq(-(K div 2), K div 2), D =/= 0].

size_user(S) -> <<"size", (integer_to_binary(S))/binary>>.

size_contact(C) -> <<"s", (integer_to_binary(C))/binary>>.

%% Writes the data set through mod_roster's own storage backend (whatever
%% db_type says), one transaction per user, from 8 processes. bench.py uses it
%% for Mnesia and bulk-loads the SQL stores itself (it is much faster there).
-spec populate(binary(), pos_integer(), pos_integer(), [pos_integer()]) -> result().
populate(Host, N, K, Sizes) ->
    Mod = gen_mod:db_mod(Host, mod_roster),
    Rosters = [{user(I), [user(C) || C <- ring(I, N, K)]} || I <- lists:seq(0, N - 1)]
        ++ [{size_user(S), [size_contact(C) || C <- lists:seq(0, S - 1)]} || S <- Sizes],
    result(<<"populate">>, 8,
           each(8, Rosters, fun({LUser, Contacts}) ->
                                    write_roster(Mod, Host, LUser, Contacts)
                            end)).

write_roster(Mod, Host, LUser, Contacts) ->
    Write = fun(Contact) ->
                    LJID = {Contact, Host, <<>>},
                    Mod:update_roster(LUser, Host, LJID,
                                      #roster{usj = {LUser, Host, LJID}, us = {LUser, Host},
                                              jid = LJID, name = Contact, subscription = both,
                                              ask = none, groups = [<<"Friends">>]})
            end,
    {atomic, _} = Mod:transaction(Host, fun() -> lists:foreach(Write, Contacts) end).

%% How many items roster_get answers for each user: the driver's check that
%% every variant holds the same data set.
-spec roster_sizes(binary(), [binary()]) -> [{binary(), non_neg_integer()}].
roster_sizes(Host, Users) ->
    [{U, length(roster_get(Host, U))} || U <- Users].

%%% ---------------------------------------------------------------------------
%%% The hooks, called as ejabberd calls them
%%% ---------------------------------------------------------------------------

roster_get(Host, LUser) ->
    ejabberd_hooks:run_fold(roster_get, Host, [], [{LUser, Host}]).

roster_get(Host, LUser, Expected) ->
    case length(roster_get(Host, LUser)) of
        Expected -> ok;
        Other -> erlang:error({roster_get, LUser, Expected, Other})
    end.

jid_info(Host, LUser, ContactJID) ->
    case ejabberd_hooks:run_fold(roster_get_jid_info, Host, {none, none, []},
                                 [LUser, Host, ContactJID]) of
        {both, _, [_ | _]} -> ok;
        Other -> erlang:error({jid_info, LUser, jid:encode(ContactJID), Other})
    end.

%% mod_admin_extra's write path (ejabberdctl add_rosteritem): a new item each time.
write(Host, Tag, P, Seq) ->
    User = jid:make(<<"wr", Tag/binary, "_", (integer_to_binary(P))/binary, "_",
                      (integer_to_binary(Seq rem 50))/binary>>, Host),
    Item = #roster_item{jid = jid:make(<<"c", (integer_to_binary(Seq))/binary>>, Host),
                        name = <<"Written">>, subscription = both, groups = [<<"Bench">>]},
    ok = mod_roster:set_item_and_notify_clients(User, Item, true).

%% One subscription handshake between two new users, as ejabberd runs it when
%% A's client sends subscribe and B's client answers subscribed: out hook on the
%% sender's side (ejabberd_c2s), in hook on the receiver's (ejabberd_sm), and back.
handshake(Host, {A, B}) ->
    Send = fun(From, To, Type) ->
                   Out = #presence{from = jid:replace_resource(From, <<"bench">>), to = To,
                                   type = Type},
                   ejabberd_hooks:run(roster_out_subscription, Host, [Out]),
                   %% ejabberd_sm delivers the presence only when the hook says true.
                   case ejabberd_hooks:run_fold(roster_in_subscription, Host, false, [Out]) of
                       true -> ok;
                       Other -> erlang:error({roster_in_subscription, Type, Other})
                   end
           end,
    Send(A, B, subscribe),
    Send(B, A, subscribed).

%% Count pairs of new users for handshakes. They are registered (untimed): the
%% in hook answers false for a user who does not exist (ejabberd_sm's check at
%% sequence 20), as it does in production.
handshake_pairs(Host, Tag, Count) ->
    Make = fun(I, Side) ->
                   J = jid:make(<<"hs", Tag/binary, "_", (integer_to_binary(I))/binary,
                                  Side/binary>>, Host),
                   case ejabberd_auth:try_register(J#jid.luser, Host, <<"secret">>) of
                       ok -> J;
                       {error, exists} -> J
                   end
           end,
    [{Make(I, <<"a">>), Make(I, <<"b">>)} || I <- lists:seq(1, Count)].

%%% ---------------------------------------------------------------------------
%%% The measurements
%%% ---------------------------------------------------------------------------

%% Run right after ejabberd (and so every cache) was restarted: the first two
%% measurements touch each user once, on disjoint halves of the users so that
%% neither warms the other's data. Seconds is the length of each timed run;
%% Handshakes the most handshakes one handshake run makes (their users are
%% registered beforehand).
-spec suite(binary(), pos_integer(), pos_integer(), number(), pos_integer()) -> [result()].
suite(Host, N, K, Seconds, Handshakes) ->
    Half = N div 2,
    First = [user(I) || I <- lists:seq(0, Half - 1)],
    FirstInfo = [{user(I), jid:make(user(hd(ring(I, N, K))), Host)}
                 || I <- lists:seq(Half, N - 1)],
    R1 = result(<<"roster_get first touch">>, 8,
                each(8, First, fun(U) -> roster_get(Host, U, K) end)),
    R2 = result(<<"jid_info first touch">>, 8,
                each(8, FirstInfo, fun({U, C}) -> jid_info(Host, U, C) end)),
    %% Warm: every user (and every pair asked about) touched once, untimed.
    Users = list_to_tuple([user(I) || I <- lists:seq(0, N - 1)]),
    Pairs = list_to_tuple([{user(I), jid:make(user(C), Host)}
                           || I <- lists:seq(0, N - 1), C <- lists:sublist(ring(I, N, K), 5)]),
    each(8, tuple_to_list(Users), fun(U) -> roster_get(Host, U, K) end),
    each(8, tuple_to_list(Pairs), fun({U, C}) -> jid_info(Host, U, C) end),
    Pairs1 = handshake_pairs(Host, <<"x">>, Handshakes),
    Pairs8 = handshake_pairs(Host, <<"y">>, Handshakes),
    GetWarm = fun(P, Seq) -> roster_get(Host, pick(Users, P, Seq), K) end,
    InfoWarm = fun(P, Seq) -> {U, C} = pick(Pairs, P, Seq), jid_info(Host, U, C) end,
    [R1, R2,
     result(<<"roster_get warm">>, 8, timed(8, Seconds, GetWarm)),
     result(<<"jid_info warm">>, 1, timed(1, Seconds, InfoWarm)),
     result(<<"jid_info warm">>, 8, timed(8, Seconds, InfoWarm)),
     result(<<"write (set_item_and_notify_clients)">>, 1,
            timed(1, Seconds, fun(P, Seq) -> write(Host, <<"x">>, P, Seq) end)),
     result(<<"write (set_item_and_notify_clients)">>, 8,
            timed(8, Seconds, fun(P, Seq) -> write(Host, <<"y">>, P, Seq) end)),
     result(<<"subscription handshake">>, 1,
            each(1, Pairs1, Seconds, fun(Pair) -> handshake(Host, Pair) end)),
     result(<<"subscription handshake">>, 8,
            each(8, Pairs8, Seconds, fun(Pair) -> handshake(Host, Pair) end))].

%% For the memory measurement: first-touch roster_get and jid_info on Samples
%% users spread over the N users of a big store.
-spec touch(binary(), pos_integer(), pos_integer(), pos_integer()) -> [result()].
touch(Host, N, K, Samples) ->
    Step = max(1, N div Samples),
    Is = lists:seq(0, N - 1, Step),
    [result(<<"roster_get first touch (big store)">>, 8,
            each(8, [user(I) || I <- Is], fun(U) -> roster_get(Host, U, K) end)),
     result(<<"jid_info (big store)">>, 8,
            each(8, [{user(I), jid:make(user(hd(ring(I, N, K))), Host)} || I <- Is],
                 fun({U, C}) -> jid_info(Host, U, C) end))].

pick(Tuple, P, Seq) ->
    element(1 + (P * 7919 + Seq) rem tuple_size(Tuple), Tuple).

%%% ---------------------------------------------------------------------------
%%% Runners: latencies in microseconds
%%% ---------------------------------------------------------------------------

%% Fun on each element of Items, the items dealt to Procs processes.
each(Procs, Items, Fun) ->
    Slices = deal(Items, Procs),
    run([fun() -> [latency(Fun, X) || X <- Slice] end || Slice <- Slices]).

%% The same, but each process stops when Seconds have passed.
each(Procs, Items, Seconds, Fun) ->
    Deadline = now_us() + round(Seconds * 1.0e6),
    run([fun() -> until(Fun, Slice, Deadline, []) end || Slice <- deal(Items, Procs)]).

until(Fun, [X | Rest], Deadline, Acc) ->
    case now_us() < Deadline of
        true -> until(Fun, Rest, Deadline, [latency(Fun, X) | Acc]);
        false -> Acc
    end;
until(_, [], _, Acc) ->
    Acc.

%% Procs processes; process P calls Fun(P, Seq) for Seq = 0, 1, ... until
%% Seconds have passed.
timed(Procs, Seconds, Fun) ->
    Deadline = now_us() + round(Seconds * 1.0e6),
    run([fun() -> loop(Fun, P, 0, Deadline, []) end || P <- lists:seq(0, Procs - 1)]).

loop(Fun, P, Seq, Deadline, Acc) ->
    case now_us() < Deadline of
        true -> loop(Fun, P, Seq + 1, Deadline, [latency(fun(S) -> Fun(P, S) end, Seq) | Acc]);
        false -> Acc
    end.

%% Starts every job at once and waits for all; a crash in a job crashes the caller.
run(Jobs) ->
    Parent = self(),
    T0 = now_us(),
    Pids = [spawn_link(fun() -> Parent ! {self(), Job()} end) || Job <- Jobs],
    Latencies = lists:append([receive {Pid, L} -> L end || Pid <- Pids]),
    {length(Latencies), now_us() - T0, Latencies}.

latency(Fun, X) ->
    T0 = erlang:monotonic_time(nanosecond),
    Fun(X),
    (erlang:monotonic_time(nanosecond) - T0) / 1000.

deal(Items, Procs) ->
    Indexed = lists:zip(lists:seq(0, length(Items) - 1), Items),
    [[X || {I, X} <- Indexed, I rem Procs =:= P] || P <- lists:seq(0, Procs - 1)].

now_us() -> erlang:monotonic_time(microsecond).

result(Name, Procs, {Calls, WallUs, Latencies}) ->
    Sorted = lists:sort(Latencies),
    {Name, Procs, Calls, WallUs, percentile(Sorted, Calls, 0.50), percentile(Sorted, Calls, 0.99)}.

percentile(_, 0, _) -> 0.0;
percentile(Sorted, Count, Q) -> float(lists:nth(max(1, ceil(Q * Count)), Sorted)).
