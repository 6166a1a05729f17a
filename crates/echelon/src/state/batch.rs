//! The admission of one candidate in one round trip (issue 15): the shared steps of
//! every unit it must pass (breaker, token buckets, concurrency leases, the key pool's
//! read) run in one Lua script, in admission order, atomically. Either every step
//! admits, or the first that refuses is named and every earlier one is undone in the
//! same script (a bucket's tokens refunded, a half-open probe slot freed, a lease
//! removed), so nothing is held for a candidate that was turned away.
//!
//! The script is made of the units' own Lua functions (`BREAKER_LUA`, `BUCKET_LUA`,
//! `LEASE_LUA`, `POOL_LUA`), the same ones their single-step scripts run: there is one
//! copy of each rule, in Lua, and one in Rust to read its answer (next to the unit).

use std::sync::{Arc, LazyLock};

use redis::{Script, Value};

use super::redis::{Arg, NOW_MS, RedisState, ToRedisArgsDyn, Unavailable};
use crate::resilience::breaker::BREAKER_LUA;
use crate::resilience::concurrency::LEASE_LUA;
use crate::resilience::key_pool::POOL_LUA;
use crate::resilience::token_bucket::BUCKET_LUA;

/// Which unit's Lua function a step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// `breaker(key, {'acquire', half_open_requests})`.
    Breaker,
    /// `bucket(key, {'reserve', capacity, refill/s, n, max wait ms, ttl ms})`: the wait
    /// in ms (tokens reserved, paid back by the refill by then), or -1: refused.
    Bucket,
    /// `lease(key, {'acquire', limit, name, ttl ms})`.
    Lease,
    /// `pool(key, {'read'})` (never refuses).
    Pool,
}

impl StepKind {
    fn code(self) -> &'static str {
        match self {
            StepKind::Breaker => "b",
            StepKind::Bucket => "t",
            StepKind::Lease => "l",
            StepKind::Pool => "k",
        }
    }
}

/// One shared step of a candidate's admission: its unit's function, Redis key and
/// arguments.
#[derive(Debug, Clone)]
pub struct Step {
    /// The function.
    pub kind: StepKind,
    /// The unit's Redis key (with the prefix).
    pub key: String,
    /// Its arguments, the operation first.
    pub args: Vec<Arg>,
}

/// What the combined script answered.
#[derive(Debug)]
pub enum BatchAnswer {
    /// Every step admitted; each step's own answer, in order.
    Admitted(Vec<Value>),
    /// Step `step` (0-based) refused with `answer` (its function's answer); every earlier
    /// step was undone.
    Refused {
        /// The index of the step that refused.
        step: usize,
        /// Its answer.
        answer: Value,
    },
}

/// `KEYS`: one per step. `ARGV`: per step, its kind, its argument count, its arguments.
static ADMIT_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{NOW_MS}{BREAKER_LUA}{BUCKET_LUA}{LEASE_LUA}{POOL_LUA}{}",
        r#"
local steps = {}
local pos = 1
for i = 1, #KEYS do
  local na = tonumber(ARGV[pos + 1]); local a = {}
  for j = 1, na do a[j] = ARGV[pos + 1 + j] end
  steps[i] = {ARGV[pos], a}
  pos = pos + 2 + na
end
local out = {}
for i = 1, #KEYS do
  local kind = steps[i][1]; local a = steps[i][2]; local k = KEYS[i]
  local r; local ok
  if kind == 'b' then r = breaker(k, a); ok = r[1] == 1
  elseif kind == 't' then r = bucket(k, a); ok = r >= 0
  elseif kind == 'l' then r = lease(k, a); ok = r == 1
  else r = pool(k, a); ok = true end
  if not ok then
    for j = i - 1, 1, -1 do
      local kj = steps[j][1]; local aj = steps[j][2]
      if kj == 'b' then
        if out[j][2] == 1 then breaker(KEYS[j], {'release', out[j][3]}) end
      elseif kj == 't' then
        aj[1] = 'refund'; bucket(KEYS[j], aj)
      elseif kj == 'l' then
        lease(KEYS[j], {'release', 0, aj[3], 0})
      end
    end
    return {i, r}
  end
  out[i] = r
end
return {0, out}
"#
    ))
});

/// Runs `steps` in one round trip (within `state.timeout_ms`).
///
/// # Errors
/// [`Unavailable`] when Redis is down, did not answer in time, or answered something
/// else than the script's shape (the backend is then marked down as for any failure).
pub async fn admit(state: &Arc<RedisState>, steps: &[Step]) -> Result<BatchAnswer, Unavailable> {
    let keys: Vec<&str> = steps.iter().map(|s| s.key.as_str()).collect();
    let mut args: Vec<Arg> = Vec::new();
    for s in steps {
        args.push(Arg::S(s.kind.code().to_owned()));
        args.push(Arg::I(i64::try_from(s.args.len()).unwrap_or(i64::MAX)));
        args.extend(s.args.iter().cloned());
    }
    let dyn_args: Vec<&dyn ToRedisArgsDyn> =
        args.iter().map(|a| a as &dyn ToRedisArgsDyn).collect();
    let (refused, answer): (i64, Value) = state.run(&ADMIT_SCRIPT, &keys, &dyn_args).await?;
    match (refused, answer) {
        (0, Value::Array(each)) if each.len() == steps.len() => Ok(BatchAnswer::Admitted(each)),
        (i, answer) if i >= 1 && (i as usize) <= steps.len() => Ok(BatchAnswer::Refused {
            step: i as usize - 1,
            answer,
        }),
        _ => Err(Unavailable),
    }
}
