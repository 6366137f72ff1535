//! `rejected_increments`: deltas a flush could not apply because the stored
//! total would leave `bigint` ("poison rows"). The flush records them here and
//! commits the other keys, so one such key never holds the rest back.
//! Operators inspect and settle them by hand; nothing reads this table.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(RejectedIncrements::Table)
                    .if_not_exists()
                    .col(
                        big_integer(RejectedIncrements::Id)
                            .primary_key()
                            .auto_increment(),
                    )
                    .col(string_len(RejectedIncrements::Key, 255))
                    .col(big_integer(RejectedIncrements::Delta))
                    .col(string(RejectedIncrements::Reason))
                    .col(string_len(RejectedIncrements::BatchId, 36))
                    .col(timestamp_with_time_zone(RejectedIncrements::RejectedAt))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(RejectedIncrements::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum RejectedIncrements {
    Table,
    Id,
    Key,
    Delta,
    Reason,
    BatchId,
    RejectedAt,
}
