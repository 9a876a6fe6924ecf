-- The platform's whole state. Constraints carry the invariants, so concurrent API replicas cannot break them:
-- names unique per tenant, FQDNs and domains unique globally, tenant networks disjoint, private IPs unique per
-- network, raw TCP public ports unique, references enforced.

CREATE EXTENSION IF NOT EXISTS btree_gist;

-- Platform-wide secrets (the JWT signing key), created once by the first process that needs them.
CREATE TABLE platform_secrets (
    name        text PRIMARY KEY,
    value       bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tenants (
    id                 uuid PRIMARY KEY,
    name               text NOT NULL UNIQUE CHECK (name ~ '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$'),
    network            cidr NOT NULL,
    max_services       integer NOT NULL CHECK (max_services >= 0),
    max_instances      integer NOT NULL CHECK (max_instances >= 0),
    max_memory_mb      bigint  NOT NULL CHECK (max_memory_mb >= 0),
    max_images         integer NOT NULL CHECK (max_images >= 0),
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    -- Each tenant owns a disjoint subnet: private IPs are then unique platform-wide and name their tenant.
    CONSTRAINT tenants_network_disjoint EXCLUDE USING gist (network inet_ops WITH &&)
);

CREATE TABLE tokens (
    id           uuid PRIMARY KEY,
    tenant_id    uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    description  text NOT NULL DEFAULT '',
    scopes       text[] NOT NULL CHECK (scopes <@ ARRAY['read', 'write', 'admin']::text[]),
    expires_at   timestamptz NOT NULL,
    revoked_at   timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tokens_tenant ON tokens (tenant_id, created_at, id);

CREATE TABLE services (
    id           uuid PRIMARY KEY,
    tenant_id    uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name         text NOT NULL CHECK (name ~ '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$'),
    fqdn         text NOT NULL UNIQUE,
    soft_limit   integer CHECK (soft_limit > 0),
    hard_limit   integer CHECK (hard_limit > 0),
    persistent   boolean NOT NULL DEFAULT true,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name),
    UNIQUE (tenant_id, id),
    CHECK (soft_limit IS NULL OR hard_limit IS NULL OR soft_limit <= hard_limit)
);
CREATE INDEX services_page ON services (tenant_id, created_at, id);

CREATE TABLE service_ports (
    service_id        uuid NOT NULL REFERENCES services (id) ON DELETE CASCADE,
    port              integer NOT NULL CHECK (port BETWEEN 1 AND 65535),
    destination_port  integer NOT NULL CHECK (destination_port BETWEEN 1 AND 65535),
    handlers          text[] NOT NULL CHECK (handlers <@ ARRAY['tls', 'http', 'redirect', 'tcp']::text[]),
    proxy             boolean NOT NULL DEFAULT false,
    tcp               boolean GENERATED ALWAYS AS ('tcp' = ANY (handlers)) STORED,
    PRIMARY KEY (service_id, port)
);
-- A raw TCP port cannot be routed by name: it belongs to one service on the whole platform.
CREATE UNIQUE INDEX service_ports_tcp_unique ON service_ports (port) WHERE tcp;

CREATE TABLE domains (
    id                  uuid PRIMARY KEY,
    tenant_id           uuid NOT NULL,
    service_id          uuid NOT NULL,
    name                text NOT NULL UNIQUE,
    -- Platform subdomains are verified at creation; custom domains once their TXT token is seen.
    custom              boolean NOT NULL,
    verification_token  text NOT NULL,
    verified_at         timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (tenant_id, service_id) REFERENCES services (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX domains_service ON domains (service_id);

CREATE TABLE image_blobs (
    digest  text PRIMARY KEY CHECK (digest ~ '^sha256:[0-9a-f]{64}$'),
    data    bytea NOT NULL
);

CREATE TABLE images (
    id          uuid PRIMARY KEY,
    -- NULL for the platform's built-in images, visible to every tenant.
    tenant_id   uuid REFERENCES tenants (id) ON DELETE CASCADE,
    name        text NOT NULL CHECK (name ~ '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$'),
    digest      text NOT NULL REFERENCES image_blobs (digest),
    size_bytes  bigint NOT NULL CHECK (size_bytes >= 0),
    command     text[] NOT NULL CHECK (cardinality(command) > 0),
    port        integer NOT NULL CHECK (port BETWEEN 1 AND 65535),
    builtin     boolean GENERATED ALWAYS AS (tenant_id IS NULL) STORED,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX images_tenant_name ON images (tenant_id, name) WHERE tenant_id IS NOT NULL;
CREATE UNIQUE INDEX images_builtin_name ON images (name) WHERE tenant_id IS NULL;
CREATE INDEX images_page ON images (tenant_id, created_at, id);

CREATE TABLE nodes (
    id               uuid PRIMARY KEY,
    name             text NOT NULL UNIQUE,
    address          text NOT NULL,
    memory_mb        bigint NOT NULL CHECK (memory_mb >= 0),
    heartbeat_at     timestamptz NOT NULL DEFAULT now(),
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE instances (
    id              uuid PRIMARY KEY,
    tenant_id       uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    service_id      uuid,
    image_id        uuid NOT NULL REFERENCES images (id) ON DELETE RESTRICT,
    -- The bundle the instance was created with; pushing a new version of the image does not change it.
    image_digest    text NOT NULL REFERENCES image_blobs (digest),
    name            text NOT NULL CHECK (name ~ '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$'),
    args            text[] NOT NULL DEFAULT '{}',
    env             jsonb NOT NULL DEFAULT '{}',
    memory_mb       integer NOT NULL CHECK (memory_mb > 0),
    restart_policy  text NOT NULL CHECK (restart_policy IN ('never', 'always', 'on-failure')),
    desired_state   text NOT NULL CHECK (desired_state IN ('running', 'stopped')),
    state           text NOT NULL CHECK (state IN ('pending', 'starting', 'running', 'stopping', 'stopped', 'failed', 'deleted')),
    state_reason    text,
    private_ip      inet NOT NULL,
    node_id         uuid REFERENCES nodes (id) ON DELETE SET NULL,
    exit_code       integer,
    restart_count   integer NOT NULL DEFAULT 0,
    boot_time_us    bigint,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    stopped_at      timestamptz,
    UNIQUE (tenant_id, name),
    UNIQUE (tenant_id, private_ip),
    FOREIGN KEY (tenant_id, service_id) REFERENCES services (tenant_id, id)
);
CREATE INDEX instances_page ON instances (tenant_id, created_at, id);
CREATE INDEX instances_service ON instances (service_id);
CREATE INDEX instances_node ON instances (node_id);

CREATE TABLE certificates (
    id              uuid PRIMARY KEY,
    tenant_id       uuid REFERENCES tenants (id) ON DELETE CASCADE,
    domain          text NOT NULL,
    chain_pem       text,
    key_encrypted   bytea,
    state           text NOT NULL CHECK (state IN ('pending', 'valid', 'error')),
    state_reason    text,
    not_before      timestamptz,
    not_after       timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX certificates_domain ON certificates (domain);

-- Idempotency-Key records: the first response to a (tenant, key) is replayed to retries.
CREATE TABLE idempotency_keys (
    tenant_id     uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    key           text NOT NULL,
    request_hash  text NOT NULL,
    status        integer,
    content_type  text,
    body          bytea,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, key)
);

-- The change feed. Every committed change appends one row; `version` orders them. Writers take a transaction
-- advisory lock before appending (see record_event), so versions become visible in commit order: a reader
-- that has seen version V has seen every version below V, and can resume from V without gaps.
CREATE TABLE events (
    version        bigserial PRIMARY KEY,
    tenant_id      uuid,
    resource_type  text NOT NULL,
    resource_id    uuid NOT NULL,
    action         text NOT NULL CHECK (action IN ('created', 'updated', 'deleted')),
    payload        jsonb NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_tenant ON events (tenant_id, version);

CREATE FUNCTION record_event(p_tenant uuid, p_type text, p_id uuid, p_action text, p_payload jsonb)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v bigint;
BEGIN
    -- Held until commit: serialises appends so versions commit in order.
    PERFORM pg_advisory_xact_lock(7265746);
    INSERT INTO events (tenant_id, resource_type, resource_id, action, payload)
    VALUES (p_tenant, p_type, p_id, p_action, p_payload)
    RETURNING version INTO v;
    PERFORM pg_notify('cloud_changes', v::text);
    RETURN v;
END;
$$;
