-- The privacy signals (Do Not Track, Global Privacy Control) a session carried were
-- kept only on the session row, and a resume overwrote them: a visitor who sent GPC
-- on Monday and not on Tuesday left no trace of Monday. Each change is now a row of
-- its own, append-only for the gateway (no UPDATE, no DELETE): a session that starts
-- with a signal on, and every resume that turns one on or off. A session started with
-- neither writes nothing, so the common hello pays nothing. Like consent decisions,
-- the records are kept with the subject as evidence of what was honoured, and go with
-- it on erasure (foreign-key cascade, run as the table owner).
CREATE TABLE signal_records (
    tenant_id   uuid NOT NULL,
    record_id   bigint GENERATED ALWAYS AS IDENTITY,
    subject_id  uuid NOT NULL,
    session_id  uuid NOT NULL,
    dnt         boolean NOT NULL,
    gpc         boolean NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, record_id),
    FOREIGN KEY (tenant_id, subject_id) REFERENCES subjects (tenant_id, subject_id) ON DELETE CASCADE
);
CREATE INDEX signal_records_subject ON signal_records (tenant_id, subject_id, record_id);

ALTER TABLE signal_records ENABLE ROW LEVEL SECURITY;
ALTER TABLE signal_records FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON signal_records USING (tenant_id = current_tenant())
    WITH CHECK (tenant_id = current_tenant());
GRANT SELECT, INSERT ON signal_records TO omnigate_app;

-- A trigger, not a change to every function that writes sessions: the session insert
-- and omnigate_resume (0015) both reach it. SECURITY INVOKER: row-level security
-- applies to the insert as to the write that fired it.
CREATE FUNCTION omnigate_record_signals() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER
    AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NOT (NEW.dnt OR NEW.gpc) THEN
            RETURN NULL;
        END IF;
    ELSIF NEW.dnt IS NOT DISTINCT FROM OLD.dnt AND NEW.gpc IS NOT DISTINCT FROM OLD.gpc THEN
        RETURN NULL;
    END IF;
    INSERT INTO signal_records (tenant_id, subject_id, session_id, dnt, gpc)
    VALUES (NEW.tenant_id, NEW.subject_id, NEW.session_id, NEW.dnt, NEW.gpc);
    RETURN NULL;
END
$$;

CREATE TRIGGER sessions_record_signals AFTER INSERT OR UPDATE OF dnt, gpc ON sessions
    FOR EACH ROW EXECUTE FUNCTION omnigate_record_signals();
