//! `journal_offsets` gains `lost_from`: set when the stream was found
//! numbering its messages anew (deleted and created again, or a node that
//! lost the tail of its storage), the lowest sequence seen reused.
//!
//! Why: the stream is then marked lost and nobody reads it until an
//! operator resets the offset, and the right offset depends on what
//! happened: 0 for a stream created again (every message in it is new),
//! the last sequence that survived for a storage that lost its tail (those
//! messages are applied; resetting to 0 would apply them again). Both are
//! `lost_from - 1`; the runbook reads it from here.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(JournalOffsets::Table)
                    .add_column(big_integer_null(JournalOffsets::LostFrom))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(JournalOffsets::Table)
                    .drop_column(JournalOffsets::LostFrom)
                    .to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden)]
enum JournalOffsets {
    Table,
    LostFrom,
}
