DROP TABLE tallies;
DROP TABLE ballots;
