-- Group commit of message writes: several sessions' inserts in one autocommit round
-- trip (gateway/groupcommit.py). Each row is what omnigate_insert_message does for
-- one message: set the transaction-local tenant, then insert and bump the
-- conversation, so row-level security checks every statement against the tenant set
-- just before it. Each row runs in its own subtransaction (BEGIN ... EXCEPTION): a bad
-- row (an erased conversation, another tenant's conversation) is rolled back alone and
-- reported with failed = true; the other rows commit with the statement. seq is NULL
-- and failed false when the client_ref already existed. SECURITY INVOKER, like 0004:
-- nothing is granted that the app role could not do itself.
CREATE FUNCTION omnigate_insert_messages(
    p_tenant uuid[], p_conversation uuid[], p_message uuid[], p_role text[],
    p_client_ref bytea[], p_reply_to bigint[], p_status text[], p_finish text[],
    p_ciphertext bytea[], p_redaction bytea[]
) RETURNS TABLE(ord int, seq bigint, failed boolean)
    LANGUAGE plpgsql SECURITY INVOKER
    AS $$
#variable_conflict use_column
DECLARE
    i int;
    v_seq bigint;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_tenant, 1), 0) LOOP
        BEGIN
            PERFORM set_config('app.tenant_id', p_tenant[i]::text, true);
            v_seq := NULL;
            INSERT INTO messages (tenant_id, conversation_id, message_id, role, client_ref,
                                  reply_to, status, finish_reason, ciphertext)
            VALUES (p_tenant[i], p_conversation[i], p_message[i], p_role[i], p_client_ref[i],
                    p_reply_to[i], p_status[i], p_finish[i], p_ciphertext[i])
            ON CONFLICT (tenant_id, conversation_id, client_ref, role)
                WHERE client_ref IS NOT NULL
            DO NOTHING
            RETURNING messages.seq INTO v_seq;
            IF v_seq IS NOT NULL THEN
                UPDATE conversations
                   SET last_message_at = now(), message_count = message_count + 1,
                       redaction_sealed = COALESCE(p_redaction[i], redaction_sealed)
                 WHERE tenant_id = p_tenant[i] AND conversation_id = p_conversation[i];
            END IF;
            ord := i; seq := v_seq; failed := false;
        EXCEPTION WHEN others THEN
            ord := i; seq := NULL; failed := true;
        END;
        RETURN NEXT;
    END LOOP;
END
$$;

GRANT EXECUTE ON FUNCTION omnigate_insert_messages(uuid[], uuid[], uuid[], text[], bytea[],
                                                   bigint[], text[], text[], bytea[], bytea[])
    TO omnigate_app;
