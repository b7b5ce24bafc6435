//! Landslide's integration tests: real nats-server, real PostgreSQL, each test isolated.

mod audit;
mod pipeline;
mod support;
mod tally;
mod trace;
mod worker;
