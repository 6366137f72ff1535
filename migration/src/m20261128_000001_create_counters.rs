//! `counters`: one row per key, holding the sum of every increment written so far.
//!
//! `key` is `varchar(255)`, the API's key limit; keys are stored verbatim.
//! `value` is `bigint`: the API accepts the whole signed 64-bit range.
//! Timestamps carry no database default: the flusher binds them, so both
//! backends store the same format (SQLite's `CURRENT_TIMESTAMP` text differs
//! from what SeaORM writes).

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Counters::Table)
                    .if_not_exists()
                    .col(string_len(Counters::Key, 255).primary_key())
                    .col(big_integer(Counters::Value))
                    .col(timestamp_with_time_zone(Counters::CreatedAt))
                    .col(timestamp_with_time_zone(Counters::UpdatedAt))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Counters::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Counters {
    Table,
    Key,
    Value,
    CreatedAt,
    UpdatedAt,
}
