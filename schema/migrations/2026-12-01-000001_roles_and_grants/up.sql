-- Least privilege (schema/src/postgres/roles.rs, README "Database users"). The tables belong to
-- whoever runs the migrations (`landslide migrate`); the processes connect as login roles that
-- are members of one of these two groups, which get only what their processes use:
--   landslide_write: the workers and replay read and upsert ballots and tallies (the upsert's
--                    ON CONFLICT ... WHERE and RETURNING read the rows): SELECT, INSERT, UPDATE;
--                    never DELETE, TRUNCATE or DDL;
--   landslide_read:  tally, audit, export and status read.
--
-- Roles belong to the whole server, not to one database: each is created only if it is missing.
-- Migrations of different databases on one server (each test's own; two deployments') may create
-- the same role at once, and the advisory lock of `migrate` is per database: the loser of such a
-- race gets duplicate_object, or unique_violation when both passed the check before either
-- committed. Both mean that the role exists.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'landslide_write') THEN
        BEGIN
            CREATE ROLE landslide_write NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'landslide_read') THEN
        BEGIN
            CREATE ROLE landslide_read NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
END
$$;

GRANT SELECT, INSERT, UPDATE ON ballots, tallies TO landslide_write;
GRANT SELECT ON ballots, tallies TO landslide_read;

-- Every role checks at startup that the schema is as current as its binary.
GRANT SELECT ON __diesel_schema_migrations TO landslide_write, landslide_read;

-- A table that a later migration creates is readable by the readers without a grant of its own.
-- Writing one is not granted by default: a later migration says what the workers may write.
ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO landslide_read;

-- Before PostgreSQL 15 every role could create tables in the public schema (15 took that right
-- away). Taking it away here keeps the workers from DDL on older servers too (RDS still offers
-- them). Only the schema's owner can revoke it; for anyone else this is a warning, not an error.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
