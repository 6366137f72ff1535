//! The HTTP layer's front door: everything between the socket and the
//! handlers, in the order a request meets it:
//!
//! 1. [`server`]: connection cap, HTTP/1.1 (hyper) with the header deadline
//!    and the keep-alive idle timeout.
//! 2. [`front_door`]: observation ([`observe`]: span and metrics) around the
//!    request [`limits`] (in flight, body), the fast path and the router;
//!    errors become problem documents ([`problem`]).
//! 3. [`intake`]: the media type check, the body decoder and
//!    [`intake::Intake`], the one place increments are taken, shared by the
//!    fast path and the operations in [`crate::routes`].

pub mod front_door;
pub mod intake;
pub mod limits;
pub mod observe;
pub mod problem;
pub mod server;

pub use front_door::{FrontDoor, RouteTable};
pub use problem::{ApiError, Problem, ProblemJson, ProblemType};
