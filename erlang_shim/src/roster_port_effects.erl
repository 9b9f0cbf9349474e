%%% @doc The effects of the program's answers and notifications (roster
%%% pushes, presences; docs/protocol.md, "Effects"), and the runner that
%%% carries out those that arrive without a caller.
%%%
%%% Effects of an answer are carried out by the caller (roster_port_call),
%%% in order, before its hook answers. Effects arriving without a caller
%%% (notifications, the answer to a replayed request, an answer that came
%%% after its caller's deadline) go to the runner of the worker that read
%%% them: a process linked to that worker that calls the pool's handler
%%% (handle_async/2 here) one event at a time, in the order run/2 was
%%% called. They must never be carried out inside the worker: routing a
%%% presence may run a roster hook that calls the same worker, which would
%%% deadlock.
%%%
%%% One bad effect is logged and skipped: it never breaks the hook, nor
%%% stops the runner.
-module(roster_port_effects).

-export([start_runner/3, run/2, sync/2, run_effects/2, handle_async/2,
         route_subscription/3, replay/3]).

-include("logger.hrl").
-include("xmpp.hrl").

%%%===================================================================
%%% The runner
%%%===================================================================

%% @doc Starts, linked to the caller (a worker of Host's pool), the runner
%% that calls Handler ({M, F, A}: M:F(A ++ [Event]); undefined: nothing)
%% for each event given to run/2.
-spec start_runner(binary(), pos_integer(), undefined | {module(), atom(), list()}) -> pid().
start_runner(Host, Index, Handler) ->
    proc_lib:spawn_link(fun() -> runner_loop(Host, Index, Handler) end).

%% @doc Queues Event on Runner, after the events queued before it.
-spec run(pid(), term()) -> ok.
run(Runner, Event) ->
    Runner ! {event, Event},
    ok.

%% @doc Returns once Runner has carried out every event given to it before
%% (or Timeout ms have passed, or it is gone).
-spec sync(pid(), timeout()) -> ok | timeout.
sync(Runner, Timeout) ->
    MRef = monitor(process, Runner),
    Runner ! {sync, self(), MRef},
    receive
        {synced, MRef} -> demonitor(MRef, [flush]), ok;
        {'DOWN', MRef, _, _, _} -> ok
    after max(0, Timeout) ->
            demonitor(MRef, [flush]),
            timeout
    end.

runner_loop(Host, Index, Handler) ->
    receive
        {sync, From, MRef} ->
            From ! {synced, MRef},
            runner_loop(Host, Index, Handler);
        {event, Event} ->
            try run_handler(Handler, Event)
            catch Class:Reason:Stack ->
                    ?LOG_ERROR("roster-port ~ts/~B: carrying out ~p failed: ~p:~p ~p",
                               [Host, Index, Event, Class, Reason, Stack])
            end,
            runner_loop(Host, Index, Handler)
    end.

run_handler(undefined, _Event) -> ok;
run_handler({M, F, A}, Event) -> apply(M, F, A ++ [Event]).

%%%===================================================================
%%% Effects
%%%===================================================================

%% Effects towards the user's own sessions (push, send_presence,
%% send_unavailable) reach the sessions on this node only, for answers and
%% notifications alike: a change made through this node is reported to every
%% other node that shares the store by that node's own change feed (the
%% program stamps its writes with the node; docs/protocol.md,
%% "Notifications"), and that node's shim covers its sessions. So each
%% session hears of each change exactly once, clustered or not.
run_effects(Host, Effects) when is_list(Effects) ->
    lists:foreach(fun(E) -> run_effect(Host, E) end, Effects);
run_effects(_Host, _) ->
    ok.

%% One bad effect is logged and skipped; it never breaks the hook. An effect
%% naming a JID ejabberd cannot parse is skipped with a warning.
run_effect(Host, Effect) ->
    try effect(Effect)
    catch
        throw:{undecodable_jid, J} ->
            #{<<"type">> := Type} = Effect,
            roster_port_call:log_skipped(<<Type/binary, " effect">>, effect_user(Effect), [J]);
        Class:Reason:Stack ->
            ?ERROR_MSG("roster-port ~ts: cannot carry out effect ~p: ~p:~p~n~p",
                       [Host, Effect, Class, Reason, Stack])
    end.

%% A JID of an effect, or the effect is skipped (run_effect/2).
effect_jid(J) ->
    case roster_port_wire:decode_jid(J) of
        {ok, JID} -> JID;
        error -> throw({undecodable_jid, J})
    end.

