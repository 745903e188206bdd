-- Resuming a conversation looks for user messages that never got an assistant row
-- (store.unanswered_user_seqs), and the SSE fallback resumes on every message. The
-- lookup is a set difference of user seqs and reply_to values; this partial index
-- lets the replies' half read only the index.
CREATE INDEX IF NOT EXISTS messages_replies
    ON messages (tenant_id, conversation_id, reply_to)
    WHERE role = 'assistant';
