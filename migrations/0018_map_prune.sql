-- A conversation that keeps some messages kept its whole redaction map: the original of
-- a value typed only in messages retention had deleted stayed sealed in it for as long as
-- the conversation lived. Retention now marks a conversation whose messages it deleted
-- (in the statement that deletes them, so a pass cut short loses no mark), and a later
-- step of the same pass, which holds the keys, opens its map and drops the entries no
-- remaining message contains (gateway/retention.py).
ALTER TABLE conversations ADD COLUMN map_prune_due boolean NOT NULL DEFAULT false;
CREATE INDEX conversations_map_prune_due ON conversations (tenant_id) WHERE map_prune_due;
