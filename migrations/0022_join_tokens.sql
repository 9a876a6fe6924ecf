-- One-time join tokens (issue 20): `cloudctl token create --join` hands a teammate a secret that
-- `cloudctl remote add NAME TOKEN` exchanges once for an API token. Only the secret's SHA-256 is kept. A deleted
-- tenant's join tokens stay without their tenant (its name kept), so that using one says why it cannot work.
CREATE TABLE join_tokens (
    id            uuid PRIMARY KEY,
    tenant_id     uuid REFERENCES tenants (id) ON DELETE SET NULL,
    tenant_name   text NOT NULL,
    secret_hash   bytea NOT NULL UNIQUE CHECK (octet_length(secret_hash) = 32),
    scopes        text[] NOT NULL
        CHECK (scopes <@ ARRAY['read', 'write', 'admin']::text[] AND cardinality(scopes) > 0),
    token_lifetime_seconds bigint NOT NULL CHECK (token_lifetime_seconds > 0),
    description   text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    -- The exchange: when, and the token it made (a token deleted with its tenant leaves the id dangling).
    used_at       timestamptz,
    token_id      uuid,
    revoked_at    timestamptz,
    CHECK ((used_at IS NULL) = (token_id IS NULL)),
    CHECK (used_at IS NULL OR revoked_at IS NULL)
);
CREATE INDEX join_tokens_tenant ON join_tokens (tenant_id, created_at, id);
