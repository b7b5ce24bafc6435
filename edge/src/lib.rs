//! What the public HTTP roles, ingest and tally, share at the edge: who the client of a request
//! is ([`client`]: its address, from a trusted proxy's header where one is configured, an IPv6
//! client by its /64), and the limits per client that keep one client from taking what every
//! voter needs ([`rate_limit`]: a token bucket per client; [`slots`]: a cap on what one client
//! holds at once, such as live result streams).
//!
//! Nothing here knows votes or results: the roles decide what to limit and what to answer.

pub mod client;
pub mod rate_limit;
pub mod slots;

pub use client::{Client, ClientIpHeader};
pub use rate_limit::{Limiter, RateLimit};
pub use slots::Slots;
