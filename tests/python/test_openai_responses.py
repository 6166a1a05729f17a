"""The official openai Python SDK's Responses API, unchanged, against `echelon serve`.

Run by scripts/test-python-sdk.sh (real llama-server instances behind a task group, a
test upstream that cuts every stream, a dead upstream), which sets ECHELON_URL.
"""
import os
import unittest

import openai

URL = os.environ["ECHELON_URL"]


class OpenAiResponsesAgainstEchelon(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.client = openai.OpenAI(base_url=URL, api_key="unused", max_retries=0)

    def test_create(self):
        r = self.client.responses.create(
            model="demo",
            instructions="Answer in one short sentence.",
            input="Name three colours.",
            max_output_tokens=24,
            temperature=0,
        )
        self.assertEqual(r.object, "response")
        self.assertTrue(r.id.startswith("resp_"))
        self.assertIn(r.status, ("completed", "incomplete"))
        # llama-server answers with its --alias: the echelon1 instance answered.
        self.assertEqual(r.model, os.environ["ECHELON1_ALIAS"])
        self.assertTrue(r.output_text)
        self.assertEqual(r.output[0].type, "message")
        self.assertGreater(r.usage.output_tokens, 0)
        self.assertEqual(
            r.usage.total_tokens, r.usage.input_tokens + r.usage.output_tokens
        )

    def test_items_input(self):
        r = self.client.responses.create(
            model="demo",
            input=[
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": [{"type": "input_text", "text": "Say hi."}]},
            ],
            max_output_tokens=16,
        )
        self.assertTrue(r.output_text)

    def test_stream(self):
        types = []
        deltas = []
        final = None
        with self.client.responses.create(
            model="demo", input="Name three colours.", max_output_tokens=24,
            temperature=0, stream=True,
        ) as stream:
            for event in stream:
                types.append(event.type)
                self.assertEqual(event.sequence_number, len(types) - 1)
                if event.type == "response.output_text.delta":
                    deltas.append(event.delta)
                if event.type in ("response.completed", "response.incomplete"):
                    final = event.response
        self.assertEqual(types[:2], ["response.created", "response.in_progress"])
        self.assertGreaterEqual(len(deltas), 3, types)
        self.assertIsNotNone(final, types)
        self.assertEqual(final.model, os.environ["ECHELON1_ALIAS"])
        self.assertEqual(final.output_text, "".join(deltas))
        self.assertGreater(final.usage.output_tokens, 0)

    def test_stream_helper_gets_the_final_response(self):
        # Not cut by a token cap: a capped stream ends with `response.incomplete`, as
        # OpenAI's does, and the helper's get_final_response wants `response.completed`.
        with self.client.responses.stream(
            model="demo", instructions="Reply with one word.", input="Say yes.",
            max_output_tokens=64, temperature=0,
        ) as stream:
            for _ in stream:
                pass
            final = stream.get_final_response()
        self.assertTrue(final.output_text)

    def test_a_stream_cut_midway_ends_with_response_failed(self):
        types = []
        failed = None
        for event in self.client.responses.create(
            model="cut-model", input="one two three four five six", stream=True
        ):
            types.append(event.type)
            if event.type == "response.failed":
                failed = event.response
        self.assertIn("response.output_text.delta", types, "content before the cut")
        self.assertNotIn("response.completed", types)
        self.assertEqual(types[-1], "response.failed")
        self.assertEqual(failed.status, "failed")
        self.assertTrue(failed.error.message)

    def test_previous_response_id_is_refused(self):
        with self.assertRaises(openai.BadRequestError) as cm:
            self.client.responses.create(
                model="demo", input="hi", previous_response_id="resp_123"
            )
        self.assertEqual(cm.exception.body["param"], "previous_response_id")
        self.assertIn("no response state", cm.exception.message)

    def test_total_failure_is_an_error_with_attempts(self):
        with self.assertRaises(openai.APIStatusError) as cm:
            self.client.responses.create(model="dead-model", input="hi")
        self.assertEqual(cm.exception.status_code, 502)
        attempts = cm.exception.body["attempts"]
        self.assertEqual([a["model"] for a in attempts], ["dead-model"])


if __name__ == "__main__":
    unittest.main()
