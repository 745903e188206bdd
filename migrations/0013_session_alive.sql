-- Whether a token names a live session of the tenant: asked before a WebSocket upgrade
-- that carries a session cookie, so a cookie whose session ended is replaced on the
-- 101 (gateway/ws.py). One autocommit round trip: the function sets the tenant itself,
-- as omnigate_insert_message does (0004); SECURITY INVOKER, row-level security applies.
CREATE FUNCTION omnigate_session_alive(p_tenant uuid, p_token_hash bytea) RETURNS boolean
    LANGUAGE plpgsql SECURITY INVOKER
    AS $$
BEGIN
    PERFORM set_config('app.tenant_id', p_tenant::text, true);
    RETURN EXISTS (SELECT 1 FROM sessions
                    WHERE tenant_id = p_tenant AND token_hash = p_token_hash
                      AND expires_at > now());
END
$$;

GRANT EXECUTE ON FUNCTION omnigate_session_alive(uuid, bytea) TO omnigate_app;
