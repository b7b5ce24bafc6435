//! Landslide's integration tests: real nats-server, real PostgreSQL, each test isolated.

mod pipeline;
mod support;
mod trace;
mod worker;
