//! `SeaORM` Entity for `journal_offsets` (see the migration for why it exists).

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Eq)]
#[sea_orm(table_name = "journal_offsets")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub stream: String,
    pub applied_through: i64,
    pub writer: Option<String>,
    pub lease_until_ms: i64,
    /// Set when the stream was found numbering its messages anew: the lowest
    /// sequence seen reused (see the runbook IncrementJournalStreamLost).
    pub lost_from: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
