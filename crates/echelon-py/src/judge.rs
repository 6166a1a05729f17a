//! The judge from Python (seed 003): items in, judgements out, in input order. A failed
//! item carries `error` and no score — never a default number.

use std::sync::Arc;

use echelon::judge::{JudgeConfig, JudgeItem};
use pyo3::prelude::*;
use serde_json::Value;

use crate::convert::from_py;
use crate::errors::local_error;

/// A judge over a gateway route: `await judge.score(items)` / `judge.score_sync(items)`.
#[pyclass(frozen, module = "echelon._native")]
pub(crate) struct Judge {
    inner: Arc<echelon::judge::Judge>,
}

impl Judge {
    /// A judge with `config` over `gateway`.
    ///
    /// # Errors
    /// `EchelonError` (400) for an unknown route, a rubric without `{response}`, a bad
    /// score pattern or a cache that cannot be opened.
    pub(crate) fn new(gateway: Arc<echelon::Gateway>, config: JudgeConfig) -> PyResult<Judge> {
        let inner = echelon::judge::Judge::new(gateway, config)
            .map_err(|e| local_error(400, format!("judge: {e}")))?;
        Ok(Judge {
            inner: Arc::new(inner),
        })
    }
}

/// Items from Python dicts (`id`, `prompt`, `response`, optional `reference`; in pairwise
/// mode `response_a` and `response_b` instead of `response`; other keys are kept and
/// echoed).
fn items_of(items: &Bound<'_, PyAny>, pairwise: bool) -> PyResult<Vec<JudgeItem>> {
    let mut out = Vec::new();
    for (i, item) in items.try_iter()?.enumerate() {
        let value = from_py(&item?)?;
        let line = serde_json::to_string(&value).unwrap_or_default();
        let parsed = if pairwise {
            JudgeItem::from_json_line_pairwise(&line)
        } else {
            JudgeItem::from_json_line(&line)
        }
        .map_err(|e| local_error(400, format!("items[{i}]: {e}")))?;
        out.push(parsed);
    }
    Ok(out)
}

/// Judgements as a JSON array of objects (a list of dicts in Python).
fn results(judgements: &[echelon::judge::Judgement]) -> Value {
    Value::Array(judgements.iter().map(|j| j.to_value()).collect())
}

/// Every item judged, at most `concurrency` at once, in input order.
async fn judge_all(
    judge: Arc<echelon::judge::Judge>,
    items: Vec<JudgeItem>,
) -> Vec<echelon::judge::Judgement> {
    futures::future::join_all(items.iter().map(|item| judge.judge_one(item))).await
}

impl Judge {
    /// Whether the judge compares two responses (`mode="pairwise"`).
    fn pairwise(&self) -> bool {
        self.inner.config().mode == echelon::judge::JudgeMode::Pairwise
    }
}

#[pymethods]
impl Judge {
    /// `await judge.score(items)` → a list of result dicts in input order: `id`, `score`,
    /// `reward` (score + length penalty), `length_penalty`, `raw` (the judge's last
    /// reply), `attempts`, `reasks`, `cached`, `cost` (USD), `tokens`, `latency_ms`, and
    /// on failure `error` with `score`/`reward` None — never a default number.
    fn score<'py>(
        &self,
        py: Python<'py>,
        items: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let items = items_of(items, self.pairwise())?;
        let judge = self.inner.clone();
        crate::bridge::awaitable(
            py,
            async move { Ok(results(&judge_all(judge, items).await)) },
        )
    }

    /// [`score`](Self::score), blocking the thread (not the GIL).
    fn score_sync(&self, py: Python<'_>, items: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let items = items_of(items, self.pairwise())?;
        let judge = self.inner.clone();
        let done = crate::block_on(py, judge_all(judge, items))?;
        crate::bridge::IntoPython::into_python(results(&done), py)
    }

    /// The route the judge asks on (the default route resolved).
    #[getter]
    fn route(&self) -> String {
        self.inner.config().route.clone()
    }

    fn __repr__(&self) -> String {
        format!("<echelon.Judge route={:?}>", self.inner.config().route)
    }
}
