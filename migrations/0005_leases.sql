-- Leader election for cross-tenant jobs (retention) by a lease row instead of a
-- session-level advisory lock: every statement is autocommit, so it works behind
-- PgBouncer in transaction mode, and a crashed leader's lease simply expires.
-- Not a tenant table: it holds a job name, a random holder id and a time.
CREATE TABLE omnigate_leases (
    name        text PRIMARY KEY,
    holder      uuid NOT NULL,
    expires_at  timestamptz NOT NULL
);
GRANT SELECT, INSERT, UPDATE, DELETE ON omnigate_leases TO omnigate_app;
