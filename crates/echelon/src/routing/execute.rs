//! The plan runner: a route's steps in order under its fallback strategy
//! (`echelon_down`, `task_group_switch`, `provider_failover`; a pool's
//! `instance_rotation` or `simple_retry`), each model tried by `attempt::try_model`.
//!
//! # Waiting for a rate-limited model
//! A request waits for a rate-limited candidate (a 429's Retry-After, its keys'
//! cooldown) only when no other candidate of its plan can take it now (issue 14, item
//! 4: a 429 storm on echelon 1 used to stall every request for the Retry-After while
//! echelon 2 was idle). Such a candidate is set aside ([`Flow::Later`]) and the plan
//! goes on through its remaining candidates — every echelon of the group, then the
//! fallback groups, in plan order. Only when none of them answered does the request
//! sleep until the earliest time a set-aside candidate may be tried (at most
//! [`MAX_RETRY_WAIT`](super::attempt::MAX_RETRY_WAIT) away) and try the candidates
//! whose time came, in plan order; each continues its own retry count, so the waits are
//! bounded as the model's `retry_on.rate_limited` (by default its `max_retries`) bounds
//! them. A route with a single candidate therefore still waits out the Retry-After and
//! retries.
//!
//! A candidate whose wait ends within its `rate_limit_wait` (default 0) is not set
//! aside: `attempt::try_model` sleeps and retries it in place, preferring its tier over
//! the latency of moving on. When every candidate stays rate-limited, the 429 carries
//! the smallest known Retry-After among them (`RequestState::retry_after`).

use std::collections::HashSet;
use std::sync::Arc;

use echelon_types::{Attempt, ChatCompletionRequest, EmbeddingRequest, SkipReason};
use tokio::time::Instant;

use super::attempt::{
    Answer, Flow, Job, ModelTry, RequestState, Resume, context_error, exhausted, try_model,
    unserved_error,
};
use super::gateway::CallOptions;
use super::model::Model;
use super::plan::{Plan, PoolStep, Step, Tier};
use super::pool::{PollingPool, SessionKey};
use crate::error::GatewayError;

/// A candidate set aside because it is rate-limited until `at`.
struct SetAside<'p> {
    at: Instant,
    /// Its place in the plan's order (the order it was first set aside in).
    order: usize,
    tier: &'p Tier,
    model: &'p Arc<Model>,
    /// The pool instance the model stands for, when it came from a pool step.
    pool: Option<(&'p Arc<PollingPool>, usize)>,
    /// Whether it is one of the route's own steps (for the group breaker).
    own: bool,
    state: ModelTry,
}

