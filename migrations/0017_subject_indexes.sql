-- Deleting a subject (an erasure, or retention deleting one left with nothing) cascades
-- to every table that names it. analytics_events and privacy_requests had no index
-- leading with the subject, so each deleted subject scanned the tenant's events and
-- requests: retention's batches of thousands of subjects grew with the square of the
-- data. (Plain CREATE INDEX: migrations run in one transaction, which CONCURRENTLY
-- cannot; on a large live table build them CONCURRENTLY by hand first, with these
-- names, and this migration finds them there.)
CREATE INDEX IF NOT EXISTS analytics_events_subject ON analytics_events (tenant_id, subject_id);
CREATE INDEX IF NOT EXISTS privacy_requests_subject ON privacy_requests (tenant_id, subject_id);
