-- The hot path writes two messages per visitor message. This function makes each
-- write one round trip: it sets the transaction-local tenant itself, so a single
-- autocommit statement is a complete tenant transaction (still safe behind
-- PgBouncer in transaction mode). SECURITY INVOKER: row-level security applies
-- exactly as to any statement of the app role, which could set app.tenant_id
-- itself anyway, so nothing is granted that the role did not have.
CREATE FUNCTION omnigate_insert_message(
    p_tenant uuid, p_conversation uuid, p_message uuid, p_role text, p_client_ref bytea,
    p_reply_to bigint, p_status text, p_finish text, p_ciphertext bytea, p_redaction bytea
) RETURNS bigint
    LANGUAGE plpgsql SECURITY INVOKER
    AS $$
DECLARE
    v_seq bigint;
BEGIN
    PERFORM set_config('app.tenant_id', p_tenant::text, true);
    INSERT INTO messages (tenant_id, conversation_id, message_id, role, client_ref, reply_to,
                          status, finish_reason, ciphertext)
    VALUES (p_tenant, p_conversation, p_message, p_role, p_client_ref, p_reply_to,
            p_status, p_finish, p_ciphertext)
    ON CONFLICT (tenant_id, conversation_id, client_ref, role) WHERE client_ref IS NOT NULL
    DO NOTHING
    RETURNING seq INTO v_seq;
    IF v_seq IS NOT NULL THEN
        UPDATE conversations
           SET last_message_at = now(), message_count = message_count + 1,
               redaction_sealed = COALESCE(p_redaction, redaction_sealed)
         WHERE tenant_id = p_tenant AND conversation_id = p_conversation;
    END IF;
    RETURN v_seq;
END
$$;

GRANT EXECUTE ON FUNCTION omnigate_insert_message(uuid, uuid, uuid, text, bytea, bigint, text,
                                                  text, bytea, bytea) TO omnigate_app;
