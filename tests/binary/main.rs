//! The real `increment` binary as a process: started on a free port against
//! a fresh database, loaded over HTTP, stopped by SIGTERM or killed.

mod crash;
mod e2e;
mod idempotency;
mod journal;
mod logs;
mod service;
mod slow_clients;
