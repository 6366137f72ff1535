//! Schema migrations for `increment`.
//!
//! Applied migrations are never edited: a schema change is a new migration.
//! The service applies pending ones at start (unless `--no-migrate`); operators
//! can also run `sea-orm-cli migrate up` or `cargo run -p migration -- up`.

pub use sea_orm_migration::prelude::*;

mod m20261128_000001_create_counters;
mod m20261128_000002_create_flush_batches;
mod m20261128_000003_create_rejected_increments;
mod m20261201_000004_create_key_order_indexes;
mod m20261202_000005_create_journal_offsets;
mod m20261203_000006_create_idempotency_keys;
mod m20261206_000007_add_journal_span_to_rejected_increments;
mod m20261207_000008_counters_key_in_collation_c;
mod m20261207_000009_add_lost_from_to_journal_offsets;
mod m20261208_000010_add_settled_to_flush_batches;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261128_000001_create_counters::Migration),
            Box::new(m20261128_000002_create_flush_batches::Migration),
            Box::new(m20261128_000003_create_rejected_increments::Migration),
            Box::new(m20261201_000004_create_key_order_indexes::Migration),
            Box::new(m20261202_000005_create_journal_offsets::Migration),
            Box::new(m20261203_000006_create_idempotency_keys::Migration),
            Box::new(m20261206_000007_add_journal_span_to_rejected_increments::Migration),
            Box::new(m20261207_000008_counters_key_in_collation_c::Migration),
            Box::new(m20261207_000009_add_lost_from_to_journal_offsets::Migration),
            Box::new(m20261208_000010_add_settled_to_flush_batches::Migration),
        ]
    }
}
