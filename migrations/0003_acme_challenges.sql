-- ACME dns-01 challenge records: TXT values the certificate manager publishes under `_acme-challenge.<domain>`
-- and the DNS role serves from its snapshot. Several values per name are allowed (a wildcard and its base domain
-- are validated under the same name), so the pair is the key.
CREATE TABLE acme_challenges (
    name        text NOT NULL CHECK (name = lower(name) AND name !~ '\.$' AND length(name) BETWEEN 1 AND 253),
    value       text NOT NULL CHECK (length(value) BETWEEN 1 AND 255),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, value)
);