/// Tries a plan's steps in order under its fallback settings: the same run for every
/// [`Job`] (chat, stream, embeddings).
pub(crate) async fn run_plan(
    plan: &Plan,
    job: Job<'_>,
    session: Option<SessionKey>,
    resume: Option<Arc<Resume>>,
) -> Result<(Answer, Arc<Model>, Vec<Attempt>), GatewayError> {
    let mut st = RequestState::new(plan.max_attempts);
    st.resume = resume;
    let mut failed_providers: HashSet<String> = HashSet::new();
    let mut aside: Vec<SetAside<'_>> = Vec::new();
    // The group breaker guards the group's own steps as a whole.
    let mut group_permit = None;
    let mut skip_own = false;
    if let Some(b) = &plan.group_breaker {
        // Shared through Redis when the state is (`state.backend: redis`); refused too
        // when Redis is down with `on_unavailable: reject`.
        match b.acquire().await {
            Ok(Ok(p)) => group_permit = Some(p),
            Ok(Err(_)) | Err(_) => {
                tracing::info!(route = %job.route(), "group breaker open: going straight to the fallbacks");
                skip_own = true;
            }
        }
    }
    for (i, step) in plan.steps.iter().enumerate() {
        if i < plan.own_steps && skip_own {
            continue;
        }
        if i == plan.own_steps
            && let (Some(b), Some(p)) = (&plan.group_breaker, group_permit.take())
        {
            // Reaching the fallbacks means the group's own steps all failed.
            b.record(p, false);
        }
        if !st.budget_left() {
            break;
        }
        if i > 0
            && let Some(d) = plan.step_delay
            && st.calls() > 0
        {
            tokio::time::sleep(d).await;
        }
        let own = i < plan.own_steps;
        let tier = match step {
            Step::Tier(t) => t,
            Step::Pool(ps) => {
                match run_pool(ps, job, session, &mut st, own, &mut aside).await {
                    Flow::Answered(answer) => {
                        let model = st.answered_by.take();
                        if let (Some(b), Some(p)) = (&plan.group_breaker, group_permit.take()) {
                            b.record(p, own);
                        }
                        if let Some(model) = model {
                            return Ok((answer, model, st.attempts));
                        }
                    }
                    Flow::Stop(e) => return Err(e),
                    Flow::Next | Flow::Later(_) => {}
                }
                continue;
            }
        };
        // The request is not copied per tier: the model name and the echelon's defaults
        // are applied as it is serialized (provider::ProviderRequest).
        let max_output = job.max_output(&tier.defaults);
        for model in tier.ordered() {
            if !st.budget_left() {
                break;
            }
            if let Some(floor) = st.context_floor
                && model.context_window().is_none_or(|w| w <= floor)
            {
                continue;
            }
            if plan.provider_failover && failed_providers.contains(model.provider()) {
                st.skip(
                    model,
                    SkipReason::ProviderFailed,
                    format!(
                        "provider `{}` already failed for this request",
                        model.provider()
                    ),
                );
                continue;
            }
            if st.exceeds_context(model, job, max_output).await {
                continue;
            }
            let calls_before = st.calls();
            let mut state = ModelTry::default();
            let flow = try_model(tier, model, job, &mut st, None, &mut state).await;
            match flow {
                Flow::Answered(answer) => {
                    if let (Some(b), Some(p)) = (&plan.group_breaker, group_permit.take()) {
                        b.record(p, own);
                    }
                    return Ok((answer, model.clone(), st.attempts));
                }
                Flow::Stop(e) => return Err(e),
                Flow::Next | Flow::Later(_) => {
                    if st.calls() > calls_before {
                        failed_providers.insert(model.provider().to_owned());
                    }
                    if let Flow::Later(at) = flow {
                        set_aside(&mut aside, at, tier, model, None, own, state);
                    }
                }
            }
        }
    }
    // Nobody could take the request now: wait for the rate-limited candidates.
    while !aside.is_empty() && st.budget_left() {
        let Some(at) = aside.iter().map(|a| a.at).min() else {
            break;
        };
        tracing::info!(
            route = %job.route(),
            wait_ms = at.saturating_duration_since(Instant::now()).as_millis() as u64,
            candidates = aside.len(),
            "every candidate is rate-limited: waiting for the first to be free"
        );
        tokio::time::sleep_until(at).await;
        let now = Instant::now();
        let (mut due, later): (Vec<_>, Vec<_>) = aside.into_iter().partition(|a| a.at <= now);
        due.sort_by_key(|a| a.order);
        aside = later;
        for mut a in due {
            if !st.budget_left() {
                break;
            }
            // A context-length refusal elsewhere since it was set aside rules it out too.
            if let Some(floor) = st.context_floor
                && a.model.context_window().is_none_or(|w| w <= floor)
            {
                continue;
            }
            let flow = try_model(a.tier, a.model, job, &mut st, a.pool, &mut a.state).await;
            match flow {
                Flow::Answered(answer) => {
                    if let (Some(b), Some(p)) = (&plan.group_breaker, group_permit.take()) {
                        b.record(p, a.own);
                    }
                    return Ok((answer, a.model.clone(), st.attempts));
                }
                Flow::Stop(e) => return Err(e),
                Flow::Next => {}
                Flow::Later(at) => {
                    a.at = at;
                    aside.push(a);
                }
            }
        }
    }
    if let (Some(b), Some(p)) = (&plan.group_breaker, group_permit.take()) {
        b.record(p, false);
    }
    if st.context_refused {
        return Err(context_error(job, st.attempts));
    }
    if st.unserved > 0 && st.unserved == st.attempts.len() {
        return Err(unserved_error(job.route(), st.attempts));
    }
    let stopped = !st.budget_left();
    let retry_after = st.retry_after();
    let mut e = exhausted(job.route(), st.attempts, retry_after);
    if let Some(max) = plan.max_attempts
        && stopped
    {
        e = e.with_note(format!("stopped at max_attempts = {max}"));
    }
    Err(e)
}

