-- The app role had UPDATE and DELETE on every tenant table. Consent decisions and
-- policy versions are history (a new decision or version is a new row), and no tenant
-- is deleted by the gateway: take away what it never uses. Erasure still removes a
-- subject's consents: foreign-key cascades run as the table owner.
REVOKE UPDATE, DELETE ON consents, policies FROM omnigate_app;
REVOKE DELETE ON tenants FROM omnigate_app;
