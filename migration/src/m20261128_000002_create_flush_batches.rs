//! `flush_batches`: the id of every flush that committed, written in the same
//! transaction as its upserts.
//!
//! Why: when the connection breaks while COMMIT is in flight, the flusher
//! cannot know whether the batch landed. It retries the *same* batch with the
//! same id; the insert into this table then finds the id and the retry is
//! skipped, so no increment is added twice. The flusher prunes old rows (how
//! old: migration 10, which adds `settled`).

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(FlushBatches::Table)
                    .if_not_exists()
                    .col(string_len(FlushBatches::BatchId, 36).primary_key())
                    .col(big_integer(FlushBatches::Keys))
                    .col(timestamp_with_time_zone(FlushBatches::CommittedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_flush_batches_committed_at")
                    .table(FlushBatches::Table)
                    .col(FlushBatches::CommittedAt)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(FlushBatches::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum FlushBatches {
    Table,
    BatchId,
    Keys,
    CommittedAt,
}
