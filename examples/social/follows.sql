-- A second way the same site may keep relationships: directed follows, as on a microblog.
-- `follows` replaces `friendships` (the users and tags tables of schema.sql stay): one row per
-- follower and followee, so each row is read into two rosters, as the follower's `to` (or the
-- follower's request out) and as the followee's `from` (or a request to answer). Served by
-- follows-mapping.toml, with [roster] mutual_rows = true (README.md, "Follows").
--
--   psql -d social -f schema.sql -f follows.sql
--   (live pushes: roster-port's change log, then triggers.sql, then follows-triggers.sql)

CREATE TABLE follows (
    follower_id bigint NOT NULL REFERENCES users ON DELETE CASCADE,
    followee_id bigint NOT NULL REFERENCES users ON DELETE CASCADE,
    -- requested: the follower asked, the followee has not answered; accepted: following.
    state text NOT NULL CHECK (state IN ('requested', 'accepted')),
    message text NOT NULL DEFAULT '',      -- what the follower wrote with the request
    PRIMARY KEY (follower_id, followee_id),
    CHECK (follower_id <> followee_id)
);
CREATE INDEX follows_followee ON follows (followee_id);
