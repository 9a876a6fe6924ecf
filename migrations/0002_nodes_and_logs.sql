-- Node agents: scheduling state and instance logs.

-- Unassigned instances that want to run: what the scheduler scans.
CREATE INDEX instances_unscheduled ON instances (created_at) WHERE node_id IS NULL AND desired_state = 'running';

-- Instance output, shipped by node agents in batches and capped per instance (see Store::append_logs), so the
-- API can serve logs without reaching into nodes.
CREATE TABLE instance_logs (
    instance_id  uuid NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    seq          bigint NOT NULL,
    at           timestamptz NOT NULL,
    stream       text NOT NULL CHECK (stream IN ('stdout', 'stderr', 'system')),
    line         text NOT NULL,
    PRIMARY KEY (instance_id, seq)
);
