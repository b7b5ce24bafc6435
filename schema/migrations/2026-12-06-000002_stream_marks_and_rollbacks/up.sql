-- What the workers have committed of each votes stream, written in the same transaction as the
-- ballots (schema/src/mark.rs): per worker shard, the highest stream sequence of a committed
-- vote, its event id and when the stream stored it. A stream whose last sequence falls below
-- the greatest mark, or that holds another event at the marked sequence, went backwards (a
-- restored disk, a cluster that lost what it had acknowledged): its consumer may skip the
-- sequences it reuses, and the workers take them up again (landslide_nats::rollback).
-- Sharded like the tallies, so that concurrent workers never wait on one row.
CREATE TABLE stream_marks (
    stream    text     NOT NULL,
    shard     smallint NOT NULL,
    sequence  bigint   NOT NULL,
    event_id  uuid,
    stored_ns bigint   NOT NULL,
    PRIMARY KEY (stream, shard)
);

-- Every time a stream was found to have gone backwards: what the workers had committed, what the
-- stream held, and from when they took its messages up again. Audit and `landslide status` name
-- them; nothing deletes them.
CREATE TABLE stream_rollbacks (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream             text        NOT NULL,
    detected_at        timestamptz NOT NULL DEFAULT now(),
    reason             text        NOT NULL,
    mark_sequence      bigint      NOT NULL,
    mark_event_id      uuid,
    stream_last        bigint      NOT NULL,
    consumer_delivered bigint      NOT NULL,
    restarted_from     timestamptz NOT NULL
);

GRANT SELECT, INSERT, UPDATE ON stream_marks TO landslide_write;
GRANT SELECT, INSERT ON stream_rollbacks TO landslide_write;
GRANT SELECT ON stream_marks, stream_rollbacks TO landslide_read;
