//! `flush_batches` gains `settled`: set once the instance that wrote the
//! batch knows its commit landed.
//!
//! Why: a row is what tells a retry of its batch "already committed", so it
//! must outlive every retry. Only the writer can retry, and only while it
//! does not know the outcome (a COMMIT whose answer was lost, then an outage
//! or a shutdown into a spill file). Rows the writer has settled can go
//! after a day; the others are kept far longer (a retry can come days after
//! the first attempt).

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(FlushBatches::Table)
                    .add_column(boolean(FlushBatches::Settled).default(false))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(FlushBatches::Table)
                    .drop_column(FlushBatches::Settled)
                    .to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden)]
enum FlushBatches {
    Table,
    Settled,
}
