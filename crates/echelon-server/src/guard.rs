//! The checks every request passes before routing: its `Host` names this gateway
//! ([`host`](crate::host)), and its `Origin`, if any, is a configured one
//! ([`cors`](crate::cors)).
//!
//! One tower layer rather than `axum::middleware::from_fn` per check: a `from_fn` layer
//! clones its inner service and boxes a future on every request, which measured as
//! about a tenth of the gateway's CPU per small request with two of them. Here a request
//! without `Origin` that passes the `Host` check goes straight to the inner service's
//! own future; only a refusal, a preflight and an allowed origin's answer (which gets
//! CORS headers) take a boxed future.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use futures::future::{BoxFuture, Either};
use tower::{Layer, Service};

use crate::cors::{self, CorsOrigins, OriginCheck};
use crate::host::{self, AllowedHosts};

/// What the guard checks against (cheap to clone).
#[derive(Debug, Clone)]
pub(crate) struct GuardLayer {
    hosts: Arc<AllowedHosts>,
    cors: Arc<CorsOrigins>,
}

impl GuardLayer {
    /// From `server.allowed_hosts` and `server.cors_origins`.
    pub(crate) fn new(allowed_hosts: &[String], cors_origins: &[String]) -> Self {
        GuardLayer {
            hosts: Arc::new(AllowedHosts::new(allowed_hosts)),
            cors: Arc::new(CorsOrigins::new(cors_origins)),
        }
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            config: self.clone(),
        }
    }
}

/// The service [`GuardLayer`] wraps around the router.
#[derive(Debug, Clone)]
pub(crate) struct Guard<S> {
    inner: S,
    config: GuardLayer,
}

impl<S> Service<Request> for Guard<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<S::Future, BoxFuture<'static, Result<Response, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let answer = |resp: Response| -> Self::Future {
            Either::Right(Box::pin(std::future::ready(Ok(resp))))
        };
        if let Err(e) = host::check(&self.config.hosts, &req) {
            return answer(e.into_response());
        }
        match cors::check(&self.config.cors, &req) {
            OriginCheck::Absent => Either::Left(self.inner.call(req)),
            OriginCheck::Refused(e) => answer(e.into_response()),
            OriginCheck::Preflight(resp) => answer(resp),
            OriginCheck::Allowed(origin) => {
                let served = self.inner.call(req);
                Either::Right(Box::pin(async move {
                    let mut resp = served.await?;
                    cors::add_headers(&mut resp, origin);
                    Ok(resp)
                }))
            }
        }
    }
}
