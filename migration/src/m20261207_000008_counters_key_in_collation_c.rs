//! `counters.key` in collation `"C"` on PostgreSQL, and the `key COLLATE
//! "C"` expression index dropped.
//!
//! Why: the listing needs keys in code-point order, which the database's
//! collation may not give, so migration 4 added an index on `key COLLATE
//! "C"` beside the primary key. Every flush's upsert that cannot update a
//! row in place (HOT) then wrote two index entries per key, not one. With
//! the primary key itself in `"C"` (bytewise, which is also the order a
//! batch's keys are sorted and locked in) one index serves both, and
//! equality is unchanged: it was already bytewise.
//!
//! The change rebuilds the primary key's index under an exclusive lock on
//! `counters` (flushes wait meanwhile; nothing is lost): seconds per million
//! keys. SQLite's `BINARY` collation is bytewise already: nothing to do.

use sea_orm_migration::{prelude::*, sea_orm::DatabaseBackend};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DatabaseBackend::Postgres {
            return Ok(());
        }
        let db = manager.get_connection();
        db.execute_unprepared(
            r#"ALTER TABLE counters ALTER COLUMN key TYPE varchar(255) COLLATE "C""#,
        )
        .await?;
        db.execute_unprepared("DROP INDEX IF EXISTS counters_key_c")
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DatabaseBackend::Postgres {
            return Ok(());
        }
        let db = manager.get_connection();
        db.execute_unprepared(
            r#"ALTER TABLE counters ALTER COLUMN key TYPE varchar(255) COLLATE "default""#,
        )
        .await?;
        db.execute_unprepared(
            r#"CREATE INDEX IF NOT EXISTS counters_key_c ON counters (key COLLATE "C")"#,
        )
        .await?;
        Ok(())
    }
}
