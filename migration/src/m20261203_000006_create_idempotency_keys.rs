//! `idempotency_keys`: the `Idempotency-Key`s whose requests were applied,
//! with a fingerprint of each request's body and when it was applied.
//!
//! Why: a client that got no answer retries, maybe through another instance
//! or after a restart. The transaction that applies a keyed request inserts
//! its key here first; a key already present (and younger than the window)
//! means an earlier copy was applied, and this copy's deltas are left out of
//! the same transaction. So a key is applied at most once, across instances,
//! restarts and ambiguous commits. Rows older than the window are pruned in
//! small batches (the `created_at` index).

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(IdempotencyKeys::Table)
                    .if_not_exists()
                    .col(string_len(IdempotencyKeys::Key, 255).primary_key())
                    .col(big_integer(IdempotencyKeys::Fingerprint))
                    .col(string_len(IdempotencyKeys::BatchId, 36))
                    .col(timestamp_with_time_zone(IdempotencyKeys::CreatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("idx_idempotency_keys_created_at")
                    .table(IdempotencyKeys::Table)
                    .col(IdempotencyKeys::CreatedAt)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(IdempotencyKeys::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum IdempotencyKeys {
    Table,
    Key,
    Fingerprint,
    BatchId,
    CreatedAt,
}
