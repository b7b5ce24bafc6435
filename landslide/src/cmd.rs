//! One module per subcommand of `landslide`, each with its flags (`Args`) and its `run`; `args`
//! holds the argument groups that several commands share, and `role` how the three roles start.

pub mod args;
pub mod audit;
pub mod certs;
pub mod db_users;
pub mod dedup_worker;
pub mod export;
pub mod ingest;
pub mod keygen;
pub mod migrate;
pub mod nats_password_hash;
pub mod polls;
pub mod replay;
pub mod role;
pub mod status;
pub mod tally;
pub mod up;
pub mod verify;
