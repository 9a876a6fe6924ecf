-- `cloudctl instance exec` (issue 20): the API authorizes a command in an instance and records it here; the node
-- that runs the instance accepts the API's connection for it once, by the session's id and the hash of a secret
-- only the API knew, so a node's exec port is useless to anyone else. Each node says where that port is.
ALTER TABLE nodes ADD COLUMN exec_address text;

CREATE TABLE exec_sessions (
    id           uuid PRIMARY KEY,
    tenant_id    uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    instance_id  uuid NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    node_id      uuid NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
    token_id     uuid NOT NULL,
    secret_hash  bytea NOT NULL CHECK (octet_length(secret_hash) = 32),
    command      text[] NOT NULL CHECK (cardinality(command) > 0),
    tty          boolean NOT NULL,
    cols         integer NOT NULL CHECK (cols BETWEEN 1 AND 65535),
    rows         integer NOT NULL CHECK (rows BETWEEN 1 AND 65535),
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    claimed_at   timestamptz
);
CREATE INDEX exec_sessions_created ON exec_sessions (created_at);
