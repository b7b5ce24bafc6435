//! `landslide-goose`: a goose load test of the voting path that checks the tally afterwards.

fn main() {}
