//! The Python exceptions: a failed gateway call becomes one carrying its status and every
//! attempt (never a placeholder answer).

use echelon::GatewayError;
use echelon::error::GatewayErrorKind;
use echelon_types::Attempt;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

create_exception!(
    echelon,
    EchelonError,
    PyException,
    "Base of every Echelon error. Attributes: `status` (int, the HTTP status the server \
     would answer), `type` (str, the OpenAI error type), `code` (str or None), `attempts` \
     (list of attempt dicts, possibly empty)."
);
create_exception!(
    echelon,
    AllAttemptsFailed,
    EchelonError,
    "Every candidate of the route failed or was skipped (status 429, 502, 503 or 504). \
     `attempts` lists each try: model, provider, key_id, status, kind, message, latency_ms."
);
create_exception!(
    echelon,
    RouteNotFound,
    EchelonError,
    "The route names no model, task group, echelon, pool or wrapper (status 404)."
);
create_exception!(
    echelon,
    ConfigError,
    EchelonError,
    "The configuration is invalid; the message lists each problem as file:line:col."
);

/// One attempt as a dict: model, provider, key_id, status, kind, message, latency_ms.
fn attempt_dict<'py>(py: Python<'py>, a: &Attempt) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("model", &a.model)?;
    d.set_item("provider", &a.provider)?;
    d.set_item("key_id", a.key_id.as_deref())?;
    d.set_item("status", a.status)?;
    let kind = serde_json::to_value(a.outcome)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    d.set_item("kind", kind)?;
    d.set_item("message", &a.message)?;
    d.set_item("latency_ms", a.latency_ms)?;
    Ok(d)
}

/// The attempts as a list of dicts.
pub(crate) fn attempts_list<'py>(
    py: Python<'py>,
    attempts: &[Attempt],
) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for a in attempts {
        list.append(attempt_dict(py, a)?)?;
    }
    Ok(list)
}

/// The Python exception of a gateway error: `RouteNotFound` for 404, `EchelonError` for a
/// bad request (400), `AllAttemptsFailed` otherwise; with `status`, `type`, `code` and
/// `attempts` set.
pub(crate) fn gateway_error(e: &GatewayError) -> PyErr {
    let message = e.message().to_owned();
    let err = match e.kind() {
        GatewayErrorKind::UnknownRoute => RouteNotFound::new_err(message),
        GatewayErrorKind::BadRequest => EchelonError::new_err(message),
        _ => AllAttemptsFailed::new_err(message),
    };
    Python::attach(|py| {
        let value = err.value(py);
        let set = || -> PyResult<()> {
            value.setattr("status", e.status())?;
            value.setattr("type", e.error_type())?;
            value.setattr("code", e.code())?;
            value.setattr("attempts", attempts_list(py, e.attempts())?)?;
            Ok(())
        };
        match set() {
            Ok(()) => err.clone_ref(py),
            Err(other) => other,
        }
    })
}

/// An `EchelonError` with a status and no attempts (a local failure: a bad argument, a
/// ledger that cannot be opened).
pub(crate) fn local_error(status: u16, message: impl Into<String>) -> PyErr {
    let err = EchelonError::new_err(message.into());
    Python::attach(|py| {
        let value = err.value(py);
        let set = || -> PyResult<()> {
            value.setattr("status", status)?;
            value.setattr(
                "type",
                if status < 500 {
                    "invalid_request_error"
                } else {
                    "api_error"
                },
            )?;
            value.setattr("code", py.None())?;
            value.setattr("attempts", PyList::empty(py))?;
            Ok(())
        };
        match set() {
            Ok(()) => err.clone_ref(py),
            Err(other) => other,
        }
    })
}

/// Adds the exception types to the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("EchelonError", py.get_type::<EchelonError>())?;
    m.add("AllAttemptsFailed", py.get_type::<AllAttemptsFailed>())?;
    m.add("RouteNotFound", py.get_type::<RouteNotFound>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    Ok(())
}
