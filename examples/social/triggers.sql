-- Live pushes for changes the application makes itself (a friend request accepted on the web
-- site, a tag added in the mobile app): each change calls roster_port_log_change(), which
-- records it and NOTIFYs roster-port, whose change feed pushes it to the users' XMPP clients.
--
-- DEPENDENCY: roster_port_log_change(p_username text, p_contact text,
--     p_old_subscription text, p_new_subscription text) is roster-port's function (its change
-- log, docs/changes.md); these triggers do not create it. Install it in this database first:
--   roster-port install-change-log --config roster-port.toml [--print-sql]
-- (the writers' grants: docs/changes.md, "Grants"). Arguments: the user's bare JID, the
-- contact's bare JID, and the subscription ('none', 'to', 'from', 'both') the contact had and
-- has in the user's roster, NULL for "not in the roster".
--
--   psql -d social -f triggers.sql

-- What a friendship status is in each roster: accepted = both; requested = none (an item
-- asking for the requester, a pending request for the addressee); declined, blocked = nothing.
CREATE FUNCTION social_subscription_of(status text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE status WHEN 'accepted' THEN 'both' WHEN 'requested' THEN 'none' END
$$;

CREATE FUNCTION social_jid_of(user_id bigint) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT username || '@social.example' FROM users WHERE id = user_id
$$;

CREATE FUNCTION social_friendship_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    old_subscription text;
    new_subscription text;
    one bigint;
    other bigint;
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        old_subscription := social_subscription_of(OLD.status);
        one := OLD.requester_id;
        other := OLD.addressee_id;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        new_subscription := social_subscription_of(NEW.status);
        one := NEW.requester_id;
        other := NEW.addressee_id;
    END IF;
    IF old_subscription IS DISTINCT FROM new_subscription
       OR (TG_OP = 'UPDATE' AND (OLD.status, OLD.requester_id) IS DISTINCT FROM
                                (NEW.status, NEW.requester_id)) THEN
        PERFORM roster_port_log_change(social_jid_of(one), social_jid_of(other),
                                       old_subscription, new_subscription);
        PERFORM roster_port_log_change(social_jid_of(other), social_jid_of(one),
                                       old_subscription, new_subscription);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER social_friendship_changed
AFTER INSERT OR UPDATE OR DELETE ON friendships
FOR EACH ROW EXECUTE FUNCTION social_friendship_changed();

-- A tag is a group of the owner's roster item for that friend: the item changed, the
-- subscription did not.
CREATE FUNCTION social_tag_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    owner bigint := CASE WHEN TG_OP = 'DELETE' THEN OLD.owner_id ELSE NEW.owner_id END;
    friend bigint := CASE WHEN TG_OP = 'DELETE' THEN OLD.friend_id ELSE NEW.friend_id END;
    subscription text;
BEGIN
    SELECT social_subscription_of(f.status) INTO subscription FROM friendships f
    WHERE (f.requester_id, f.addressee_id) IN ((owner, friend), (friend, owner));
    IF subscription IS NOT NULL THEN
        PERFORM roster_port_log_change(social_jid_of(owner), social_jid_of(friend),
                                       subscription, subscription);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER social_tag_changed
AFTER INSERT OR UPDATE OR DELETE ON tags
FOR EACH ROW EXECUTE FUNCTION social_tag_changed();

-- A new display name is the item's name in every friend's roster.
CREATE FUNCTION social_display_name_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    friendship record;
BEGIN
    FOR friendship IN
        SELECT CASE WHEN f.requester_id = NEW.id THEN f.addressee_id ELSE f.requester_id END
                   AS friend_id,
               social_subscription_of(f.status) AS subscription
        FROM friendships f
        WHERE NEW.id IN (f.requester_id, f.addressee_id) AND f.status IN ('requested', 'accepted')
    LOOP
        PERFORM roster_port_log_change(social_jid_of(friendship.friend_id),
                                       NEW.username || '@social.example',
                                       friendship.subscription, friendship.subscription);
    END LOOP;
    RETURN NULL;
END
$$;

CREATE TRIGGER social_display_name_changed
AFTER UPDATE OF display_name ON users
FOR EACH ROW WHEN (OLD.display_name IS DISTINCT FROM NEW.display_name)
EXECUTE FUNCTION social_display_name_changed();
