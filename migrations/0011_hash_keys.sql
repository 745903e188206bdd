-- The key of the gateway's keyed hashes (a verified site user's reference, a message's
-- client_ref) used to be derived from the primary master key, so a key rotation
-- changed every hash: a verified user got a new subject, and erase-by-user no longer
-- found the old one. Each tenant now keeps its hash key sealed in its row, like its
-- other secrets (KeyRing.seal_secret): `omnigate keys rotate` re-seals it under the new
-- primary and every hash stays the same (gateway/hashkeys.py).
ALTER TABLE tenants ADD COLUMN hash_key_sealed bytea;

-- The tenants whose hash key is not sealed yet, for the gateway's start: it seals them
-- while the master key that made their existing hashes is still the primary.
CREATE FUNCTION omnigate_tenants_without_hash_key() RETURNS SETOF uuid
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = public, pg_temp
    AS $$ SELECT tenant_id FROM public.tenants WHERE hash_key_sealed IS NULL ORDER BY tenant_id $$;

REVOKE ALL ON FUNCTION omnigate_tenants_without_hash_key() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION omnigate_tenants_without_hash_key() TO omnigate_app;
