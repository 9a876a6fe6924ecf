-- Followers of an instance's log (GET /v1/instances/{id}/logs?follow=true) are woken by notifications instead of
-- polling: each API process LISTENs once on cloud_instance_logs and reads the new lines once per notification,
-- whatever the number of its followers (see LogFeed in store/src/log_feed.rs). Triggers rather than the writers
-- announce them, so no path can forget: node agents appending lines, and an instance going by any path (its own
-- deletion, its tenant's, a cascade). Payloads: '<instance id> <first seq> <last seq>' for appended lines,
-- '<instance id> deleted' when the instance goes. NOTIFY is delivered at commit, in commit order.
CREATE FUNCTION notify_instance_logs_appended() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('cloud_instance_logs', instance_id::text || ' ' || min(seq) || ' ' || max(seq))
    FROM appended GROUP BY instance_id;
    RETURN NULL;
END;
$$;

CREATE TRIGGER instance_logs_appended AFTER INSERT ON instance_logs
    REFERENCING NEW TABLE AS appended
    FOR EACH STATEMENT EXECUTE FUNCTION notify_instance_logs_appended();

CREATE FUNCTION notify_instance_logs_ended() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('cloud_instance_logs', OLD.id::text || ' deleted');
    RETURN NULL;
END;
$$;

CREATE TRIGGER instance_logs_ended AFTER DELETE ON instances
    FOR EACH ROW EXECUTE FUNCTION notify_instance_logs_ended();
