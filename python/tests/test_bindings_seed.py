"""Seed 004: OpenAICompatible.load_from_json_file("provider.json") gives
models[provider][model] as LLMs with chat() / chat_stream() over the gateway."""

import asyncio
import json

import pytest

import echelon


def test_load_from_json_file_gives_llms_by_provider_and_model(upstream, tmp_path, monkeypatch):
    monkeypatch.setenv("ECHELON_DATA_DIR", str(tmp_path))
    good = upstream()
    bad = upstream("--fault-rate", "1", "--faults", "503")
    (tmp_path / "provider.json").write_text(json.dumps({
        "openai": {
            "gpt-3.5-turbo": {
                "api_keys": ["sk-key1", "sk-key2"], "base_url": f"{good.url}/v1",
                "model": "gpt-3.5-turbo", "max_retries": 5, "retry_delay": 0.01,
                "rate_limit_capacity": 20, "rate_limit_refill_rate": 3.0,
            },
            "gpt-4": {"api_keys": ["sk-key3"], "base_url": f"{good.url}/v1", "model": "gpt-4"},
        },
        "deepseek": {
            "v3-turbo": {"api_keys": ["ds-key"], "base_url": f"{bad.url}/v1",
                         "model": "deepseek-chat", "max_retries": 0},
        },
    }))
    models = echelon.OpenAICompatible.load_from_json_file(tmp_path / "provider.json")
    assert sorted(models) == ["deepseek", "openai"]
    assert sorted(models["openai"]) == ["gpt-3.5-turbo", "gpt-4"]
    gpt4 = models["openai"]["gpt-4"]
    assert gpt4.name == "openai/gpt-4"

    async def scenario():
        resp = await gpt4.chat([{"role": "user", "content": "Hi"}], stream=False, timeout=10)
        assert resp["choices"][0]["message"]["content"] == "echo: Hi"
        chunks = [c async for c in models["openai"]["gpt-3.5-turbo"].chat_stream(
            [{"role": "user", "content": "s"}], stream=True)]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "echo: s"
        with pytest.raises(echelon.AllAttemptsFailed) as info:
            await models["deepseek"]["v3-turbo"].chat([{"role": "user", "content": "x"}])
        assert info.value.attempts[0]["status"] == 503
        assert info.value.attempts[0]["key_id"]  # a key id, never the key
        assert "ds-key" not in str(info.value.attempts)

    asyncio.run(scenario())


def test_load_from_json_file_rejects_an_unknown_setting(tmp_path):
    (tmp_path / "provider.json").write_text(
        '{"openai": {"gpt-4": {"base_url": "http://127.0.0.1:9/v1", "temperatur": 1}}}'
    )
    with pytest.raises(echelon.ConfigError) as info:
        echelon.OpenAICompatible.load_from_json_file(str(tmp_path / "provider.json"))
    assert "provider.json:1:" in str(info.value), str(info.value)
