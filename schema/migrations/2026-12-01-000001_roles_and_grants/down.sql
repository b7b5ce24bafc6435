-- The grants go; the group roles stay, since they belong to the server and other databases may
-- use them (DROP ROLE landslide_write, landslide_read by hand once none does).
ALTER DEFAULT PRIVILEGES REVOKE SELECT ON TABLES FROM landslide_read;
REVOKE ALL ON __diesel_schema_migrations FROM landslide_write, landslide_read;
REVOKE ALL ON ballots, tallies FROM landslide_write, landslide_read;
