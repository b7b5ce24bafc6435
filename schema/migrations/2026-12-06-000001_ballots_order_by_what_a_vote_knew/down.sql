ALTER TABLE ballots DROP COLUMN after_ts, DROP COLUMN stored_ns;