/// Sets a rate-limited candidate aside until `at`.
fn set_aside<'p>(
    aside: &mut Vec<SetAside<'p>>,
    at: Instant,
    tier: &'p Tier,
    model: &'p Arc<Model>,
    pool: Option<(&'p Arc<PollingPool>, usize)>,
    own: bool,
    state: ModelTry,
) {
    // At debug: in a 429 storm this is most requests, and the attempt records say it.
    tracing::debug!(
        model = model.id(),
        wait_ms = at.saturating_duration_since(Instant::now()).as_millis() as u64,
        "model rate-limited: trying the next candidate first"
    );
    let order = aside.iter().map(|a| a.order + 1).max().unwrap_or(0);
    aside.push(SetAside {
        at,
        order,
        tier,
        model,
        pool,
        own,
        state,
    });
}

/// A polling pool's turn: instances picked by the pool (sticky for a session), each
/// tried once, moving on by `instance_rotation` or staying by `simple_retry`, up to
/// `max_instance_attempts` calls. A rate-limited instance is set aside in `aside`, and
/// the pool moves on to another (by `simple_retry`, the pool's turn ends).
async fn run_pool<'p>(
    ps: &'p PoolStep,
    job: Job<'_>,
    session: Option<SessionKey>,
    st: &mut RequestState,
    own: bool,
    aside: &mut Vec<SetAside<'p>>,
) -> Flow {
    let mut exclude: Vec<usize> = Vec::new();
    let mut last: Option<usize> = None;
    let max_output = job.max_output(&ps.tier.defaults);
    for _ in 0..ps.max_instance_attempts {
        if !st.budget_left() {
            break;
        }
        let pick = match (ps.simple_retry, last) {
            (true, Some(i)) => Some(i),
            _ => ps.pool.select_shared(session, &exclude).await,
        };
        let Some(i) = pick else {
            break;
        };
        let model = &ps.pool.instances()[i];
        if st.exceeds_context(model, job, max_output).await {
            exclude.push(i);
            last = None;
            continue;
        }
        // The attempt's outcome feeds the instance's health (for a stream, at its end).
        let mut state = ModelTry::default();
        let instance = Some((&ps.pool, i));
        match try_model(&ps.tier, model, job, st, instance, &mut state).await {
            Flow::Answered(answer) => {
                st.answered_by = Some(model.clone());
                return Flow::Answered(answer);
            }
            Flow::Stop(e) => return Flow::Stop(e),
            Flow::Next => {
                exclude.push(i);
                last = Some(i);
            }
            Flow::Later(at) => {
                set_aside(aside, at, &ps.tier, model, instance, own, state);
                if ps.simple_retry {
                    break;
                }
                exclude.push(i);
                last = None;
            }
        }
    }
    Flow::Next
}

/// The key that keeps an embeddings request's caller on one pool instance: the
/// `x-session-id`, else the request's `user` (as [`session_key`] for chat, without the
/// conversation rule: an embeddings request has no turns).
pub(crate) fn embed_session_key(
    req: &EmbeddingRequest,
    options: &CallOptions,
) -> Option<SessionKey> {
    if let Some(s) = options.session_id.as_deref().filter(|s| !s.is_empty()) {
        return Some(SessionKey::new("session", [s.as_bytes()]));
    }
    req.user
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(|u| SessionKey::new("user", [u.as_bytes()]))
}

