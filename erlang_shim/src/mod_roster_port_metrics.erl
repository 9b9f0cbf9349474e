%%% @doc roster-port's metrics in ejabberd: an HTTP request handler that
%%% serves them in the Prometheus text format, and two ejabberdctl commands.
%%%
%%%   listen:
%%%     - port: 5281
%%%       ip: "127.0.0.1"
%%%       module: ejabberd_http
%%%       request_handlers:
%%%         "/roster-port/metrics": mod_roster_port_metrics
%%%
%%%   ejabberdctl roster_port_metrics   the same text
%%%   ejabberdctl roster_port_status    the same figures, for a person
%%%
%%% Every host where mod_roster_port runs is in the answer, labelled `host`.
%%% The figures are roster_port_metrics' (see there, and erlang_shim/README.md,
%%% "Metrics"). The handler has no access control of its own: listen on
%%% loopback (or behind a proxy that has), as the figures say how busy each
%%% host is. This module is not a gen_mod: the listener needs no module in
%%% `modules`, and mod_roster_port registers the commands (register/1,
%%% unregister/1) at its start and stop.
-module(mod_roster_port_metrics).

-export([process/2]).
-export([register/1, unregister/1, metrics_text/0, status_text/0]).

-include("logger.hrl").
-include("ejabberd_http.hrl").
-include("ejabberd_commands.hrl").

-define(CONTENT_TYPE, <<"text/plain; version=0.0.4; charset=utf-8">>).

%%%===================================================================
%%% HTTP (ejabberd_http request handler)
%%%===================================================================

process([], #request{method = Method}) when Method == 'GET'; Method == 'HEAD' ->
    {200, [{<<"Content-Type">>, ?CONTENT_TYPE}], iolist_to_binary(render())};
process([], _Request) ->
    {405, [{<<"Allow">>, <<"GET, HEAD">>}], <<"only GET and HEAD\n">>};
process(_LocalPath, _Request) ->
    {404, [], <<"not found\n">>}.

render() ->
    roster_port_metrics:render(roster_port_metrics:collect(hosts())).

%% The hosts where mod_roster_port runs.
hosts() ->
    [Host || Host <- ejabberd_option:hosts(), gen_mod:is_loaded(Host, mod_roster_port)].

%%%===================================================================
%%% ejabberdctl
%%%===================================================================

%% @doc The commands, from mod_roster_port:start/2 (once per host: writing
%% them again is harmless).
-spec register(binary()) -> ok.
register(_Host) ->
    ejabberd_commands:register_commands(?MODULE, commands()).

%% @doc From mod_roster_port:stop/1: the commands go with the last host.
-spec unregister(binary()) -> ok.
unregister(Host) ->
    case gen_mod:is_loaded_elsewhere(Host, mod_roster_port) of
        true ->
            ok;
        false ->
            %% Written with this module as their definer: deleted as such.
            ejabberd_commands:unregister_commands(
              [C#ejabberd_commands{definer = ?MODULE} || C <- commands()]),
            ok
    end.

commands() ->
    [#ejabberd_commands{name = roster_port_metrics, tags = [roster],
                        desc = "roster-port's metrics in the Prometheus text format",
                        longdesc = "The text the HTTP handler mod_roster_port_metrics serves: "
                                   "requests, errors, latency, programs, cache and journal of "
                                   "every host where mod_roster_port runs.",
                        module = ?MODULE, function = metrics_text,
                        args = [], result = {text, string},
                        result_example = "# HELP roster_port_requests_total ..."},
     #ejabberd_commands{name = roster_port_status, tags = [roster],
                        desc = "roster-port's figures for a person",
                        longdesc = "The figures of roster_port_metrics, per host: each "
                                   "program's state, requests by op, errors, cache, journal.",
                        module = ?MODULE, function = status_text,
                        args = [], result = {text, string},
                        result_example = "host localhost ..."}].

-spec metrics_text() -> string().
metrics_text() ->
    case hosts() of
        %% A comment: still the text format, and never an empty string (which
        %% ejabberd_ctl would print as `[]`).
        [] -> "# mod_roster_port runs on no host\n";
        _ -> unicode:characters_to_list(iolist_to_binary(render()))
    end.

-spec status_text() -> string().
status_text() ->
    case hosts() of
        [] ->
            "mod_roster_port runs on no host\n";
        Hosts ->
            unicode:characters_to_list(
              iolist_to_binary(roster_port_metrics:status_text(roster_port_metrics:collect(Hosts))))
    end.
