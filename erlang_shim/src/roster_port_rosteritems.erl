%%% @doc ejabberdctl process_rosteritems on the program's store: mod_roster
%%% hands the command to its backend (mod_roster_port:process_rosteritems/5),
%%% which hands it here. It reads and deletes through the backend's own
%%% callbacks only (store_get_roster, store_del_item), never by a request of
%%% its own (README, "Design notes").
-module(roster_port_rosteritems).

-export([process_rosteritems/5]).

-include("xmpp.hrl").
-include("mod_roster.hrl").

%% ejabberdctl process_rosteritems ACTION SUBS ASKS USERS CONTACTS, with the
%% Mnesia backend's syntax: ACTION list | delete; SUBS none|from|to|both
%% joined by ':' or any; ASKS none|out|in joined by ':' or any (a row with
%% both pending matches in and out); USERS and CONTACTS JIDs joined by ':'
%% or any, with the globs *, ?, [...] and a leading ! for "not". Returns the
%% matching {User, Contact} pairs; delete removes each with store_del_item
%% (the program pushes the removal to the user's sessions).
%% The program has no op that lists users, so the rows visited are those of
%% the accounts (ejabberd_auth:get_users/1) of every host mod_roster_port
%% runs on; rows of users without an account are not visited.
process_rosteritems(ActionS, SubsS, AsksS, UsersS, ContactsS) ->
    Action = case ActionS of
                 "list" -> list;
                 "delete" -> delete
             end,
    Subs = filter_atoms(SubsS, [none, from, to, both]),
    Asks = filter_atoms(AsksS, [none, out, in, both]),
    Users = filter_jids(UsersS),
    Contacts = filter_jids(ContactsS),
    Hosts = [H || H <- ejabberd_option:hosts(), gen_mod:is_loaded(H, mod_roster_port)],
    lists:append(
      [process_user_rosteritems(Action, Subs, Asks, Contacts, LUser, LServer)
       || Host <- Hosts,
          {LUser, LServer} <- lists:sort(ejabberd_auth:get_users(Host)),
          jid_matches({LUser, LServer}, Users)]).

process_user_rosteritems(Action, Subs, Asks, Contacts, LUser, LServer) ->
    User = <<LUser/binary, "@", LServer/binary>>,
    Items = case mod_roster_port:get_roster(LUser, LServer) of
                {ok, Rs} -> Rs;
                error -> throw({error, "roster of " ++ binary_to_list(User) ++
                                    " not readable (program unavailable)"})
            end,
    [begin
         Action == delete andalso mod_roster_port:del_roster(LUser, LServer, LJID),
         {User, jid:encode(LJID)}
     end
     || #roster{jid = {CUser, CServer, _} = LJID, subscription = Sub, ask = Ask} <- Items,
        lists:member(Sub, Subs),
        lists:member(Ask, Asks) orelse
            (Ask == both andalso (lists:member(in, Asks) orelse lists:member(out, Asks))),
        jid_matches({CUser, CServer}, Contacts)].

filter_atoms(S, All) ->
    lists:usort(lists:flatmap(fun("any") -> All;
                                 (A) -> [list_to_existing_atom(A)]
                              end, string:tokens(S, ":"))).

filter_jids(S) ->
    lists:flatmap(fun("any") -> ["*", "*@*"];
                     (J) -> [J]
                  end, string:tokens(S, ":")).

%% Mnesia backend's matching: "host" matches a JID without user part,
%% "user@host" globs both parts.
jid_matches({Name, Server}, Patterns) ->
    lists:any(
      fun(Pattern) ->
              case jid:decode(list_to_binary(Pattern)) of
                  #jid{luser = <<>>, lserver = MServer} ->
                      Name == <<>> andalso glob_match(Server, MServer);
                  #jid{luser = MName, lserver = MServer} ->
                      glob_match(Server, MServer) andalso glob_match(Name, MName)
              end
      end, Patterns).

glob_match(String, <<"!", Glob/binary>>) ->
    not glob_match(String, Glob);
glob_match(String, Glob) ->
    ejabberd_regexp:run(String, ejabberd_regexp:sh_to_awk(Glob)) == match.
