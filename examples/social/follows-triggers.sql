-- Live pushes for follows.sql, as triggers.sql gives them for friendships: load triggers.sql
-- first (this file uses its social_jid_of(); its friendship triggers do no harm), after
-- roster-port's change log (roster_port_log_change(); docs/changes.md).
--
--   psql -d social -f triggers.sql -f follows-triggers.sql
--
-- A follows row changes two rosters: the follower's item for the followee and the followee's
-- item for the follower. Both are logged, with the subscription each had and has there (NULL:
-- not an item), computed from this row and the row of the other direction.

-- The subscription of an item from the state of the user's row out (user follows contact) and
-- of the row in (contact follows user); NULL when it is no roster item (no row out, and no
-- accepted row in: a request to answer is not an item).
CREATE FUNCTION follows_item_subscription(out_state text, in_state text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN out_state IS NULL AND in_state IS DISTINCT FROM 'accepted' THEN NULL
        WHEN out_state = 'accepted' AND in_state = 'accepted' THEN 'both'
        WHEN out_state = 'accepted' THEN 'to'
        WHEN in_state = 'accepted' THEN 'from'
        ELSE 'none' END
$$;

CREATE FUNCTION follows_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    follower bigint := CASE WHEN TG_OP = 'DELETE' THEN OLD.follower_id ELSE NEW.follower_id END;
    followee bigint := CASE WHEN TG_OP = 'DELETE' THEN OLD.followee_id ELSE NEW.followee_id END;
    old_state text := CASE WHEN TG_OP = 'INSERT' THEN NULL ELSE OLD.state END;
    new_state text := CASE WHEN TG_OP = 'DELETE' THEN NULL ELSE NEW.state END;
    other_way text;  -- the followee's row towards the follower, unchanged by this statement
BEGIN
    IF old_state IS NOT DISTINCT FROM new_state THEN
        RETURN NULL;  -- only the message changed
    END IF;
    SELECT state INTO other_way FROM follows
    WHERE follower_id = followee AND followee_id = follower;
    PERFORM roster_port_log_change(social_jid_of(follower), social_jid_of(followee),
                                   follows_item_subscription(old_state, other_way),
                                   follows_item_subscription(new_state, other_way));
    PERFORM roster_port_log_change(social_jid_of(followee), social_jid_of(follower),
                                   follows_item_subscription(other_way, old_state),
                                   follows_item_subscription(other_way, new_state));
    RETURN NULL;
END
$$;

CREATE TRIGGER follows_changed
AFTER INSERT OR UPDATE OR DELETE ON follows
FOR EACH ROW EXECUTE FUNCTION follows_changed();

-- A tag is a group of the owner's item for that friend, when there is an item (as for
-- friendships in triggers.sql, whose own tag trigger finds no friendship here and logs nothing).
CREATE FUNCTION follows_tag_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    owner bigint := CASE WHEN TG_OP = 'DELETE' THEN OLD.owner_id ELSE NEW.owner_id END;
    friend bigint := CASE WHEN TG_OP = 'DELETE' THEN OLD.friend_id ELSE NEW.friend_id END;
    subscription text;
BEGIN
    subscription := follows_item_subscription(
        (SELECT state FROM follows WHERE follower_id = owner AND followee_id = friend),
        (SELECT state FROM follows WHERE follower_id = friend AND followee_id = owner));
    IF subscription IS NOT NULL THEN
        PERFORM roster_port_log_change(social_jid_of(owner), social_jid_of(friend),
                                       subscription, subscription);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER follows_tag_changed
AFTER INSERT OR UPDATE OR DELETE ON tags
FOR EACH ROW EXECUTE FUNCTION follows_tag_changed();
