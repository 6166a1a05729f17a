//! Routing: a request's `model` names a route (a model id, a task group, or one echelon
//! of a task group); the router tries its candidates in order until one answers.

mod model;
mod plan;
mod router;
mod stream;

pub use model::Model;
pub use router::{Completion, Gateway, MAX_RETRY_WAIT, RouteInfo};
pub use stream::GatewayStream;