/// The key that keeps a conversation on one pool instance: the `x-session-id`, else the
/// request's `user`, else — for a request with prior assistant turns — the conversation's
/// opening (its messages up to the first assistant turn), which stays the same as the
/// conversation grows. Single-turn requests have none.
///
/// The key is a fixed-size hash of that value ([`SessionKey`]), never the value: a client
/// chooses it, and it is kept in the pool's sticky map for `session_ttl`.
pub(crate) fn session_key(
    req: &ChatCompletionRequest,
    options: &CallOptions,
) -> Option<SessionKey> {
    if let Some(s) = options.session_id.as_deref().filter(|s| !s.is_empty()) {
        return Some(SessionKey::new("session", [s.as_bytes()]));
    }
    if let Some(u) = req.user.as_deref().filter(|s| !s.is_empty()) {
        return Some(SessionKey::new("user", [u.as_bytes()]));
    }
    let first_assistant = req
        .messages
        .iter()
        .position(|m| m.role == echelon_types::Role::Assistant)?;
    let texts: Vec<String> = req.messages[..first_assistant]
        .iter()
        .map(|m| m.text())
        .collect();
    Some(SessionKey::new(
        "conversation",
        texts.iter().map(|t| t.as_bytes()),
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use echelon_types::{ChatMessage, Role};

    fn req(messages: Vec<ChatMessage>, user: Option<&str>) -> ChatCompletionRequest {
        let mut r = ChatCompletionRequest::new("pool", messages);
        r.user = user.map(str::to_owned);
        r
    }

    fn with_session(id: Option<&str>) -> CallOptions {
        CallOptions {
            session_id: id.map(str::to_owned),
            request_id: None,
        }
    }

    /// Issue 14, item 11: the sticky map keeps a fixed-size hash of what the client
    /// chose, not the value (a 256 KiB `x-session-id` was kept whole).
    #[test]
    fn session_keys_are_fixed_size_hashes_of_the_client_value() {
        assert_eq!(std::mem::size_of::<SessionKey>(), 16);
        let one = vec![ChatMessage::new(Role::User, "hi")];
        let huge = "s".repeat(256 * 1024);
        let k = session_key(&req(one.clone(), None), &with_session(Some(&huge))).unwrap();
        assert!(
            !format!("{k:?}").contains("sss"),
            "no raw value kept: {k:?}"
        );
        assert_eq!(
            Some(k),
            session_key(&req(one.clone(), None), &with_session(Some(&huge))),
            "the same session, the same key"
        );
        let mut other = huge.clone();
        other.push('t');
        assert_ne!(
            Some(k),
            session_key(&req(one.clone(), None), &with_session(Some(&other)))
        );
        // A `user` of the same value is a different key: the kinds do not collide.
        let by_user = session_key(&req(one.clone(), Some(&huge)), &with_session(None)).unwrap();
        assert_ne!(by_user, k);
        // The header wins over `user`; an empty one counts as none.
        assert_eq!(
            session_key(&req(one.clone(), Some(&huge)), &with_session(Some(&huge))),
            Some(k)
        );
        assert_eq!(
            session_key(&req(one.clone(), Some(&huge)), &with_session(Some(""))),
            Some(by_user)
        );
        // Single-turn, no session, no user: none.
        assert_eq!(session_key(&req(one, None), &with_session(None)), None);
    }

    #[test]
    fn a_conversation_keeps_its_key_as_it_grows() {
        let opening = vec![
            ChatMessage::new(Role::System, "be brief"),
            ChatMessage::new(Role::User, "hello"),
            ChatMessage::new(Role::Assistant, "hi"),
        ];
        let mut longer = opening.clone();
        longer.push(ChatMessage::new(Role::User, "and then?"));
        let none = with_session(None);
        let k = session_key(&req(opening.clone(), None), &none).unwrap();
        assert_eq!(session_key(&req(longer, None), &none), Some(k));
        // Parts are length-prefixed: moving text between messages is another key.
        let shifted = vec![
            ChatMessage::new(Role::System, "be brie"),
            ChatMessage::new(Role::User, "fhello"),
            ChatMessage::new(Role::Assistant, "hi"),
        ];
        assert_ne!(session_key(&req(shifted, None), &none), Some(k));
    }
}
