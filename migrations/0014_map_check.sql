-- A conversation's redaction map is written whole, from the memory of the connection
-- whose message grew it. Two connections of one session (two tabs) each grew their own
-- copy, and the last write won: values the other one had issued placeholders for were
-- missing from the stored map, and a resume, which redacts the stored messages again
-- with that map, sent them to the model in clear. A map cleared by retention under an
-- open connection had the same effect.
--
-- A visitor message is now written only if the conversation's map is still the one its
-- connection last read or wrote (p_map_expected, compared under the row lock the update
-- takes anyway); otherwise nothing is written and seq is -1: the connection reads the map
-- again, redacts its message with it, and writes again. The previous signatures stay for
-- processes of the previous release during a rolling restart.
CREATE FUNCTION omnigate_insert_message(
    p_tenant uuid, p_conversation uuid, p_message uuid, p_role text, p_client_ref bytea,
    p_reply_to bigint, p_status text, p_finish text, p_ciphertext bytea, p_redaction bytea,
    p_check_map boolean, p_map_expected bytea
) RETURNS bigint
    LANGUAGE plpgsql SECURITY INVOKER
    AS $$
DECLARE
    v_seq bigint;
    v_map bytea;
BEGIN
    PERFORM set_config('app.tenant_id', p_tenant::text, true);
    IF p_check_map THEN
        SELECT c.redaction_sealed INTO v_map FROM conversations c
         WHERE c.tenant_id = p_tenant AND c.conversation_id = p_conversation
           FOR UPDATE;
        IF FOUND AND v_map IS DISTINCT FROM p_map_expected THEN
            RETURN -1;
        END IF;
    END IF;
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

CREATE FUNCTION omnigate_insert_messages(
    p_tenant uuid[], p_conversation uuid[], p_message uuid[], p_role text[],
    p_client_ref bytea[], p_reply_to bigint[], p_status text[], p_finish text[],
    p_ciphertext bytea[], p_redaction bytea[], p_check_map boolean[], p_map_expected bytea[]
) RETURNS TABLE(ord int, seq bigint, failed boolean)
    LANGUAGE plpgsql SECURITY INVOKER
    AS $$
#variable_conflict use_column
DECLARE
    i int;
    v_seq bigint;
    v_map bytea;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_tenant, 1), 0) LOOP
        BEGIN
            PERFORM set_config('app.tenant_id', p_tenant[i]::text, true);
            v_seq := NULL;
            IF p_check_map[i] THEN
                SELECT c.redaction_sealed INTO v_map FROM conversations c
                 WHERE c.tenant_id = p_tenant[i] AND c.conversation_id = p_conversation[i]
                   FOR UPDATE;
                IF FOUND AND v_map IS DISTINCT FROM p_map_expected[i] THEN
                    v_seq := -1;
                END IF;
            END IF;
            IF v_seq IS NULL THEN
                INSERT INTO messages (tenant_id, conversation_id, message_id, role, client_ref,
                                      reply_to, status, finish_reason, ciphertext)
                VALUES (p_tenant[i], p_conversation[i], p_message[i], p_role[i],
                        p_client_ref[i], p_reply_to[i], p_status[i], p_finish[i],
                        p_ciphertext[i])
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
            END IF;
            ord := i; seq := v_seq; failed := false;
        EXCEPTION WHEN others THEN
            ord := i; seq := NULL; failed := true;
        END;
        RETURN NEXT;
    END LOOP;
END
$$;

GRANT EXECUTE ON FUNCTION omnigate_insert_message(uuid, uuid, uuid, text, bytea, bigint, text,
                                                  text, bytea, bytea, boolean, bytea)
    TO omnigate_app;
GRANT EXECUTE ON FUNCTION omnigate_insert_messages(uuid[], uuid[], uuid[], text[], bytea[],
                                                   bigint[], text[], text[], bytea[], bytea[],
                                                   boolean[], bytea[])
    TO omnigate_app;
