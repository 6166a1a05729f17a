"""The official anthropic Python SDK, unchanged, against `echelon serve`'s /v1/messages.

Run by scripts/test-python-sdk.sh, which starts two real llama-server instances (the
OpenAI wire: this is the cross-protocol path anthropic SDK -> Echelon -> llama-server),
fault-injecting test upstreams and the gateway, and sets ECHELON_BASE (no /v1: the SDK
adds /v1/messages) and, for the gateway with keys, ECHELON_KEYED_BASE and ECHELON_KEY.
"""
import os
import unittest

import anthropic

BASE = os.environ["ECHELON_BASE"]
ASK = [{"role": "user", "content": "Name three colours."}]
WEATHER = {
    "name": "get_weather",
    "description": "The weather of a city.",
    "input_schema": {
        "type": "object",
        "properties": {"text": {"type": "string"}},
    },
}


class AnthropicSdkAgainstEchelon(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.client = anthropic.Anthropic(base_url=BASE, api_key="unused", max_retries=0)

    def test_plain_message_from_the_real_model(self):
        r = self.client.messages.create(
            model="demo", max_tokens=24, messages=ASK,
            system="You answer briefly.",
        )
        self.assertEqual(r.type, "message")
        self.assertEqual(r.role, "assistant")
        # llama-server answers with its --alias: the echelon1 instance answered.
        self.assertEqual(r.model, os.environ["ECHELON1_ALIAS"])
        self.assertEqual(r.content[0].type, "text")
        self.assertTrue(r.content[0].text)
        self.assertIn(r.stop_reason, ("end_turn", "max_tokens"))
        self.assertGreater(r.usage.input_tokens, 0)
        self.assertGreater(r.usage.output_tokens, 0)

    def test_stream_from_the_real_model(self):
        with self.client.messages.stream(
            model="demo", max_tokens=24, messages=ASK
        ) as stream:
            pieces = list(stream.text_stream)
            final = stream.get_final_message()
        self.assertGreaterEqual(len(pieces), 3, pieces)
        self.assertEqual(final.content[0].text, "".join(pieces))
        self.assertIn(final.stop_reason, ("end_turn", "max_tokens"))
        self.assertGreater(final.usage.output_tokens, 0)
        self.assertGreater(final.usage.input_tokens, 0)

    def test_an_overloaded_anthropic_echelon1_fails_over_to_the_real_model(self):
        # echelon1 speaks the Anthropic wire and answers 529; echelon2 is llama-server.
        raw = self.client.messages.with_raw_response.create(
            model="claude-first", max_tokens=16, messages=ASK
        )
        r = raw.parse()
        self.assertEqual(r.model, os.environ["ECHELON2_ALIAS"])
        self.assertTrue(r.content[0].text)
        attempts = raw.headers["x-echelon-attempts"]
        self.assertTrue(attempts.startswith("claude-overloaded:server_error:529"), attempts)

    def test_tool_call_round_trip(self):
        # The tool upstream (an OpenAI-wire test upstream) calls the tool it is forced to.
        first = self.client.messages.create(
            model="tools-model", max_tokens=64, tools=[WEATHER],
            tool_choice={"type": "tool", "name": "get_weather"},
            messages=[{"role": "user", "content": "Paris"}],
        )
        self.assertEqual(first.stop_reason, "tool_use")
        call = [b for b in first.content if b.type == "tool_use"][0]
        self.assertEqual(call.name, "get_weather")
        self.assertEqual(call.input, {"text": "Paris"})
        # The result goes back; the real model answers in text.
        second = self.client.messages.create(
            model="demo", max_tokens=24, tools=[WEATHER],
            messages=[
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [b.model_dump() for b in first.content]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": call.id, "content": "sunny, 21 C"},
                ]},
            ],
        )
        self.assertEqual(second.content[0].type, "text")
        self.assertTrue(second.content[0].text)

    def test_streamed_tool_call(self):
        with self.client.messages.stream(
            model="tools-model", max_tokens=64, tools=[WEATHER],
            tool_choice={"type": "any"},
            messages=[{"role": "user", "content": "Lyon"}],
        ) as stream:
            final = stream.get_final_message()
        self.assertEqual(final.stop_reason, "tool_use")
        self.assertEqual(final.content[0].type, "tool_use")
        self.assertEqual(final.content[0].input, {"text": "Lyon"})

    def test_count_tokens(self):
        short = self.client.messages.count_tokens(model="demo", messages=ASK)
        longer = self.client.messages.count_tokens(
            model="demo", messages=ASK, system="You are a careful assistant.", tools=[WEATHER]
        )
        self.assertGreater(short.input_tokens, 0)
        self.assertGreater(longer.input_tokens, short.input_tokens)

    def test_total_failure_is_an_api_status_error_with_attempts(self):
        with self.assertRaises(anthropic.APIStatusError) as cm:
            self.client.messages.create(model="dead-model", max_tokens=8, messages=ASK)
        self.assertEqual(cm.exception.status_code, 502)
        body = cm.exception.body
        self.assertEqual(body["type"], "error")
        self.assertEqual(body["error"]["type"], "api_error")
        attempts = body["error"]["attempts"]
        self.assertEqual([a["model"] for a in attempts], ["dead-model"])
        self.assertEqual(attempts[0]["error_kind"], "connect")

    def test_unknown_route_is_not_found(self):
        with self.assertRaises(anthropic.NotFoundError) as cm:
            self.client.messages.create(model="no-such-route", max_tokens=8, messages=ASK)
        self.assertEqual(cm.exception.body["error"]["type"], "not_found_error")

    def test_bad_request_is_bad_request(self):
        with self.assertRaises(anthropic.BadRequestError) as cm:
            self.client.messages.create(
                model="demo", max_tokens=8,
                messages=[{"role": "user", "content": [{"type": "document", "source": {
                    "type": "text", "media_type": "text/plain", "data": "x"}}]}],
            )
        self.assertEqual(cm.exception.body["error"]["type"], "invalid_request_error")

    def test_a_stream_cut_midway_raises_instead_of_ending_cleanly(self):
        got = []
        with self.assertRaises(anthropic.APIStatusError) as cm:
            with self.client.messages.stream(
                model="cut-model", max_tokens=64, messages=ASK
            ) as stream:
                for text in stream.text_stream:
                    got.append(text)
        self.assertTrue(got, "content arrived before the cut")
        self.assertEqual(cm.exception.body["error"]["type"], "api_error")
        self.assertIn("stream", str(cm.exception))


class GatewayKeysForTheAnthropicSdk(unittest.TestCase):
    """The SDK sends its key as x-api-key (api_key=) or as a bearer token (auth_token=)."""

    def test_x_api_key_and_bearer_are_accepted_and_a_wrong_key_is_refused(self):
        base = os.environ["ECHELON_KEYED_BASE"]
        key = os.environ["ECHELON_KEY"]
        for client in (
            anthropic.Anthropic(base_url=base, api_key=key, max_retries=0),
            anthropic.Anthropic(base_url=base, auth_token=key, max_retries=0),
        ):
            r = client.messages.create(model="tools-model", max_tokens=8, messages=ASK)
            self.assertEqual(r.content[0].type, "text")
        with self.assertRaises(anthropic.AuthenticationError) as cm:
            anthropic.Anthropic(base_url=base, api_key="wrong", max_retries=0).messages.create(
                model="tools-model", max_tokens=8, messages=ASK
            )
        self.assertEqual(cm.exception.body["error"]["type"], "authentication_error")


if __name__ == "__main__":
    unittest.main()
