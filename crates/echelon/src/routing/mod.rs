//! Routing: a request's `model` names a route (a model id, a task group, one echelon of a
//! task group, a polling pool or a wrapper); its candidates are tried in order until one
//! answers.
//!
//! Where things are:
//! - [`topology`](Topology): `Config → Topology`, pure (models, echelons, pools, plans);
//! - `gateway`: [`Gateway`] owns the current topology (swappable), the state registry,
//!   the record sink and the background tasks;
//! - `execute`: the plan runner (fallback strategies across steps and pool instances);
//! - `attempt`: one model's retry and backoff policy; `admit`: one attempt's admission
//!   steps in order (the steps themselves are in `resilience::admission`);
//! - `stream`: a started stream, reported to its tickets when it ends;
//! - `cancel`: the 499 record of a request its caller abandoned before the answer;
//! - `admin`: the typed `/admin/state`.

mod admin;
mod admit;
mod attempt;
mod cancel;
mod execute;
mod gateway;
mod model;
mod plan;
pub(crate) mod pool;
mod stats;
mod stream;
mod topology;

pub use admin::{
    AdminState, BreakerPhase, BreakerView, BucketView, EchelonState, GroupBreakerView,
    KeyStateView, KeyView, ModelState, PoolState, RouteState,
};
pub use attempt::MAX_RETRY_WAIT;
pub use gateway::{CallOptions, Completion, Embeddings, Gateway, LlmHandle};
pub use model::Model;
pub use pool::InstanceSnapshot;
pub use stats::{FALLBACK_HISTORY_LEN, FallbackEvent, StatsSnapshot};
pub use stream::GatewayStream;
pub use topology::{DEFAULT_ROUTE_ALIAS, NodeRoutes, RouteInfo, Topology};
