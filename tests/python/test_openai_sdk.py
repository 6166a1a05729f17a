"""The official openai Python SDK, unchanged, against `echelon serve`.

Run by scripts/test-python-sdk.sh, which starts two real llama-server instances, a
fault-injecting test upstream and the gateway, and sets ECHELON_URL.
"""
import os
import unittest

import openai

URL = os.environ["ECHELON_URL"]
ASK = [{"role": "user", "content": "Name three colours."}]


class OpenAiSdkAgainstEchelon(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.client = openai.OpenAI(base_url=URL, api_key="unused", max_retries=0)

    def test_plain_chat(self):
        r = self.client.chat.completions.create(
            model="demo", messages=ASK, max_tokens=24, temperature=0, seed=3
        )
        # llama-server answers with its --alias: the echelon1 instance answered.
        self.assertEqual(r.model, os.environ["ECHELON1_ALIAS"])
        self.assertTrue(r.choices[0].message.content)
        self.assertGreater(r.usage.completion_tokens, 0)

    def test_streamed_chat_arrives_in_chunks(self):
        pieces = []
        for chunk in self.client.chat.completions.create(
            model="demo", messages=ASK, max_tokens=24, temperature=0, seed=3, stream=True
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
        self.assertGreaterEqual(len(pieces), 3, pieces)

    def test_stream_usage_when_asked(self):
        usage = None
        for chunk in self.client.chat.completions.create(
            model="demo", messages=ASK, max_tokens=8, stream=True,
            stream_options={"include_usage": True},
        ):
            if chunk.usage:
                usage = chunk.usage
        self.assertIsNotNone(usage)
        self.assertGreater(usage.total_tokens, 0)

    def test_unknown_route_is_not_found(self):
        with self.assertRaises(openai.NotFoundError) as cm:
            self.client.chat.completions.create(model="no-such-route", messages=ASK)
        self.assertEqual(cm.exception.body["code"], "model_not_found")

    def test_malformed_request_is_bad_request_naming_the_path(self):
        with self.assertRaises(openai.BadRequestError) as cm:
            self.client.chat.completions.create(
                model="demo", messages=[{"role": "wizard", "content": "hi"}]
            )
        self.assertEqual(cm.exception.body["param"], "messages[0].role")

    def test_a_stream_cut_midway_raises_instead_of_ending_cleanly(self):
        stream = self.client.chat.completions.create(
            model="cut-model", messages=ASK, stream=True
        )
        got = []
        with self.assertRaises(openai.APIError) as cm:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    got.append(chunk.choices[0].delta.content)
        self.assertTrue(got, "content arrived before the cut")
        self.assertIn("stream", str(cm.exception.message))

    def test_total_failure_is_an_error_with_attempts(self):
        with self.assertRaises(openai.APIStatusError) as cm:
            self.client.chat.completions.create(model="dead-model", messages=ASK)
        self.assertEqual(cm.exception.status_code, 502)
        attempts = cm.exception.body["attempts"]
        self.assertEqual([a["model"] for a in attempts], ["dead-model"])
        self.assertEqual(attempts[0]["error_kind"], "connect")

    def test_models_lists_the_routes(self):
        ids = {m.id for m in self.client.models.list()}
        self.assertTrue({"demo", "real-a", "real-b", "demo.echelon1"} <= ids, ids)


if __name__ == "__main__":
    unittest.main(verbosity=2)
