//! The plan runner: a route's steps in order under its fallback strategy
//! (`echelon_down`, `task_group_switch`, `provider_failover`; a pool's
//! `instance_rotation` or `simple_retry`), each model tried by `attempt::try_model`.

use std::collections::HashSet;
use std::sync::Arc;

use echelon_types::{Attempt, ChatCompletionRequest, SkipReason};

use super::attempt::{Answer, Flow, RequestState, context_error, exhausted, try_model};
use super::gateway::CallOptions;
use super::model::Model;
use super::plan::{Plan, PoolStep, Step};
use crate::error::GatewayError;

/// Tries a plan's steps in order under its fallback settings.
pub(crate) async fn run_plan(
    plan: &Plan,
    req: &ChatCompletionRequest,
    stream: bool,
    session: Option<&str>,
) -> Result<(Answer, Arc<Model>, Vec<Attempt>), GatewayError> {
    let mut st = RequestState::new(plan.max_attempts);
    let mut failed_providers: HashSet<String> = HashSet::new();
    // The group breaker guards the group's own steps as a whole.
    let mut group_permit = None;
    let mut skip_own = false;
    if let Some(b) = &plan.group_breaker {
        match b.try_acquire() {
            Ok(p) => group_permit = Some(p),
            Err(_) => {
                tracing::info!(route = %req.model, "group breaker open: going straight to the fallbacks");
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
        let tier = match step {
            Step::Tier(t) => t,
            Step::Pool(ps) => {
                match run_pool(ps, req, stream, session, &mut st).await {
                    Flow::Answered(answer) => {
                        let model = st.answered_by.take();
                        if let (Some(b), Some(p)) = (&plan.group_breaker, group_permit.take()) {
                            b.record(p, i < plan.own_steps);
                        }
                        if let Some(model) = model {
                            return Ok((answer, model, st.attempts));
                        }
                    }
                    Flow::Stop(e) => return Err(e),
                    Flow::Next => {}
                }
                continue;
            }
        };
        // The request is not copied per tier: the model name and the echelon's defaults
        // are applied as it is serialized (provider::ProviderRequest).
        let max_output = tier.defaults.max_output_tokens(req);
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
            if st.exceeds_context(model, req, max_output).await {
                continue;
            }
            let calls_before = st.calls();
            match try_model(tier, model, req, stream, &mut st, None).await {
                Flow::Answered(answer) => {
                    if let (Some(b), Some(p)) = (&plan.group_breaker, group_permit.take()) {
                        b.record(p, i < plan.own_steps);
                    }
                    return Ok((answer, model.clone(), st.attempts));
                }
                Flow::Stop(e) => return Err(e),
                Flow::Next => {
                    if st.calls() > calls_before {
                        failed_providers.insert(model.provider().to_owned());
                    }
                }
            }
        }
    }
    if let (Some(b), Some(p)) = (&plan.group_breaker, group_permit.take()) {
        b.record(p, false);
    }
    if st.context_refused {
        return Err(context_error(st.attempts));
    }
    let stopped = !st.budget_left();
    let mut e = exhausted(&req.model, st.attempts);
    if let Some(max) = plan.max_attempts
        && stopped
    {
        e = e.with_note(format!("stopped at max_attempts = {max}"));
    }
    Err(e)
}

/// A polling pool's turn: instances picked by the pool (sticky for a session), each
/// tried once, moving on by `instance_rotation` or staying by `simple_retry`, up to
/// `max_instance_attempts` calls.
async fn run_pool(
    ps: &PoolStep,
    req: &ChatCompletionRequest,
    stream: bool,
    session: Option<&str>,
    st: &mut RequestState,
) -> Flow {
    let mut exclude: Vec<usize> = Vec::new();
    let mut last: Option<usize> = None;
    let max_output = ps.tier.defaults.max_output_tokens(req);
    for _ in 0..ps.max_instance_attempts {
        if !st.budget_left() {
            break;
        }
        let pick = match (ps.simple_retry, last) {
            (true, Some(i)) => Some(i),
            _ => ps.pool.select(session, &exclude),
        };
        let Some(i) = pick else {
            break;
        };
        let model = &ps.pool.instances()[i];
        if st.exceeds_context(model, req, max_output).await {
            exclude.push(i);
            last = None;
            continue;
        }
        // The attempt's outcome feeds the instance's health (for a stream, at its end).
        match try_model(&ps.tier, model, req, stream, st, Some((&ps.pool, i))).await {
            Flow::Answered(answer) => {
                st.answered_by = Some(model.clone());
                return Flow::Answered(answer);
            }
            Flow::Stop(e) => return Flow::Stop(e),
            Flow::Next => {
                exclude.push(i);
                last = Some(i);
            }
        }
    }
    Flow::Next
}

/// The key that keeps a conversation on one pool instance: the `x-session-id`, else the
/// request's `user`, else — for a request with prior assistant turns — a hash of the
/// conversation's opening (its messages up to the first assistant turn), which stays
/// the same as the conversation grows. Single-turn requests have none.
pub(crate) fn session_key(req: &ChatCompletionRequest, options: &CallOptions) -> Option<String> {
    if let Some(s) = options.session_id.as_deref().filter(|s| !s.is_empty()) {
        return Some(format!("session:{s}"));
    }
    if let Some(u) = req.user.as_deref().filter(|s| !s.is_empty()) {
        return Some(format!("user:{u}"));
    }
    let first_assistant = req
        .messages
        .iter()
        .position(|m| m.role == echelon_types::Role::Assistant)?;
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for m in &req.messages[..first_assistant] {
        m.text().hash(&mut h);
    }
    Some(format!("conversation:{:016x}", h.finish()))
}
