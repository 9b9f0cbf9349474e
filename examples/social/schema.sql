-- A small social application's own tables: roster-port serves XMPP rosters straight from them
-- (mapping.toml), with no copy. Nothing here knows of XMPP: the application came first.
--
--   psql -d social -f schema.sql

CREATE TABLE users (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    username text NOT NULL UNIQUE,         -- also the XMPP localpart, on social.example
    display_name text NOT NULL
);

-- One row per pair of people, whoever asked first. The application's own words:
--   requested  requester asked addressee to be friends, no answer yet
--   accepted   they are friends
--   declined   addressee said no (or one of them ended the friendship)
--   blocked    one of them blocked the other: the relationship is invisible
CREATE TABLE friendships (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    requester_id bigint NOT NULL REFERENCES users ON DELETE CASCADE,
    addressee_id bigint NOT NULL REFERENCES users ON DELETE CASCADE,
    status text NOT NULL CHECK (status IN ('requested', 'accepted', 'declined', 'blocked')),
    message text NOT NULL DEFAULT '',      -- what the requester wrote with the request
    updated_at timestamptz NOT NULL DEFAULT now(),
    CHECK (requester_id <> addressee_id)
);
CREATE UNIQUE INDEX friendships_one_per_pair
    ON friendships (least(requester_id, addressee_id), greatest(requester_id, addressee_id));
CREATE INDEX friendships_addressee ON friendships (addressee_id);

-- Each user's own labels on their friends: XMPP roster groups.
CREATE TABLE tags (
    owner_id bigint NOT NULL REFERENCES users ON DELETE CASCADE,
    friend_id bigint NOT NULL REFERENCES users ON DELETE CASCADE,
    tag text NOT NULL CHECK (tag <> ''),
    PRIMARY KEY (owner_id, friend_id, tag)
);