%% Whom an effect is about, for the log (the program's value: bounded).
effect_user(Effect) ->
    User = maps:get(<<"user">>, Effect, maps:get(<<"from">>, Effect, undefined)),
    case roster_port_wire:decode_jid(User) of
        {ok, JID} -> roster_port_wire:bare(JID);
        error -> roster_port_wire:printable(User)
    end.

%% The user's resources on this node.
local_resources(LUser, LServer) ->
    Here = node(),
    [R || R <- ejabberd_sm:get_user_resources(LUser, LServer),
          case ejabberd_sm:get_session_pid(LUser, LServer, R) of
              Pid when is_pid(Pid) -> node(Pid) == Here;
              _ -> false
          end].

effect(#{<<"type">> := <<"push">>, <<"user">> := User, <<"item">> := Item} = E) ->
    #jid{luser = LUser, lserver = LServer} = BareJID = effect_jid(User),
    _ = effect_jid(maps:get(<<"jid">>, Item, undefined)),
    case local_resources(LUser, LServer) of
        [] ->
            ok;  % nobody to push to here: the composition (folds of other modules) is not run
        Resources ->
            %% The item and ver as the composed roster has them (mod_shared_roster...).
            Query = roster_port_compose:push_query(LServer, LUser, Item,
                                                   maps:get(<<"ver">>, E, nil)),
            lists:foreach(
              fun(Resource) ->
                      ejabberd_router:route(
                        #iq{type = set, from = BareJID,
                            to = jid:replace_resource(BareJID, Resource),
                            id = <<"push", (p1_rand:get_string())/binary>>,
                            sub_els = [Query]})
              end, Resources)
    end;
effect(#{<<"type">> := <<"route_presence">>, <<"from">> := From, <<"to">> := To,
         <<"presence_type">> := Type} = E) ->
    ejabberd_router:route(
      #presence{from = effect_jid(From), to = effect_jid(To),
                type = roster_port_wire:presence_type(Type),
                status = roster_port_wire:text(maps:get(<<"status">>, E, nil))});
