//! Landslide's integration tests: real nats-server, real PostgreSQL, each test isolated.

// A failed setup step is a failed test: panicking with a message is the point here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod audit;
mod auth;
mod browser;
mod chaos;
mod cli;
mod clock;
mod database;
mod edge;
mod openapi;
mod partitions;
mod pipeline;
mod polls;
mod power_cut;
mod publish;
mod replay;
mod rollback;
mod schema;
mod streams;
mod support;
mod tally;
mod trace;
mod up;
mod worker;
