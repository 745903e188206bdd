-- A session whose subject is a verified site user (external_ref set by a hello whose
-- `user` verified) was resumed by any later hello on that browser that named no user:
-- a signed-out user's cookie handed the next person on a shared device the user's
-- conversation, history and, through the privacy API, export. The resume now says
-- whether the subject is verified, so the gateway resumes such a session only for a
-- hello whose `user` verifies to that same subject. Otherwise the same function as
-- 0010; a new result type needs DROP and CREATE (callers read columns by name).
DROP FUNCTION omnigate_resume(uuid, bytea, text, boolean, boolean, int, int);

CREATE FUNCTION omnigate_resume(
    p_tenant uuid, p_token_hash bytea, p_ip text, p_dnt boolean, p_gpc boolean,
    p_days int, p_recent int
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
       AND ss.expires_at > now();
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

GRANT EXECUTE ON FUNCTION omnigate_resume(uuid, bytea, text, boolean, boolean, int, int)
    TO omnigate_app;
