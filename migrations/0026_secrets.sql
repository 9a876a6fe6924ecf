-- Secrets (issue 21): environment variables whose values are sealed with the platform secret key, never shown
-- again. A tenant's secret applies to all its instances; a service's to that service's instances, before the
-- tenant's of the same name. Node agents open them when they start an instance.
CREATE TABLE secrets (
    id            uuid PRIMARY KEY,
    tenant_id     uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    service_id    uuid REFERENCES services (id) ON DELETE CASCADE,
    name          text NOT NULL CHECK (name ~ '^[A-Za-z_][A-Za-z0-9_]{0,254}$'),
    value_sealed  bytea NOT NULL,
    version       integer NOT NULL DEFAULT 1 CHECK (version > 0),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE NULLS NOT DISTINCT (tenant_id, service_id, name)
);
CREATE INDEX secrets_tenant ON secrets (tenant_id, created_at, id);
