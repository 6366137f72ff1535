//! `journal_offsets`: per journal stream, the stream sequence through which
//! every message has been applied to `counters`, and which instance holds the
//! writer lease.
//!
//! Why: with the journal on, a message may be read again after a crash
//! between the commit that applied it and the purge that removes it. The
//! transaction that applies messages moves `applied_through` from the value
//! its batch started at to the batch's last sequence, and only if it still
//! holds the start value; so a range of messages is applied once, whoever
//! reads it and however often. The lease only keeps instances from reading
//! the same messages at once (wasted work); correctness does not rest on it.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(JournalOffsets::Table)
                    .if_not_exists()
                    .col(string_len(JournalOffsets::Stream, 255).primary_key())
                    .col(big_integer(JournalOffsets::AppliedThrough))
                    .col(string_len_null(JournalOffsets::Writer, 255))
                    .col(big_integer(JournalOffsets::LeaseUntilMs))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(JournalOffsets::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum JournalOffsets {
    Table,
    Stream,
    AppliedThrough,
    Writer,
    LeaseUntilMs,
}
