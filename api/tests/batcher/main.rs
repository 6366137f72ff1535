//! The batcher on its own, without HTTP or a database: its arithmetic under
//! adversarial concurrency and as properties over random operations.

mod concurrency;
mod properties;
