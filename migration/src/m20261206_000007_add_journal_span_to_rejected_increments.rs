//! `rejected_increments` gains the journal span of the batch that rejected a
//! row: the stream and its sequences `journal_after + 1 ..= journal_through`
//! (all three null for a write-behind batch).
//!
//! Why: with the journal on, a `wait=true` request waits for its message's
//! sequence to be applied, possibly by another instance. Applied is not
//! written when the stored total would leave `bigint`: the request must then
//! hear `counter-overflow`, and only the span tells which rejected rows held
//! its message. The index serves the one question asked of it, "the highest
//! rejected sequence of this stream", read with the stored offset.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite's ALTER TABLE adds one at a time.
        for column in [
            string_len_null(RejectedIncrements::JournalStream, 255),
            big_integer_null(RejectedIncrements::JournalAfter),
            big_integer_null(RejectedIncrements::JournalThrough),
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(RejectedIncrements::Table)
                        .add_column(column)
                        .to_owned(),
                )
                .await?;
        }
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("idx_rejected_increments_journal")
                    .table(RejectedIncrements::Table)
                    .col(RejectedIncrements::JournalStream)
                    .col(RejectedIncrements::JournalThrough)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("idx_rejected_increments_journal")
                    .table(RejectedIncrements::Table)
                    .to_owned(),
            )
            .await?;
        for column in [
            RejectedIncrements::JournalThrough,
            RejectedIncrements::JournalAfter,
            RejectedIncrements::JournalStream,
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(RejectedIncrements::Table)
                        .drop_column(column)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}

#[derive(DeriveIden)]
enum RejectedIncrements {
    Table,
    JournalStream,
    JournalAfter,
    JournalThrough,
}
