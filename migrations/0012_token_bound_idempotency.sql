-- Idempotency records belong to the token that made the request, not only to its tenant: a response is replayed
-- only to the same token, authenticated again (revocation and expiry included), so another token of the tenant
-- (a read-only one) never gets it. The stored body is sealed with the platform secret key by the API: responses
-- such as a created token's JWT are not in clear in the database.
--
-- A new table rather than a new key on `idempotency_keys`, so the previous release keeps working during a
-- rolling upgrade; its records cannot be attributed to a token and are not read any more (and may hold JWTs in
-- clear), so they are dropped now and the table goes one release later.
CREATE TABLE idempotency_requests (
    token_id      uuid NOT NULL REFERENCES tokens (id) ON DELETE CASCADE,
    key           text NOT NULL,
    request_hash  text NOT NULL,
    status        integer,
    content_type  text,
    body_sealed   bytea,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (token_id, key)
);
DELETE FROM idempotency_keys;

-- A token's tenant, scopes and expiry never change once issued (only its revocation does): every request reads
-- them from this record, and an idempotent replay to the same token relies on the same authorization as the
-- first response.
CREATE FUNCTION tokens_keep_their_grant() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.id IS DISTINCT FROM OLD.id OR NEW.tenant_id IS DISTINCT FROM OLD.tenant_id
        OR NEW.scopes IS DISTINCT FROM OLD.scopes OR NEW.expires_at IS DISTINCT FROM OLD.expires_at THEN
        RAISE EXCEPTION 'a token''s id, tenant, scopes and expiry cannot change; issue a new token'
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER tokens_keep_their_grant BEFORE UPDATE ON tokens FOR EACH ROW EXECUTE FUNCTION tokens_keep_their_grant();
