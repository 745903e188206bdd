-- Core schema. Every tenant table carries tenant_id first in its primary key
-- and in every foreign key, so it can be distributed by tenant (Citus) as is.
-- Isolation is row-level security on the transaction-local app.tenant_id;
-- without it set, current_tenant() is NULL and no row is visible.
--
-- A few lookups happen before the tenant is known (a site key on the widget
-- socket, an admin key, a session token on the privacy API). Those rows are
-- additionally visible to a transaction that presents the SHA-256 of the
-- secret in app.lookup_hash: whoever knows the secret may find its tenant,
-- nobody else sees anything.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'omnigate_app') THEN
        CREATE ROLE omnigate_app NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
    END IF;
END
$$;

CREATE FUNCTION current_tenant() RETURNS uuid
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT NULLIF(current_setting('app.tenant_id', true), '')::uuid $$;

CREATE FUNCTION current_lookup_hash() RETURNS bytea
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT decode(NULLIF(current_setting('app.lookup_hash', true), ''), 'hex') $$;

CREATE TABLE tenants (
    tenant_id            uuid PRIMARY KEY,
    name                 text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at           timestamptz NOT NULL DEFAULT now(),
    -- bring-your-own upstream: JSON {base_url, model, api_key} sealed with a master key
    upstream_sealed      bytea,
    upstream_key_last4   text,
    -- HMAC secret for identity verification, sealed with a master key
    identity_secret_sealed bytea
);

CREATE TABLE site_keys (
    tenant_id    uuid NOT NULL REFERENCES tenants (tenant_id) ON DELETE CASCADE,
    site_key_id  uuid NOT NULL,
    key_hash     bytea NOT NULL UNIQUE,
    key_prefix   text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz,
    PRIMARY KEY (tenant_id, site_key_id)
);

CREATE TABLE admin_keys (
    tenant_id     uuid NOT NULL REFERENCES tenants (tenant_id) ON DELETE CASCADE,
    admin_key_id  uuid NOT NULL,
    key_hash      bytea NOT NULL UNIQUE,
    label         text NOT NULL DEFAULT '',
    last4         text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz,
    PRIMARY KEY (tenant_id, admin_key_id)
);

CREATE TABLE policies (
    tenant_id   uuid NOT NULL REFERENCES tenants (tenant_id) ON DELETE CASCADE,
    version     integer NOT NULL CHECK (version >= 1),
    doc         jsonb NOT NULL,
    diff        jsonb NOT NULL DEFAULT '{}',
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, version)
);

-- A subject is one visitor (or one verified site user across devices).
CREATE TABLE subjects (
    tenant_id     uuid NOT NULL REFERENCES tenants (tenant_id) ON DELETE CASCADE,
    subject_id    uuid NOT NULL,
    -- HMAC of the site's verified user id under a server key; never the id itself
    external_ref  bytea,
    restricted    boolean NOT NULL DEFAULT false,
    tracking_opt_out boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, subject_id),
    UNIQUE (tenant_id, external_ref)
);

-- The per-subject data key, wrapped by a master key. Deleting this row makes
-- every ciphertext of the subject unreadable, wherever a copy went.
CREATE TABLE subject_keys (
    tenant_id    uuid NOT NULL,
    subject_id   uuid NOT NULL,
    kek_id       text NOT NULL,
    wrapped_key  bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    rewrapped_at timestamptz,
    PRIMARY KEY (tenant_id, subject_id),
    FOREIGN KEY (tenant_id, subject_id) REFERENCES subjects (tenant_id, subject_id) ON DELETE CASCADE
);

CREATE TABLE conversations (
    tenant_id        uuid NOT NULL,
    conversation_id  uuid NOT NULL,
    -- NULL once anonymized by retention
    subject_id       uuid,
    started_at       timestamptz NOT NULL DEFAULT now(),
    last_message_at  timestamptz NOT NULL DEFAULT now(),
    message_count    integer NOT NULL DEFAULT 0,
    -- placeholder map of the redactor, sealed under the subject's data key
    redaction_sealed bytea,
    anonymized_at    timestamptz,
    PRIMARY KEY (tenant_id, conversation_id),
    FOREIGN KEY (tenant_id, subject_id) REFERENCES subjects (tenant_id, subject_id) ON DELETE CASCADE
);
CREATE INDEX conversations_subject ON conversations (tenant_id, subject_id);
CREATE INDEX conversations_recent ON conversations (tenant_id, last_message_at DESC, conversation_id);

CREATE TABLE sessions (
    tenant_id        uuid NOT NULL,
    session_id       uuid NOT NULL,
    subject_id       uuid NOT NULL,
    conversation_id  uuid NOT NULL,
    token_hash       bytea NOT NULL UNIQUE,
    ip_anon          text,
    dnt              boolean NOT NULL DEFAULT false,
    gpc              boolean NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT now(),
    last_seen_at     timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, session_id),
    FOREIGN KEY (tenant_id, subject_id) REFERENCES subjects (tenant_id, subject_id) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, conversation_id) REFERENCES conversations (tenant_id, conversation_id) ON DELETE CASCADE
);
CREATE INDEX sessions_subject ON sessions (tenant_id, subject_id);