effect(#{<<"type">> := <<"send_presence">>, <<"user">> := User, <<"to">> := To}) ->
    #jid{luser = LUser, lserver = LServer} = effect_jid(User),
    ToJID = effect_jid(To),
    %% Each session sends its own last available presence (if it has one).
    lists:foreach(
      fun(Resource) ->
              case ejabberd_sm:get_session_pid(LUser, LServer, Resource) of
                  Pid when is_pid(Pid) -> ejabberd_c2s:resend_presence(Pid, ToJID);
                  _ -> ok
              end
      end, local_resources(LUser, LServer));
effect(#{<<"type">> := <<"send_unavailable">>, <<"user">> := User, <<"to">> := To}) ->
    #jid{luser = LUser, lserver = LServer} = BareJID = effect_jid(User),
    ToJID = effect_jid(To),
    lists:foreach(
      fun(Resource) ->
              ejabberd_router:route(
                #presence{from = jid:replace_resource(BareJID, Resource), to = ToJID,
                          type = unavailable})
      end, local_resources(LUser, LServer));
effect(Other) ->
    ?WARNING_MSG("roster-port: ignoring unknown effect ~p", [Other]).

%%%===================================================================
%%% Events without a caller (the pool's handler)
%%%===================================================================

%% Events that have no caller waiting: notifications, answers to replayed
%% presences, answers that came after their caller's deadline.
handle_async(Host, {notification, <<"roster_changed">>, Params}) ->
    %% The worker has already dropped the user's cached reads.
    run_effects(Host, maps:get(<<"effects">>, Params, []));
handle_async(Host, {notification, <<"feed_resumed">>, _Params}) ->
    %% The program's change feed is connected again (its database is back);
    %% the worker has emptied the read cache, as for any notification but
    %% roster_changed. Presences journalled while the store was unavailable
    %% are run now rather than at their next retry (up to 1 s away).
    roster_port_journal:retry_now(Host);
handle_async(Host, {notification, Name, _Params}) ->
    ?WARNING_MSG("roster-port ~ts: ignoring unknown notification ~ts", [Host, Name]);
handle_async(Host, {late, _Op, _Args, {ok, Result}}) ->
    run_effects(Host, maps:get(<<"effects">>, Result, []));
handle_async(Host, {Kind, Op, Args, Error}) ->
    ?ERROR_MSG("roster-port ~ts: ~ts request ~ts ~p failed: ~p",
               [Host, Kind, Op, Args, Error]).

%%%===================================================================
%%% Subscription presences: carrying out what the program answered
%%%===================================================================

%% @doc An outgoing subscription presence the program applied: routed to the
%% contact unless the program says not to (a pre-approval), from the bare
%% JID, as ejabberd_c2s would, after the roster_out_subscription hook (which
%% other modules may handle; ours skips a presence so marked).
-spec route_subscription(binary(), presence(), map()) -> ok.
route_subscription(LServer, #presence{from = From} = Pres, Result) ->
    case maps:get(<<"route">>, Result, true) of
        false ->
            ok;
        _ ->
            ejabberd_hooks:run(roster_out_subscription, LServer, [Pres]),
            ejabberd_router:route(xmpp:set_from(xmpp:del_meta(Pres, roster_port_forwarded),
                                                jid:remove_resource(From)))
    end.

%% @doc The journal's `apply` function (roster_port_journal): carries out a
%% journalled subscription presence from the start, in the process the
%% journal spawned for it. Returns ok, {retry, Why} or {dropped, Why}.
-spec replay(binary(), binary(), map()) -> ok | {retry, atom()} | {dropped, term()}.
replay(Host, Op, #{<<"user">> := User} = Args) ->
    #jid{luser = LUser, lserver = LServer} = jid:decode(User),
    Request = case Op of
                  %% Applied already, perhaps, and its answer lost: the
                  %% program then delivers it all the same (docs/protocol.md).
                  <<"in_subscription">> -> Args#{<<"replay">> => true};
                  _ -> Args
              end,
    roster_port_call:within_deadline(
      Host,
      fun() ->
              roster_port_call:as_journal_run(
                fun() -> replay1(LServer, LUser, User, Op, Args, Request) end)
      end).

replay1(LServer, LUser, User, Op, Args, Request) ->
    case roster_port_call:call(LServer, LUser, Op, maps:remove(<<"user">>, Request)) of
        {ok, Result} ->
            %% An earlier run of this entry may have been applied, and its
            %% answer come late: its effects (an automatic answer to the
            %% contact, pushes) went to the worker's runner, and must be
            %% carried out before the user's next entry.
            _ = roster_port_pool:sync_runner(LServer, User),
            carry_out(LServer, Op, Args, Result),
            ok;
        Error ->
            case roster_port_journal:retry_reason(Error) of
                {retry, Why} -> {retry, Why};
                final -> {dropped, Error}
            end
    end.

carry_out(LServer, <<"out_subscription">>, #{<<"user">> := User, <<"contact">> := Contact,
                                             <<"type">> := Type} = Args, Result) ->
    Pres = journalled_presence(Args, #presence{from = jid:decode(User), to = jid:decode(Contact),
                                               type = roster_port_wire:presence_type(Type)}),
    route_subscription(LServer, xmpp:put_meta(Pres, roster_port_forwarded, true), Result);
carry_out(_LServer, <<"in_subscription">>, Args, Result) ->
    case maps:get(<<"deliver">>, Result, false) of
        true -> deliver_late_presence(Args);
        _ -> ok
    end.

%% An inbound subscription presence journalled, now applied: handed to the
%% user's available sessions as ejabberd_sm would have (routing it again
%% would run roster_in_subscription twice).
deliver_late_presence(#{<<"user">> := User, <<"contact">> := Contact,
                        <<"type">> := Type} = Args) ->
    #jid{luser = LUser, lserver = LServer} = UserJID = jid:decode(User),
    Pres = journalled_presence(Args, #presence{from = jid:decode(Contact),
                                               type = roster_port_wire:presence_type(Type)}),
    lists:foreach(
      fun({_Prio, Resource}) ->
              case ejabberd_sm:get_session_pid(LUser, LServer, Resource) of
                  Pid when is_pid(Pid) ->
                      To = jid:replace_resource(UserJID, Resource),
                      ejabberd_c2s:route(Pid, {route, Pres#presence{to = To}});
                  _ ->
                      ok
              end
      end, ejabberd_sm:get_user_present_resources(LUser, LServer)).

%% A journalled subscription presence rebuilt as it came: a subscribe with
%% its request whole (`request_elements`, mod_roster_port_hooks), any other
%% with its status text. An entry journalled by an older shim has only the
%% status text.
journalled_presence(Args, Pres) ->
    {Statuses, SubEls, Dropped} =
        roster_port_wire:request_content(maps:get(<<"status">>, Args, nil),
                                         maps:get(<<"request_elements">>, Args, [])),
    Dropped > 0 andalso
        ?WARNING_MSG("roster-port: a journalled ~ts between ~ts and ~ts is carried out "
                     "without ~B of its elements (unreadable)",
                     [maps:get(<<"type">>, Args, <<"?">>), maps:get(<<"user">>, Args, <<"?">>),
                      maps:get(<<"contact">>, Args, <<"?">>), Dropped]),
    Pres#presence{status = Statuses, sub_els = SubEls}.
