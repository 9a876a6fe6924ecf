-- Certificates the edge serves for custom domains, uploaded by tenants or obtained by ACME. Keys are sealed with
-- the platform secret key, never stored in clear. At most one valid certificate per domain: a new one replaces
-- the old in the same transaction, so the domain is never without one.
ALTER TABLE certificates ADD COLUMN source text NOT NULL DEFAULT 'upload' CHECK (source IN ('upload', 'acme'));
ALTER TABLE certificates ADD COLUMN names text[] NOT NULL DEFAULT '{}';
CREATE UNIQUE INDEX certificates_one_valid ON certificates (domain) WHERE state = 'valid';
CREATE INDEX certificates_tenant ON certificates (tenant_id, created_at, id);
