//! The service through its real router and a real database (SQLite always,
//! PostgreSQL when `TEST_DATABASE_URL` is set).

mod helpers;

mod admin;
mod counters;
mod docs;
mod durability;
mod faults;
mod flush;
mod front_door;
mod health;
mod idempotency;
mod increment;
mod journal;
mod limits;
mod metrics;
mod parity;
mod shutdown;
mod startup;
