//! Indexes for reading by key range and for a batch's rejected rows.
//!
//! `GET /counters` lists keys in code-point order (bytewise on UTF-8) and
//! finds a prefix as the range `[prefix, successor(prefix))`. PostgreSQL
//! compares text by the database's collation, in which neither holds (and
//! the primary key's index follows that collation), so on PostgreSQL the
//! listing compares `key COLLATE "C"`, served by this expression index.
//! SQLite's BINARY collation is that order already: its primary key serves.
//!
//! `rejected_increments (batch_id)`: a `wait=true` request whose flush
//! rejected rows asks which keys of its batch they were.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        if manager.get_database_backend() == sea_orm_migration::sea_orm::DatabaseBackend::Postgres {
            db.execute_unprepared(
                r#"CREATE INDEX IF NOT EXISTS counters_key_c ON counters (key COLLATE "C")"#,
            )
            .await?;
        }
        db.execute_unprepared(
            "CREATE INDEX IF NOT EXISTS rejected_increments_batch_id ON rejected_increments (batch_id)",
        )
        .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared("DROP INDEX IF EXISTS rejected_increments_batch_id")
            .await?;
        if manager.get_database_backend() == sea_orm_migration::sea_orm::DatabaseBackend::Postgres {
            db.execute_unprepared("DROP INDEX IF EXISTS counters_key_c")
                .await?;
        }
        Ok(())
    }
}
