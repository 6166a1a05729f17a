//! A minimal OTLP/HTTP trace receiver (issue 18): `POST /v1/traces` with a protobuf
//! `ExportTraceServiceRequest` (decoded with `opentelemetry-proto`), every span kept
//! for the test to read. Anything else gets 404; a body that does not decode gets 400.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// One span as the receiver got it.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    /// The span's name.
    pub name: String,
    /// The trace id, 32 lowercase hex digits.
    pub trace_id: String,
    /// The span id, 16 lowercase hex digits.
    pub span_id: String,
    /// The parent's span id, 16 hex digits; empty for a root span.
    pub parent_span_id: String,
    /// The span kind as OTLP numbers it (1 internal, 2 server, 3 client, …).
    pub kind: i32,
    /// The status code as OTLP numbers it (0 unset, 1 ok, 2 error).
    pub status_code: i32,
    /// When it started, in nanoseconds since the Unix epoch.
    pub start_unix_nanos: u64,
    /// When it ended, in nanoseconds since the Unix epoch.
    pub end_unix_nanos: u64,
    /// Its attributes, the values as JSON (string, integer, float, bool).
    pub attributes: BTreeMap<String, Value>,
    /// Its events: name and attributes.
    pub events: Vec<(String, BTreeMap<String, Value>)>,
    /// The `service.name` of its resource.
    pub service_name: Option<String>,
}

impl ReceivedSpan {
    /// The attribute `key` as a string (a number or bool printed), if present.
    pub fn attr(&self, key: &str) -> Option<String> {
        self.attributes.get(key).map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    }
}

/// A running OTLP/HTTP receiver on 127.0.0.1; dropping it stops it.
pub struct OtlpReceiver {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    exports: Arc<Mutex<usize>>,
    _stop: oneshot::Sender<()>,
}

impl OtlpReceiver {
    /// Starts a receiver on a free port of 127.0.0.1.
    ///
    /// # Errors
    /// The listener's error when the port cannot be bound.
    pub async fn start() -> std::io::Result<OtlpReceiver> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let spans = Arc::new(Mutex::new(Vec::new()));
        let exports = Arc::new(Mutex::new(0));
        let (tx, mut rx) = oneshot::channel::<()>();
        let (s, e) = (spans.clone(), exports.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut rx => break,
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let (s, e) = (s.clone(), e.clone());
                        tokio::spawn(async move {
                            let service = service_fn(move |req| {
                                let (s, e) = (s.clone(), e.clone());
                                async move { Ok::<_, std::convert::Infallible>(handle(req, s, e).await) }
                            });
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                }
            }
        });
        Ok(OtlpReceiver {
            addr,
            spans,
            exports,
            _stop: tx,
        })
    }

    /// The base URL to configure as `telemetry.otlp_endpoint` (`http://127.0.0.1:PORT`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Export requests received so far.
    pub fn exports(&self) -> usize {
        self.exports.lock().map(|n| *n).unwrap_or_default()
    }
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    exports: Arc<Mutex<usize>>,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: Vec<u8>| {
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/x-protobuf"),
        );
        resp
    };
    if req.method() != hyper::Method::POST || req.uri().path() != "/v1/traces" {
        return reply(StatusCode::NOT_FOUND, Vec::new());
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return reply(StatusCode::BAD_REQUEST, Vec::new()),
    };
    let Ok(export) = ExportTraceServiceRequest::decode(body) else {
        return reply(StatusCode::BAD_REQUEST, Vec::new());
    };
    let mut got = Vec::new();
    for rs in export.resource_spans {
        let service_name = rs
            .resource
            .as_ref()
            .and_then(|r| attributes(&r.attributes).remove("service.name"))
            .and_then(|v| v.as_str().map(str::to_owned));
        for ss in rs.scope_spans {
            for span in ss.spans {
                got.push(ReceivedSpan {
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    kind: span.kind,
                    status_code: span.status.map_or(0, |s| s.code),
                    start_unix_nanos: span.start_time_unix_nano,
                    end_unix_nanos: span.end_time_unix_nano,
                    attributes: attributes(&span.attributes),
                    events: span
                        .events
                        .into_iter()
                        .map(|e| (e.name, attributes(&e.attributes)))
                        .collect(),
                    service_name: service_name.clone(),
                });
            }
        }
    }
    if let Ok(mut s) = spans.lock() {
        s.extend(got);
    }
    if let Ok(mut n) = exports.lock() {
        *n += 1;
    }
    reply(
        StatusCode::OK,
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, Value> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), value(kv.value.as_ref())))
        .collect()
}

fn value(v: Option<&AnyValue>) -> Value {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => Value::String(s.clone()),
        Some(any_value::Value::BoolValue(b)) => Value::Bool(*b),
        Some(any_value::Value::IntValue(i)) => Value::from(*i),
        Some(any_value::Value::DoubleValue(f)) => Value::from(*f),
        Some(other) => Value::String(format!("{other:?}")),
        None => Value::Null,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
