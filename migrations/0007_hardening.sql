-- Hardening after review.
--
-- omnigate_tenant_ids() is SECURITY DEFINER: with `SET search_path FROM CURRENT`
-- and no pg_temp last, a caller's temporary table named `tenants` could shadow
-- the real one. Pin the path with pg_temp last and qualify the table.
CREATE OR REPLACE FUNCTION omnigate_tenant_ids() RETURNS SETOF uuid
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = public, pg_temp
    AS $$ SELECT tenant_id FROM public.tenants ORDER BY tenant_id $$;

ALTER FUNCTION omnigate_tenant_ids() SET search_path = public, pg_temp;
REVOKE ALL ON FUNCTION omnigate_tenant_ids() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION omnigate_tenant_ids() TO omnigate_app;

-- privacy_requests holds only what gateway/dsr.py writes: the kinds of each
-- regime (GDPR_KINDS, CCPA_KINDS) and its statuses (STATUSES).
ALTER TABLE privacy_requests
    ADD CONSTRAINT privacy_requests_regime_kind CHECK (
        (regime = 'gdpr' AND kind IN ('access', 'rectification', 'erasure', 'portability',
                                      'restriction', 'objection', 'automated_decision'))
        OR (regime = 'ccpa' AND kind IN ('know', 'delete', 'opt_out'))
    ),
    ADD CONSTRAINT privacy_requests_status CHECK (
        status IN ('received', 'acknowledged', 'completed', 'rejected')
    );
