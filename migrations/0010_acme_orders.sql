-- Leases on ACME orders: only one certificate manager replica orders a given domain at a time. A lease that
-- outlives its holder (a crashed replica) expires and another takes over.
CREATE TABLE acme_orders (
    domain      text PRIMARY KEY,
    holder      text NOT NULL,
    expires_at  timestamptz NOT NULL
);