CREATE TABLE messages (
    tenant_id        uuid NOT NULL,
    conversation_id  uuid NOT NULL,
    seq              bigint GENERATED ALWAYS AS IDENTITY,
    message_id       uuid NOT NULL,
    role             text NOT NULL CHECK (role IN ('user', 'assistant')),
    -- keyed hash of the widget's client id, for idempotent re-sends
    client_ref       bytea,
    reply_to         bigint,
    status           text NOT NULL DEFAULT 'complete' CHECK (status IN ('complete', 'interrupted')),
    finish_reason    text,
    ciphertext       bytea NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, conversation_id, seq),
    FOREIGN KEY (tenant_id, conversation_id) REFERENCES conversations (tenant_id, conversation_id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX messages_client_ref ON messages (tenant_id, conversation_id, client_ref, role)
    WHERE client_ref IS NOT NULL;
CREATE INDEX messages_created ON messages (tenant_id, created_at);

-- Append-only record of every consent decision.
CREATE TABLE consents (
    tenant_id        uuid NOT NULL,
    consent_id       bigint GENERATED ALWAYS AS IDENTITY,
    subject_id       uuid NOT NULL,
    session_id       uuid,
    purpose          text NOT NULL,
    granted          boolean NOT NULL,
    policy_version   integer NOT NULL,
    consent_version  integer NOT NULL,
    source           text NOT NULL CHECK (source IN ('widget', 'api', 'signal', 'request')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, consent_id),
    FOREIGN KEY (tenant_id, subject_id) REFERENCES subjects (tenant_id, subject_id) ON DELETE CASCADE
);
CREATE INDEX consents_subject ON consents (tenant_id, subject_id, consent_id);

CREATE TABLE privacy_requests (
    tenant_id          uuid NOT NULL,
    request_id         uuid NOT NULL,
    subject_id         uuid,
    regime             text NOT NULL CHECK (regime IN ('gdpr', 'ccpa')),
    kind               text NOT NULL,
    status             text NOT NULL DEFAULT 'received',
    created_at         timestamptz NOT NULL DEFAULT now(),
    ack_due_at         timestamptz NOT NULL,
    due_at             timestamptz NOT NULL,
    acknowledged_at    timestamptz,
    extended_at        timestamptz,
    extension_reason   text,
    closed_at          timestamptz,
    resolution         text,
    PRIMARY KEY (tenant_id, request_id),
    FOREIGN KEY (tenant_id, subject_id) REFERENCES subjects (tenant_id, subject_id) ON DELETE SET NULL (subject_id)
);
CREATE INDEX privacy_requests_due ON privacy_requests (tenant_id, status, due_at);

CREATE TABLE analytics_events (
    tenant_id        uuid NOT NULL,
    event_id         bigint GENERATED ALWAYS AS IDENTITY,
    subject_id       uuid NOT NULL,
    occurred_at      timestamptz NOT NULL DEFAULT now(),
    page_path        text,
    referrer_origin  text,
    browser_family   text,
    browser_major    integer,
    device_class     text,
    PRIMARY KEY (tenant_id, event_id),
    FOREIGN KEY (tenant_id, subject_id) REFERENCES subjects (tenant_id, subject_id) ON DELETE CASCADE
);
CREATE INDEX analytics_events_time ON analytics_events (tenant_id, occurred_at);

CREATE TABLE analytics_daily (
    tenant_id       uuid NOT NULL REFERENCES tenants (tenant_id) ON DELETE CASCADE,
    day             date NOT NULL,
    page_path       text NOT NULL DEFAULT '',
    browser_family  text NOT NULL DEFAULT '',
    device_class    text NOT NULL DEFAULT '',
    events          bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, day, page_path, browser_family, device_class)
);

-- Hash-chained per tenant; the app role may only INSERT and SELECT.
CREATE TABLE audit_log (
    tenant_id   uuid NOT NULL,
    seq         bigint NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,
    action      text NOT NULL,
    target      text NOT NULL DEFAULT '',
    details     jsonb NOT NULL DEFAULT '{}',
    prev_hash   bytea NOT NULL,
    hash        bytea NOT NULL,
    PRIMARY KEY (tenant_id, seq)
);

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['tenants', 'site_keys', 'admin_keys', 'policies', 'subjects',
                             'subject_keys', 'conversations', 'sessions', 'messages', 'consents',
                             'privacy_requests', 'analytics_events', 'analytics_daily', 'audit_log']
    LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY tenant_isolation ON %I USING (tenant_id = current_tenant()) '
                       'WITH CHECK (tenant_id = current_tenant())', t);
    END LOOP;
END
$$;

-- Secret-holder lookups (see the header comment). Read-only.
CREATE POLICY lookup_by_secret ON site_keys FOR SELECT USING (key_hash = current_lookup_hash());
CREATE POLICY lookup_by_secret ON admin_keys FOR SELECT USING (key_hash = current_lookup_hash());
CREATE POLICY lookup_by_secret ON sessions FOR SELECT USING (token_hash = current_lookup_hash());

GRANT SELECT, INSERT, UPDATE, DELETE ON tenants, site_keys, admin_keys, policies, subjects,
    subject_keys, conversations, sessions, messages, consents, privacy_requests,
    analytics_events, analytics_daily TO omnigate_app;
GRANT SELECT, INSERT ON audit_log TO omnigate_app;
GRANT EXECUTE ON FUNCTION current_tenant(), current_lookup_hash() TO omnigate_app;
