-- A session is resumed only by the visitor it belongs to: a verified site user's only by
-- a hello whose `user` verifies as that user, an anonymous one only by a hello that
-- verifies as no one (0015). The gateway checked that after omnigate_resume had already
-- touched the session: a refused resume (the next person on a shared browser, carrying
-- the signed-out user's cookie) still wrote its anonymized IP, its DNT and GPC (and,
-- through the trigger of 0016, a signal record) and slid the expiry of the user's
-- session, so the user's export showed another person's address and signals. The
-- gateway now verifies the hello's `user` first and passes its external_ref (NULL for
-- none): a session whose subject does not match is neither returned nor touched.
-- The seven-argument function stays for instances of the previous release during a
-- rolling restart.
CREATE FUNCTION omnigate_resume(
    p_tenant uuid, p_token_hash bytea, p_ip text, p_dnt boolean, p_gpc boolean,
    p_days int, p_recent int, p_ref bytea
) RETURNS TABLE(
    session_id uuid, subject_id uuid, conversation_id uuid, restricted boolean,
    redaction_sealed bytea, consents omnigate_consent_row[], unanswered bigint[],
    recent omnigate_context_row[], kek_id text, wrapped_key bytea, verified boolean
)
    LANGUAGE plpgsql SECURITY INVOKER
    AS $$
#variable_conflict use_column
DECLARE
    s record;
BEGIN
    PERFORM set_config('app.tenant_id', p_tenant::text, true);
    SELECT ss.session_id, ss.subject_id, ss.conversation_id, sub.restricted,
           sub.external_ref IS NOT NULL AS verified,
           (ss.last_seen_at < now() - interval '1 minute'
            OR ss.ip_anon IS DISTINCT FROM p_ip
            OR ss.dnt IS DISTINCT FROM p_dnt
            OR ss.gpc IS DISTINCT FROM p_gpc) AS stale,
           k.kek_id, k.wrapped_key
      INTO s
      FROM sessions ss JOIN subjects sub USING (tenant_id, subject_id)
      LEFT JOIN subject_keys k USING (tenant_id, subject_id)
     WHERE ss.tenant_id = p_tenant AND ss.token_hash = p_token_hash
       AND ss.expires_at > now()
       -- only the visitor it belongs to: the same verified user, or no one verified
       AND sub.external_ref IS NOT DISTINCT FROM p_ref;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF s.stale THEN
        UPDATE sessions
           SET last_seen_at = now(), ip_anon = p_ip, dnt = p_dnt, gpc = p_gpc,
               expires_at = now() + make_interval(days => p_days)
         WHERE sessions.tenant_id = p_tenant AND sessions.session_id = s.session_id;
    END IF;
    session_id := s.session_id;
    subject_id := s.subject_id;
    conversation_id := s.conversation_id;
    restricted := s.restricted;
    kek_id := s.kek_id;
    wrapped_key := s.wrapped_key;
    verified := s.verified;
    SELECT c.redaction_sealed INTO redaction_sealed
      FROM conversations c
     WHERE c.tenant_id = p_tenant AND c.conversation_id = s.conversation_id;
    -- the latest decision per purpose
    consents := ARRAY(
        SELECT DISTINCT ON (c.purpose)
               ROW(c.purpose, c.granted, c.consent_version)::omnigate_consent_row
          FROM consents c
         WHERE c.tenant_id = p_tenant AND c.subject_id = s.subject_id
         ORDER BY c.purpose, c.consent_id DESC);
    -- user messages with no assistant row at all: a set difference, linear (0008)
    unanswered := ARRAY(
        SELECT m.seq FROM messages m
         WHERE m.tenant_id = p_tenant AND m.conversation_id = s.conversation_id
           AND m.role = 'user'
        EXCEPT
        SELECT m.reply_to FROM messages m
         WHERE m.tenant_id = p_tenant AND m.conversation_id = s.conversation_id
           AND m.role = 'assistant' AND m.reply_to IS NOT NULL
        ORDER BY 1);
    -- the complete messages among the last p_recent, oldest first (an interrupted
    -- marker is empty: nothing the model said)
    recent := ARRAY(
        SELECT ROW(r.message_id, r.role, r.ciphertext)::omnigate_context_row
          FROM (SELECT m.seq, m.message_id, m.role, m.ciphertext, m.status FROM messages m
                 WHERE m.tenant_id = p_tenant AND m.conversation_id = s.conversation_id
                 ORDER BY m.seq DESC LIMIT p_recent) r
         WHERE r.status = 'complete'
         ORDER BY r.seq);
    RETURN NEXT;
END
$$;

GRANT EXECUTE ON FUNCTION omnigate_resume(uuid, bytea, text, boolean, boolean, int, int, bytea)
    TO omnigate_app;
