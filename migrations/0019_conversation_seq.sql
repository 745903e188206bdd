-- A message's seq came from one identity column shared by every tenant, and visitors
-- see it (ack, done, history): the gap between two of a visitor's own numbers told how
-- many messages the gateway had stored meanwhile, all tenants together. seq is now a
-- position within its conversation, taken from a counter on the conversation row under
-- the row lock every insert already takes (the map check's SELECT ... FOR UPDATE, then
-- the UPDATE of last_message_at). The primary key (tenant_id, conversation_id, seq)
-- stays unique, and every reader of seq already names the conversation.
--
-- Existing conversations go on from their highest seq, and one whose messages retention
-- has already deleted from past every number the shared counter gave; new ones start at
-- 1. A number already seen stays what it was, and the next is above it, so a widget
-- holding one orders the next correctly.
ALTER TABLE conversations ADD COLUMN next_seq bigint NOT NULL DEFAULT 1;

-- The backfill must see every tenant's rows: an owner that is not a superuser is
-- subject to FORCE ROW LEVEL SECURITY, under which (no app.tenant_id set) it would see
-- none, and leave counters at 1 below seqs already taken. Forced again before commit.
ALTER TABLE conversations NO FORCE ROW LEVEL SECURITY;
ALTER TABLE messages NO FORCE ROW LEVEL SECURITY;
UPDATE conversations c SET next_seq = m.top + 1
FROM (SELECT tenant_id, conversation_id, max(seq) AS top FROM messages
      GROUP BY tenant_id, conversation_id) m
WHERE c.tenant_id = m.tenant_id AND c.conversation_id = m.conversation_id;
UPDATE conversations c SET next_seq = nextval(pg_get_serial_sequence('messages', 'seq'))
WHERE c.message_count > 0 AND NOT EXISTS (
    SELECT 1 FROM messages m
    WHERE m.tenant_id = c.tenant_id AND m.conversation_id = c.conversation_id);
ALTER TABLE conversations FORCE ROW LEVEL SECURITY;
ALTER TABLE messages FORCE ROW LEVEL SECURITY;

ALTER TABLE messages ALTER COLUMN seq DROP IDENTITY;

-- Writers that do not name a seq (the ten-argument functions of 0004 and 0006, which
-- releases before 0014 called, and an operator's INSERT) take the next one here; the
-- previous release calls the functions below, which take it from the counter themselves,
-- so the message path does not pay for a second update of the conversation row. A
-- BEFORE trigger runs before ON CONFLICT is checked: a re-send through those older
-- functions takes a number it does not keep (a gap, never a duplicate). A conversation
-- that is not there (erased, or another tenant's under row-level security) gets 0, so
-- the insert fails on its foreign key as it always did.
CREATE FUNCTION omnigate_message_seq() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER
    AS $$
BEGIN
    UPDATE conversations SET next_seq = next_seq + 1
     WHERE tenant_id = NEW.tenant_id AND conversation_id = NEW.conversation_id
    RETURNING next_seq - 1 INTO NEW.seq;
    NEW.seq := coalesce(NEW.seq, 0);
    RETURN NEW;
END
$$;

CREATE TRIGGER messages_seq BEFORE INSERT ON messages
    FOR EACH ROW WHEN (NEW.seq IS NULL) EXECUTE FUNCTION omnigate_message_seq();

-- As 0014, with the conversation row always locked first (not only for the map check)
-- and its counter read under that lock; the UPDATE that follows a stored row advances
-- it. A re-send (client_ref already stored) takes no number.
CREATE OR REPLACE FUNCTION omnigate_insert_message(
    p_tenant uuid, p_conversation uuid, p_message uuid, p_role text, p_client_ref bytea,
    p_reply_to bigint, p_status text, p_finish text, p_ciphertext bytea, p_redaction bytea,
    p_check_map boolean, p_map_expected bytea
) RETURNS bigint
    LANGUAGE plpgsql SECURITY INVOKER
    AS $$
DECLARE
    v_seq bigint;
    v_next bigint;
    v_map bytea;
BEGIN
    PERFORM set_config('app.tenant_id', p_tenant::text, true);
    SELECT c.redaction_sealed, c.next_seq INTO v_map, v_next FROM conversations c
     WHERE c.tenant_id = p_tenant AND c.conversation_id = p_conversation
       FOR UPDATE;
    IF NOT FOUND THEN
        v_next := 0;  -- the foreign key refuses the row
    ELSIF p_check_map AND v_map IS DISTINCT FROM p_map_expected THEN
        RETURN -1;
    END IF;
    INSERT INTO messages (tenant_id, conversation_id, seq, message_id, role, client_ref,
                          reply_to, status, finish_reason, ciphertext)
    VALUES (p_tenant, p_conversation, v_next, p_message, p_role, p_client_ref, p_reply_to,
            p_status, p_finish, p_ciphertext)
    ON CONFLICT (tenant_id, conversation_id, client_ref, role) WHERE client_ref IS NOT NULL
    DO NOTHING
    RETURNING seq INTO v_seq;
    IF v_seq IS NOT NULL THEN
        UPDATE conversations
           SET last_message_at = now(), message_count = message_count + 1,
               next_seq = v_seq + 1,
               redaction_sealed = COALESCE(p_redaction, redaction_sealed)
         WHERE tenant_id = p_tenant AND conversation_id = p_conversation;
    END IF;
    RETURN v_seq;
END
$$;

CREATE OR REPLACE FUNCTION omnigate_insert_messages(
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
    v_next bigint;
    v_map bytea;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_tenant, 1), 0) LOOP
        BEGIN
            PERFORM set_config('app.tenant_id', p_tenant[i]::text, true);
            v_seq := NULL;
            SELECT c.redaction_sealed, c.next_seq INTO v_map, v_next FROM conversations c
             WHERE c.tenant_id = p_tenant[i] AND c.conversation_id = p_conversation[i]
               FOR UPDATE;
            IF NOT FOUND THEN
                v_next := 0;  -- the foreign key refuses the row
            ELSIF p_check_map[i] AND v_map IS DISTINCT FROM p_map_expected[i] THEN
                v_seq := -1;
            END IF;
            IF v_seq IS NULL THEN
                INSERT INTO messages (tenant_id, conversation_id, seq, message_id, role,
                                      client_ref, reply_to, status, finish_reason, ciphertext)
                VALUES (p_tenant[i], p_conversation[i], v_next, p_message[i], p_role[i],
                        p_client_ref[i], p_reply_to[i], p_status[i], p_finish[i],
                        p_ciphertext[i])
                ON CONFLICT (tenant_id, conversation_id, client_ref, role)
                    WHERE client_ref IS NOT NULL
                DO NOTHING
                RETURNING messages.seq INTO v_seq;
                IF v_seq IS NOT NULL THEN
                    UPDATE conversations
                       SET last_message_at = now(), message_count = message_count + 1,
                           next_seq = v_seq + 1,
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
