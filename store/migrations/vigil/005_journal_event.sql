-- The journal row of a change that published an event names the event
-- (vigil_events.vigil_id, the stream entry's vigil_id), so a checker can hold
-- the stream against what committed, in commit order per shard, after the
-- outbox rows are gone.
alter table vigil_journal add column if not exists event_id uuid null;
