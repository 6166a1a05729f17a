"""The official openai Python SDK's `embeddings.create`, unchanged, against `echelon serve`
in front of real llama-server instances started with `--embeddings --pooling mean`.

Run by scripts/test-python-sdk.sh, which sets ECHELON_URL and ECHELON1_ALIAS.
"""
import math
import os
import unittest

import openai

URL = os.environ["ECHELON_URL"]


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


class OpenAiEmbeddingsAgainstEchelon(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.client = openai.OpenAI(base_url=URL, api_key="unused", max_retries=0)

    def test_one_text(self):
        # The SDK asks for base64 by default and decodes it: the gateway relays it.
        raw = self.client.embeddings.with_raw_response.create(
            model="demo", input="The sky is blue."
        )
        # echelon1 answered (llama-server names the model as it was asked for, the
        # upstream name in the config, where its chat answers name its --alias).
        self.assertEqual(raw.headers["x-echelon-model"], "real-a")
        r = raw.parse()
        self.assertEqual(r.object, "list")
        self.assertEqual(len(r.data), 1)
        self.assertEqual(r.data[0].index, 0)
        self.assertGreater(len(r.data[0].embedding), 16)
        self.assertTrue(all(isinstance(x, float) for x in r.data[0].embedding))
        self.assertEqual(r.model, "smollm2")
        self.assertGreater(r.usage.prompt_tokens, 0)

    def test_a_batch_keeps_its_order(self):
        texts = ["red apples", "a stock market report", "red apples"]
        r = self.client.embeddings.create(model="demo", input=texts, encoding_format="float")
        self.assertEqual([d.index for d in r.data], [0, 1, 2])
        v = [d.embedding for d in r.data]
        self.assertGreater(cosine(v[0], v[2]), 0.999, "the same text, the same vector")
        self.assertLess(cosine(v[0], v[1]), 0.999)

    def test_float_and_base64_agree(self):
        f = self.client.embeddings.create(model="demo", input="hello", encoding_format="float")
        b = self.client.embeddings.create(model="demo", input="hello")
        self.assertEqual(len(f.data[0].embedding), len(b.data[0].embedding))
        self.assertGreater(cosine(f.data[0].embedding, b.data[0].embedding), 0.9999)

    def test_token_ids_are_accepted(self):
        r = self.client.embeddings.create(model="demo", input=[[1, 2, 3], [4, 5]])
        self.assertEqual(len(r.data), 2)
        self.assertEqual(r.usage.prompt_tokens, 5)

    def test_a_dead_echelon1_fails_over_to_the_real_model(self):
        raw = self.client.embeddings.with_raw_response.create(model="emb-failover", input="hi")
        self.assertEqual(raw.headers["x-echelon-model"], "real-b")
        self.assertIn("dead-model:connect", raw.headers["x-echelon-attempts"])
        self.assertEqual(len(raw.parse().data), 1)

    def test_unknown_route_is_not_found(self):
        with self.assertRaises(openai.NotFoundError):
            self.client.embeddings.create(model="no-such-route", input="hi")

    def test_empty_input_is_bad_request_naming_it(self):
        with self.assertRaises(openai.BadRequestError) as cm:
            self.client.embeddings.create(model="demo", input=[])
        self.assertEqual(cm.exception.body["param"], "input")


if __name__ == "__main__":
    unittest.main()
