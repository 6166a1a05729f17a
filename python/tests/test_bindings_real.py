"""End to end against a real llama-server (scripts/real-upstream.sh, SmolLM2): a task
group whose echelon1 is down fails over to the real model, in-process."""

import asyncio
import os

import pytest

import echelon

REAL_URL = os.environ.get("ECHELON_REAL_URL")
REAL_KEY = os.environ.get("ECHELON_REAL_KEY", "")

if not REAL_URL:
    if os.environ.get("ECHELON_REQUIRE_REAL_UPSTREAM") == "1":
        raise RuntimeError("ECHELON_REAL_URL is not set and a real upstream is required")
    pytest.skip("no real upstream (ECHELON_REAL_URL)", allow_module_level=True)


def test_a_real_model_answers_through_failover(gateway, monkeypatch):
    monkeypatch.setenv("BINDINGS_REAL_KEY", REAL_KEY)
    gw = gateway(
        f"""
providers:
  dead: {{ base_url: "http://127.0.0.1:9/v1" }}
  real: {{ base_url: "{REAL_URL}", api_keys: ["${{BINDINGS_REAL_KEY}}"] }}
models:
  dead-model: {{ provider: dead, max_retries: 0 }}
  smollm2: {{ provider: real, model: smollm2, timeout: 60, max_retries: 1, retry_delay: 0.1 }}
task_groups:
  demo:
    echelon1: {{ models: [dead-model] }}
    echelon2: {{ models: [smollm2] }}
"""
    )
    llm = gw.llm("demo")

    async def scenario():
        text = await llm("Say hello in one word.", max_tokens=16, temperature=0)
        chunks = [c async for c in llm.chat_stream([{"role": "user", "content": "Count to three."}], max_tokens=16)]
        return text, chunks

    text, chunks = asyncio.run(scenario())
    assert isinstance(text, str) and text.strip()
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    assert streamed.strip()
    summary = llm.get_usage_summary()
    assert summary["requests"] == 2 and summary["prompt_tokens"] > 0 and summary["completion_tokens"] > 0
    assert list(summary["by_model"]) == ["smollm2"]
    assert llm.stats()["fallbacks"] == 2
