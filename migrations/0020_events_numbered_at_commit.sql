-- Events get their version when their transaction commits, not when they are recorded. Before, the first
-- record_event of a transaction took the event lock and held it until commit: a transaction that recorded an event
-- and then waited for a row (an API creating an instance whose name another transaction was updating) deadlocked
-- with one holding that row and waiting for the lock (a node agent scheduling instances), and PostgreSQL aborted one
-- of them (a 500 for the client). Now an event is stored with a negative placeholder, and a deferred trigger numbers
-- it at commit, under the same lock, after every other statement of the transaction: a transaction holding the lock
-- waits for nothing else, and versions still become visible in order (the lock is released after the commit).
CREATE SEQUENCE events_pending_seq;

CREATE OR REPLACE FUNCTION record_event(p_tenant uuid, p_type text, p_id uuid, p_action text, p_payload jsonb)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v bigint;
BEGIN
    INSERT INTO events (version, tenant_id, resource_type, resource_id, action, payload)
    VALUES (-nextval('events_pending_seq'), p_tenant, p_type, p_id, p_action, p_payload)
    RETURNING version INTO v;
    RETURN v;
END;
$$;

CREATE FUNCTION number_event() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v bigint;
BEGIN
    -- Held until commit: serialises numbering so versions commit in order.
    PERFORM pg_advisory_xact_lock(7265746);
    UPDATE events SET version = nextval('events_version_seq') WHERE version = NEW.version RETURNING version INTO v;
    PERFORM pg_notify('cloud_changes', v::text);
    RETURN NULL;
END;
$$;

CREATE CONSTRAINT TRIGGER events_numbered_at_commit AFTER INSERT ON events
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION number_event();
