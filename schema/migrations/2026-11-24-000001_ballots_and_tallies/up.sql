-- One ballot per (poll, voter): the event with the greatest (ts, event_id) ever committed.
-- prev_choice is the choice this row held before its latest update (NULL right after insert); the
-- worker's upsert returns it so that the tally changes in the same statement, atomically per row.
CREATE TABLE ballots (
    poll        text   NOT NULL,
    voter       uuid   NOT NULL,
    choice      text   NOT NULL,
    prev_choice text,
    ts          bigint NOT NULL,
    event_id    uuid   NOT NULL,
    PRIMARY KEY (poll, voter)
) WITH (fillfactor = 90); -- no indexed column changes on update: leave room for HOT updates

-- The exact tally, sharded so that concurrent workers do not wait on one counter row.
-- The count of an option is sum(votes) over its shards; it equals count(*) of its ballots.
CREATE TABLE tallies (
    poll   text     NOT NULL,
    option text     NOT NULL,
    shard  smallint NOT NULL,
    votes  bigint   NOT NULL,
    PRIMARY KEY (poll, option, shard)
);
