-- Private IPs of deleted instances, held for a while before reuse (Settings::ip_hold): an edge or a DNS cache
-- that has not caught up yet, or a node still tearing the old sandbox down, must never meet a new instance there.
CREATE TABLE released_private_ips (
    tenant_id    uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    ip           inet NOT NULL,
    released_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, ip)
);
