-- A ballot is the voter's event with the greatest (after_ts, stored_ns, ts, event_id): what the
-- vote knew (the stamp of the voter's last answered vote), then when the stream stored it, then
-- the stamp and the id (schema/src/merge.rs says why). Rows written before this migration came
-- from events ordered by their stamp alone: they are given after_ts = ts, which is how their
-- events order still (an event of wire version 1 or 2 has no `after`), and stored_ns = 0.
ALTER TABLE ballots
    ADD COLUMN after_ts  bigint NOT NULL DEFAULT 0,
    ADD COLUMN stored_ns bigint NOT NULL DEFAULT 0;
UPDATE ballots SET after_ts = ts;
-- Every writer says both from now on.
ALTER TABLE ballots
    ALTER COLUMN after_ts DROP DEFAULT,
    ALTER COLUMN stored_ns DROP DEFAULT;
