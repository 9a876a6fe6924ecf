-- ACME http-01 answers the certificate manager publishes and every edge serves at
-- http://<domain>/.well-known/acme-challenge/<token> while an order is being validated.
CREATE TABLE acme_http_tokens (
    token              text PRIMARY KEY CHECK (token ~ '^[A-Za-z0-9_-]+$' AND length(token) <= 256),
    domain             text NOT NULL CHECK (domain = lower(domain) AND domain !~ '\.$'),
    key_authorization  text NOT NULL CHECK (length(key_authorization) BETWEEN 1 AND 512),
    created_at         timestamptz NOT NULL DEFAULT now()
);
