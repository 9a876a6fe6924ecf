-- Day-2 deploys (issue 21): draining, edge load reports, rollouts and autoscale.

-- An instance being stopped or deleted first drains: the edges stop sending it new requests, those in flight
-- finish (until `drain_deadline`), then it stops (`drain_then` = 'stop') or goes (`delete`). `drain_version` is
-- the change-feed version every live edge must hold (it no longer routes the instance) before the drain can end.
ALTER TABLE instances DROP CONSTRAINT instances_state_check;
ALTER TABLE instances ADD CONSTRAINT instances_state_check
    CHECK (state IN ('pending', 'starting', 'running', 'draining', 'stopping', 'stopped', 'failed', 'deleted'));
ALTER TABLE instances
    ADD COLUMN drain_then     text CHECK (drain_then IN ('stop', 'delete')),
    ADD COLUMN drain_deadline timestamptz,
    ADD COLUMN drain_version  bigint,
    ADD COLUMN rollout_id     uuid;
CREATE INDEX instances_draining ON instances (drain_deadline) WHERE drain_then IS NOT NULL;

-- Each edge says, every second or so, which change-feed version it routes by and what it has in flight per
-- instance (only instances with something in flight have a row).
CREATE TABLE edges (
    id          uuid PRIMARY KEY,
    name        text NOT NULL,
    version     bigint NOT NULL,
    reported_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE edge_load (
    edge_id     uuid NOT NULL REFERENCES edges (id) ON DELETE CASCADE,
    instance_id uuid NOT NULL,
    in_flight   integer NOT NULL CHECK (in_flight > 0),
    PRIMARY KEY (edge_id, instance_id)
);
CREATE INDEX edge_load_instance ON edge_load (instance_id);

-- Autoscale: between min and max instances, aiming at `target_in_flight` requests in flight per instance.
ALTER TABLE services
    ADD COLUMN autoscale_min      integer CHECK (autoscale_min >= 0),
    ADD COLUMN autoscale_max      integer CHECK (autoscale_max >= 1),
    ADD COLUMN autoscale_target   integer CHECK (autoscale_target >= 1),
    ADD COLUMN autoscale_cooldown integer CHECK (autoscale_cooldown >= 0),
    ADD COLUMN last_scaled_at     timestamptz,
    ADD CONSTRAINT services_autoscale_check CHECK (
        (autoscale_min IS NULL) = (autoscale_max IS NULL) AND (autoscale_min IS NULL) = (autoscale_target IS NULL)
        AND (autoscale_min IS NULL) = (autoscale_cooldown IS NULL) AND autoscale_min <= autoscale_max);

-- A rollout replaces (or joins, or stops) a service's instances with instances of another image or
-- configuration, a few at a time, each new one running before an old one drains.
CREATE TABLE rollouts (
    id             uuid PRIMARY KEY,
    tenant_id      uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    service_id     uuid NOT NULL REFERENCES services (id) ON DELETE CASCADE,
    image_id       uuid NOT NULL REFERENCES images (id) ON DELETE RESTRICT,
    image_digest   text NOT NULL REFERENCES image_blobs (digest),
    strategy       text NOT NULL CHECK (strategy IN ('replace', 'keep', 'stop')),
    state          text NOT NULL CHECK (state IN ('running', 'succeeded', 'failed', 'cancelled')),
    state_reason   text,
    replicas       integer NOT NULL CHECK (replicas >= 1),
    max_surge      integer NOT NULL CHECK (max_surge >= 1),
    ready_timeout  integer NOT NULL CHECK (ready_timeout >= 1),
    args           text[] NOT NULL,
    env            jsonb NOT NULL,
    memory_mb      integer NOT NULL,
    port           integer NOT NULL,
    restart_policy text NOT NULL,
    old_instances  uuid[] NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz
);
CREATE INDEX rollouts_page ON rollouts (tenant_id, service_id, created_at, id);
CREATE UNIQUE INDEX rollouts_one_running ON rollouts (service_id) WHERE state = 'running';
