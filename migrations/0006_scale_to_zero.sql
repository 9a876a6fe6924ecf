-- Scale to zero: a service may have its instances stopped after an idle time; the edge starts them again on the
-- next request. `last_request_at` is refreshed by the edges (throttled, without change-feed events: it changes
-- with traffic, not with the tenant's intent); `idle_stopped` marks the instances stopped for idleness, the only
-- ones a request wakes (an instance the tenant stopped stays stopped).
ALTER TABLE services ADD COLUMN scale_to_zero_after integer CHECK (scale_to_zero_after > 0);
ALTER TABLE services ADD COLUMN last_request_at timestamptz;
ALTER TABLE instances ADD COLUMN idle_stopped boolean NOT NULL DEFAULT false;
