//! Routing: a request's `model` names a route (a model id, a task group, or one echelon
//! of a task group); the router tries its candidates in order until one answers.

mod admin;
mod admit;
mod attempt;
mod model;
mod plan;
pub(crate) mod pool;
mod router;
mod stats;
mod stream;

pub use admin::{
    AdminState, BreakerPhase, BreakerView, BucketView, EchelonState, GroupBreakerView,
    KeyStateView, KeyView, ModelState, PoolState, RouteState,
};
pub use attempt::MAX_RETRY_WAIT;
pub use model::Model;
pub use pool::InstanceSnapshot;
pub use router::{
    CallOptions, Completion, DEFAULT_ROUTE_ALIAS, Gateway, LlmHandle, NodeRoutes, RouteInfo,
};
pub use stats::{FALLBACK_HISTORY_LEN, FallbackEvent, StatsSnapshot};
pub use stream::GatewayStream;
