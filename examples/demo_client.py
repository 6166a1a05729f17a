"""Talks to `echelon serve` with the official openai SDK, unchanged.

Usage: python examples/demo_client.py BASE_URL ROUTE [--no-stream]
Prints the answer, the model that answered and every attempt (x-echelon-* headers).
"""
import sys

import openai

base_url, route = sys.argv[1], sys.argv[2]
stream = "--no-stream" not in sys.argv
client = openai.OpenAI(base_url=base_url, api_key="demo", max_retries=0)
messages = [{"role": "user", "content": "In one sentence, what is the sky's colour?"}]

raw = client.chat.completions.with_raw_response.create(
    model=route, messages=messages, max_tokens=40, temperature=0, seed=1
)
completion = raw.parse()
print(f"chat    -> {completion.choices[0].message.content!r}")
print(f"           answered by {raw.headers.get('x-echelon-model')} "
      f"(upstream alias {completion.model}); attempts: {raw.headers.get('x-echelon-attempts')}")

if stream:
    pieces = []
    for chunk in client.chat.completions.create(
        model=route, messages=messages, max_tokens=40, temperature=0, seed=1, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    print(f"stream  -> {len(pieces)} chunks: {''.join(pieces)!r}")
