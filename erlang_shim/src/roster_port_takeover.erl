%%% @doc The takeover of mod_roster's data hooks and of its jabber:iq:roster
%%% IQ handler, and the per-host guard that keeps it in place.
%%%
%%% Invariant (while mod_roster_port runs on Host): each hook of ?TAKEN_OVER
%%% has our handler and not mod_roster's, user_send_packet has ours, and the
%%% roster IQ handler is roster_port_iq's. Otherwise a hook runs twice, once
%%% through mod_roster's own state machine (which the program replaces) on
%%% the program's store, and a roster set is pushed twice.
%%%
%%% What breaks it: mod_roster started again while mod_roster_port runs
%%% (`ejabberdctl restart_module HOST mod_roster`, gen_mod:start_module/2):
%%% its stop/1 removes the IQ handler (ours), its start/2 adds its hooks and
%%% its IQ handler back. ejabberd 23.01 has no hook for "a module started",
%%% and gen_mod does not restart a module's dependents with it, so the guard
%%% finds out itself:
%%%   - mod_roster's start/2 calls its backend's init/2 first, and with
%%%     `db_type: port` that is mod_roster_port:init/2, which pokes the
%%%     guard (mod_roster_started/1). The guard then checks every FAST_MS
%%%     until it has taken mod_roster's IQ handler back (mod_roster's last
%%%     step), for at most FAST_FOR_MS: the hooks run twice for at most
%%%     FAST_MS after mod_roster's start returns.
%%%   - Whatever else changes the tables (another db_type, a module that
%%%     adds mod_roster's handlers itself), a check every CHECK_MS repairs
%%%     it: at most CHECK_MS of double hooks.
%%% Each repair is logged as a warning naming what was found.
%%%
%%% mod_shared_roster's roster_out_subscription handler (sequence 30) is
%%% taken over too while mod_shared_roster is loaded: it is replaced by
%%% roster_port_shared_roster's, which keeps only its membership decision
%%% (see there why). Invariant: mod_shared_roster loaded on Host -> ours at
%%% 30 and not theirs; not loaded -> not ours. mod_shared_roster may start
%%% after mod_roster_port, or be restarted: the same check every CHECK_MS
%%% repairs it (logged at info: that is no undoing by anyone). Checking is
%%% a few ETS lookups (ejabberd_hooks' `hooks` table and gen_iq_handler's
%%% `ejabberd_sm` table are readable by any process); repairing goes
%%% through ejabberd_hooks:add/delete, which are idempotent.
-module(roster_port_takeover).
-behaviour(gen_server).

-export([take_over/1, give_back/2, broken/1]).
-export([child_spec/1, start_link/1, mod_roster_started/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

-include("logger.hrl").
-include("xmpp.hrl").

%% mod_roster's handlers that we replace: {Hook, mod_roster's function, ours}.
-define(TAKEN_OVER,
        [{roster_get, get_user_roster_items, roster_get},
         {roster_in_subscription, in_subscription, in_subscription},
         {roster_out_subscription, out_subscription, out_subscription},
         {roster_get_jid_info, get_jid_info, get_jid_info},
         {remove_user, remove_user, remove_user},
         {c2s_self_presence, c2s_self_presence, c2s_self_presence},
         {c2s_post_auth_features, get_versioning_feature, post_auth_features}]).
%% Ours are in ?HOOKS, all at mod_roster's sequence. Handlers of one
%% sequence run sorted by module name, and mod_roster_port_hooks sorts where
%% mod_roster does: after mod_pubsub, whose roster_in_subscription handler
%% sits at 50 too and always answers true, so our answer is the one
%% ejabberd_sm sees; before mod_shared_roster, mod_stream_mgmt and
%% mod_vcard, as mod_roster's handlers run.
-define(HOOKS, mod_roster_port_hooks).
-define(SEQ, 50).
%% Late on user_send_packet so that modules which drop a packet run first.
-define(SEND_SEQ, 90).
-define(IQ_HANDLER, {roster_port_iq, process_iq}).

-define(CHECK_MS, 1000).
-define(FAST_MS, 5).
-define(FAST_FOR_MS, 5000).

%%%===================================================================
%%% The takeover
%%%===================================================================

-spec take_over(binary()) -> ok.
take_over(Host) ->
    lists:foreach(
      fun({Hook, Theirs, Ours}) ->
              ejabberd_hooks:delete(Hook, Host, mod_roster, Theirs, ?SEQ),
              ejabberd_hooks:add(Hook, Host, ?HOOKS, Ours, ?SEQ)
      end, ?TAKEN_OVER),
    ejabberd_hooks:add(user_send_packet, Host, ?HOOKS, user_send_packet, ?SEND_SEQ),
    {M, F} = ?IQ_HANDLER,
    gen_iq_handler:add_iq_handler(ejabberd_sm, Host, ?NS_ROSTER, M, F),
    take_over_shared_roster(Host).

-define(SHARED_HOOK, roster_out_subscription).
-define(SHARED_SEQ, 30).
-define(SHARED_THEIRS, {?SHARED_SEQ, mod_shared_roster, out_subscription}).
-define(SHARED_OURS, {?SHARED_SEQ, roster_port_shared_roster, out_subscription}).

take_over_shared_roster(Host) ->
    {_, TheirM, TheirF} = ?SHARED_THEIRS,
    {_, OurM, OurF} = ?SHARED_OURS,
    case gen_mod:is_loaded(Host, mod_shared_roster) of
        true ->
            ejabberd_hooks:delete(?SHARED_HOOK, Host, TheirM, TheirF, ?SHARED_SEQ),
            ejabberd_hooks:add(?SHARED_HOOK, Host, OurM, OurF, ?SHARED_SEQ);
        false ->
            ejabberd_hooks:delete(?SHARED_HOOK, Host, OurM, OurF, ?SHARED_SEQ)
    end,
    ok.

%% Whether mod_shared_roster's handler is as take_over_shared_roster/1 leaves it.
shared_roster_broken(Host) ->
    Ls = handlers(?SHARED_HOOK, Host),
    Ours = lists:member(?SHARED_OURS, Ls),
    case gen_mod:is_loaded(Host, mod_shared_roster) of
        true -> lists:member(?SHARED_THEIRS, Ls) orelse not Ours;
        false -> Ours
    end.

%% @doc mod_roster gets its hooks back when it is loaded. The IQ handler:
%% with KeepIQ, ours stays (mod_roster_port stopped alone: mod_roster's
%% own handler would answer every roster get with an empty roster, as its
%% storage, db_type: port, has no program behind it; ours answers
%% internal-server-error, type wait, as when the program is down, until
%% mod_roster_port starts again or mod_roster stops, which removes it).
-spec give_back(binary(), boolean()) -> ok.
give_back(Host, KeepIQ) ->
    ejabberd_hooks:delete(user_send_packet, Host, ?HOOKS, user_send_packet, ?SEND_SEQ),
    {_, OurM, OurF} = ?SHARED_OURS,
    ejabberd_hooks:delete(?SHARED_HOOK, Host, OurM, OurF, ?SHARED_SEQ),
    {_, TheirM, TheirF} = ?SHARED_THEIRS,
    gen_mod:is_loaded(Host, mod_shared_roster) andalso
        ejabberd_hooks:add(?SHARED_HOOK, Host, TheirM, TheirF, ?SHARED_SEQ),
    ModRosterLoaded = gen_mod:is_loaded(Host, mod_roster),
    lists:foreach(
      fun({Hook, Theirs, Ours}) ->
              ejabberd_hooks:delete(Hook, Host, ?HOOKS, Ours, ?SEQ),
              ModRosterLoaded andalso
                  ejabberd_hooks:add(Hook, Host, mod_roster, Theirs, ?SEQ)
      end, ?TAKEN_OVER),
    case {ModRosterLoaded, KeepIQ} of
        {true, true} ->
            ok;
        {true, false} ->
            gen_iq_handler:add_iq_handler(ejabberd_sm, Host, ?NS_ROSTER,
                                          mod_roster, process_iq);
        {false, _} ->
            gen_iq_handler:remove_iq_handler(ejabberd_sm, Host, ?NS_ROSTER)
    end.

%% @doc What is not as take_over/1 left it: hooks where mod_roster's handler
%% is back or ours is missing, and the IQ handler when it is not ours
%% ({iq_handler, Owner}, Owner the module that has it or none).
-spec broken(binary()) -> [{hook, atom()} | {iq_handler, module() | none}].
broken(Host) ->
    Hooks = [Hook || {Hook, Theirs, Ours} <- ?TAKEN_OVER,
                     begin
                         Ls = handlers(Hook, Host),
                         lists:member({?SEQ, mod_roster, Theirs}, Ls)
                             orelse not lists:member({?SEQ, ?HOOKS, Ours}, Ls)
                     end]
        ++ [user_send_packet
            || not lists:member({?SEND_SEQ, ?HOOKS, user_send_packet},
                                handlers(user_send_packet, Host))],
    {M, F} = ?IQ_HANDLER,
    IQ = case ets:lookup(ejabberd_sm, {Host, ?NS_ROSTER}) of
             [{_, M, F}] -> [];
             [{_, Owner, _}] -> [{iq_handler, Owner}];
             [] -> [{iq_handler, none}]
         end,
    [{hook, H} || H <- Hooks] ++ IQ.

handlers(Hook, Host) ->
    case ets:lookup(hooks, {Hook, Host}) of
        [{_, Ls}] -> Ls;
        [] -> []
    end.

%%%===================================================================
%%% The guard
%%%===================================================================

%% @doc The guard of Host, a child of ejabberd_gen_mod_sup.
-spec child_spec(binary()) -> supervisor:child_spec().
child_spec(Host) ->
    #{id => {?MODULE, Host},
      start => {?MODULE, start_link, [Host]},
      restart => transient,
      shutdown => 1000,
      type => worker}.

start_link(Host) ->
    gen_server:start_link({local, name(Host)}, ?MODULE, Host, []).

%% @doc mod_roster is starting on Host (its backend's init/2): it is about
%% to add its handlers. A no-op when no guard runs (ejabberd's boot:
%% mod_roster starts before mod_roster_port).
-spec mod_roster_started(binary()) -> ok.
mod_roster_started(Host) ->
    case whereis(name(Host)) of
        undefined -> ok;
        Pid -> gen_server:cast(Pid, mod_roster_started)
    end.

name(Host) ->
    list_to_atom("roster_port_takeover_" ++ binary_to_list(Host)).

%% State: #{host, fast_until}: fast_until is the monotonic time (ms) until
%% which the guard checks every FAST_MS, or undefined.
init(Host) ->
    erlang:send_after(?CHECK_MS, self(), check),
    {ok, #{host => Host, fast_until => undefined}}.

handle_call(_Request, _From, State) ->
    {reply, {error, badarg}, State}.

handle_cast(mod_roster_started, State) ->
    self() ! fast_check,
    {noreply, State#{fast_until => now_ms() + ?FAST_FOR_MS}}.

handle_info(check, State) ->
    erlang:send_after(?CHECK_MS, self(), check),
    _ = repair(State),
    repair_shared_roster(State),
    {noreply, State};
handle_info(fast_check, #{fast_until := Until} = State) when is_integer(Until) ->
    Repaired = repair(State),
    %% mod_roster's start adds its IQ handler last: once that is taken back,
    %% its start is over.
    case lists:member({iq_handler, mod_roster}, Repaired) orelse now_ms() > Until of
        true ->
            {noreply, State#{fast_until => undefined}};
        false ->
            erlang:send_after(?FAST_MS, self(), fast_check),
            {noreply, State}
    end;
handle_info(_Info, State) ->
    {noreply, State}.

%% What was repaired. ejabberd's tables and ejabberd_hooks are gone for a
%% moment while ejabberd stops: nothing to repair then.
repair(#{host := Host}) ->
    try
        case broken(Host) of
            [] ->
                [];
            What ->
                take_over(Host),
                ?WARNING_MSG("roster-port ~ts: the takeover of mod_roster was undone (~ts), "
                             "most likely by a restart of mod_roster; taken over again, so "
                             "that each roster hook and roster IQ reaches the program once",
                             [Host, describe(What)]),
                What
        end
    catch exit:_ -> [];
          error:badarg -> []
    end.

repair_shared_roster(#{host := Host}) ->
    try shared_roster_broken(Host) andalso
            begin
                take_over_shared_roster(Host),
                ?INFO_MSG("roster-port ~ts: mod_shared_roster's roster_out_subscription "
                          "handler ~ts", [Host, case gen_mod:is_loaded(Host, mod_shared_roster) of
                                                    true -> "taken over (membership decision only)";
                                                    false -> "given back (mod_shared_roster stopped)"
                                                end])
            end
    catch exit:_ -> false;
          error:badarg -> false
    end.

describe(What) ->
    lists:join(", ", [case W of
                          {hook, H} -> atom_to_list(H);
                          {iq_handler, none} -> "no jabber:iq:roster IQ handler";
                          {iq_handler, M} -> io_lib:format("jabber:iq:roster IQ handler ~ts", [M])
                      end || W <- What]).

now_ms() ->
    erlang:monotonic_time(millisecond).
