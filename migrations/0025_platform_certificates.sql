-- Certificates the platform's own servers get from the ACME CA (issue 20: `api.tls = "acme"`). The server that
-- needs one records the names it wants; the certificate manager orders it (dns-01, answered by our DNS) and
-- stores it, the key sealed with the platform secret key; the server follows the row. Keyed by purpose ('api').
CREATE TABLE platform_certificates (
    name             text PRIMARY KEY,
    names            text[] NOT NULL CHECK (cardinality(names) > 0),
    -- What was issued, for `issued_names` (the wanted names may have changed since).
    issued_names     text[],
    chain_pem        text,
    key_sealed       bytea,
    not_after        timestamptz,
    last_error       text,
    last_attempt_at  timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CHECK ((chain_pem IS NULL) = (key_sealed IS NULL) AND (chain_pem IS NULL) = (not_after IS NULL))
);
