-- Custom-domain claims hold nothing until proven. Several tenants may claim one name, each with its own token; the
-- first to prove ownership gets it, and the database decides the race: a name is verified at most once
-- platform-wide (platform subdomains are verified at creation, so they stay unique too). A tenant claims a name
-- once. DNS, edge routes and certificates follow verified rows only, so they only ever serve the prover.
ALTER TABLE domains DROP CONSTRAINT domains_name_key;
CREATE UNIQUE INDEX domains_verified_name ON domains (name) WHERE verified_at IS NOT NULL;
CREATE UNIQUE INDEX domains_tenant_name ON domains (tenant_id, name);
CREATE INDEX domains_name ON domains (name);

-- An unverified claim lapses at expires_at. checked_at is the verifier's last look: it takes the least recently
-- checked claims first (a new claim counts as checked when it was made), so each pass moves down one queue.
ALTER TABLE domains ADD COLUMN expires_at timestamptz;
ALTER TABLE domains ADD COLUMN checked_at timestamptz;
-- Claims made before claims expired get a week from this upgrade.
UPDATE domains SET expires_at = now() + interval '7 days' WHERE verified_at IS NULL;
ALTER TABLE domains ADD CONSTRAINT domains_claim_expires CHECK (verified_at IS NOT NULL OR expires_at IS NOT NULL);
CREATE INDEX domains_unverified ON domains ((coalesce(checked_at, created_at)), id) WHERE verified_at IS NULL;

ALTER TABLE tenants ADD COLUMN max_domains integer NOT NULL DEFAULT 100 CHECK (max_domains >= 0);
