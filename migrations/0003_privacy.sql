-- Privacy jobs: listing tenants for the cross-tenant jobs (retention, key
-- rotation, audit verification, the overdue gauge) and request details.
--
-- The app role can see a tenant only after setting app.tenant_id, so it cannot
-- enumerate tenants. Instead of a policy that any app-role transaction could
-- switch on (which would expose whole tenant rows), one SECURITY DEFINER
-- function returns the ids and nothing else. It runs as the migration owner;
-- tables FORCE row-level security even for their owner, so the owner gets one
-- SELECT-only policy on `tenants` (it could ALTER the table anyway; nothing
-- is lost). Tenant ids are random uuids: not secrets, not personal data.

DO $$
BEGIN
    EXECUTE format('CREATE POLICY owner_lists_tenants ON tenants FOR SELECT TO %I USING (true)',
                   current_user);
END
$$;

CREATE FUNCTION omnigate_tenant_ids() RETURNS SETOF uuid
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path FROM CURRENT
    AS $$ SELECT tenant_id FROM tenants ORDER BY tenant_id $$;

REVOKE ALL ON FUNCTION omnigate_tenant_ids() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION omnigate_tenant_ids() TO omnigate_app;

-- What the requester wrote; cleared when the subject is erased.
ALTER TABLE privacy_requests ADD COLUMN details text;
ALTER TABLE privacy_requests ADD COLUMN extension_days integer;
