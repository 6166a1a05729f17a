"""The judge from Python: scores read, re-asks, the cache, failures carrying `error`
and no number; and echelon.rl.make_compute_score's verl contract."""

import asyncio

import pytest

import echelon
import echelon.rl

# The test upstream answers "echo: <last user message>", so the rubric's own text is the
# judge's reply: "Score: {response}" makes the response the score.
RUBRIC = "Rate the answer to {prompt}. Score: {response}"
REMINDER = "Answer again, from {min} to {max}."  # echoed: its numbers are not a "Score:"


def config(good_url: str, bad_url: str, tmp_path) -> str:
    return f"""
providers:
  good: {{ base_url: "{good_url}/v1" }}
  bad: {{ base_url: "{bad_url}/v1" }}
models:
  judge-model: {{ provider: good, max_retries: 0 }}
  broken-judge: {{ provider: bad, max_retries: 0 }}
usage:
  ledger: {tmp_path / "ledger.db"}
"""


@pytest.fixture
def gw(upstream, gateway, tmp_path):
    good = upstream()
    bad = upstream("--fault-rate", "1", "--faults", "500")
    return gateway(config(good.url, bad.url, tmp_path))


PATTERNS = [r"Score:\s*(\d+(?:\.\d+)?)"]


def test_score_reads_scores_reasks_and_never_invents_one(gw):
    judge = gw.judge(route="judge-model", rubric=RUBRIC, reminder=REMINDER, patterns=PATTERNS,
                     concurrency=8, max_reasks=2, target_tokens=0)
    items = [
        {"id": 1, "prompt": "2+2", "response": "7", "reference": "4"},
        {"id": "b", "prompt": "2+3", "response": "42"},  # out of range: re-asked, unparsed
    ]

    async def scenario():
        return await judge.score(items)

    ok, unparsed = asyncio.run(scenario())
    assert ok["id"] == 1 and ok["score"] == 7 and ok["reward"] == 7 and ok["length_penalty"] == 0
    assert "error" not in ok and ok["cached"] is False and ok["attempts"] == 1
    assert ok["raw"].startswith("echo: Rate the answer")
    assert unparsed["id"] == "b" and unparsed["error"] == "unparsed"
    assert unparsed["score"] is None and unparsed["reward"] is None
    assert unparsed["reasks"] == 2


def test_the_cache_answers_the_second_time(gw, tmp_path):
    judge = gw.judge(route="judge-model", rubric=RUBRIC, patterns=PATTERNS, cache=True)
    item = [{"id": 1, "prompt": "p", "response": "5"}]
    first = judge.score_sync(item)[0]
    second = judge.score_sync(item)[0]
    assert first["cached"] is False and second["cached"] is True
    assert second["score"] == first["score"] == 5 and second["attempts"] == 0
    assert (tmp_path / "judge_cache.db").exists()
    other = gw.judge(route="judge-model", rubric=RUBRIC, patterns=PATTERNS, cache=str(tmp_path / "c.db"))
    assert other.score_sync(item)[0]["cached"] is False


def test_a_failed_judge_call_is_an_error_not_a_number(gw):
    judge = gw.judge(route="broken-judge", rubric=RUBRIC, patterns=PATTERNS)
    (r,) = judge.score_sync([{"id": 1, "prompt": "p", "response": "5"}])
    assert r["score"] is None and r["reward"] is None and r["length_penalty"] is None
    assert r["error"].startswith("502")


def test_bad_items_and_rubrics_are_typed_errors(gw):
    with pytest.raises(echelon.EchelonError):
        gw.judge(route="judge-model", rubric="no placeholder")
    with pytest.raises(echelon.EchelonError):
        gw.judge(route="no-such-route")
    judge = gw.judge(route="judge-model", rubric=RUBRIC)
    with pytest.raises(echelon.EchelonError) as info:
        judge.score_sync([{"prompt": "no id", "response": "x"}])
    assert "items[0]" in str(info.value)


def test_make_compute_score_follows_verls_signature(gw):
    compute_score = echelon.rl.make_compute_score(gw, "judge-model", rubric=RUBRIC, patterns=PATTERNS,
                                                   target_tokens=0)
    out = compute_score("gsm8k", "8", "4", extra_info={"prompt": "2+2"})
    assert out == {"score": 8.0, "judge_score": 8.0, "length_penalty": 0.0, "cached": False, "scored": True}
    out = compute_score(data_source="gsm8k", solution_str="3", ground_truth="4")
    assert out["score"] == 3.0
    batch = compute_score.batch(["a", "b"], ["2", "9"], ["x", "y"], [None, {"prompt": "q"}])
    assert [b["score"] for b in batch] == [2.0, 9.0]

    async def scenario():
        return await compute_score.abatch(["a"], ["6"], ["x"])

    assert asyncio.run(scenario())[0]["score"] == 6.0


def test_compute_score_failures_raise_or_skip_but_never_score_zero(gw):
    raising = echelon.rl.make_compute_score(gw, "broken-judge", rubric=RUBRIC, on_failure="raise")
    with pytest.raises(echelon.rl.JudgeFailed) as info:
        raising("d", "5", "5")
    assert isinstance(info.value, echelon.EchelonError)
    assert info.value.result["error"].startswith("502")
    skipping = echelon.rl.make_compute_score(gw, "broken-judge", rubric=RUBRIC, on_failure="skip")
    out = skipping("d", "5", "5")
    assert out["score"] is None and out["scored"] is False and out["error"].startswith("502")
    unparsed = echelon.rl.make_compute_score(gw, "judge-model", rubric=RUBRIC, patterns=PATTERNS,
                                              on_failure="skip", max_reasks=0)
    assert unparsed("d", "99", "5") == {"score": None, "scored": False, "error": "unparsed"}
    with pytest.raises(ValueError):
        echelon.rl.make_compute_score(gw, "judge-model", on_failure="zero")


def test_voting_and_pairwise_options_reach_the_judge(gw):
    # K samples of the same echoed score: each its own call, aggregated, stdev 0.
    voter = gw.judge(route="judge-model", rubric=RUBRIC, patterns=PATTERNS, samples=3,
                     aggregate="median", seed=5, target_tokens=0)
    [voted] = voter.score_sync([{"id": "v", "prompt": "2+2", "response": "6"}])
    assert voted["score"] == 6 and voted["samples"] == [6, 6, 6]
    assert voted["aggregate"] == "median" and voted["stdev"] == 0
    assert voted["attempts"] == 3

    # Pairwise: the echoed rubric always names the response shown first as the winner,
    # so the swapped order disagrees and inconsistent="tie" makes it a tie, never a guess.
    pairwise = gw.judge(route="judge-model", mode="pairwise", swap=True, inconsistent="tie",
                        rubric="Q: {prompt}\nWinner: A\nfirst: {response_a}\nsecond: {response_b}")
    [pair] = pairwise.score_sync(
        [{"id": "p", "prompt": "2+2", "response_a": "x", "response_b": "y"}])
    assert pair["score"] is None and "error" not in pair
    assert pair["position_consistent"] is False and pair["preference"] == "tie"
    assert pair["p_a"] == 0.5

    with pytest.raises(echelon.EchelonError, match="verdict"):
        gw.judge(route="judge-model", verdict="yaml")
