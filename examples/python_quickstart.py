"""Echelon in-process from Python: the demo config's task group, no server.

Usage (after `pip install ./python`; scripts/demo.sh or scripts/real-upstream.sh gives
you the two llama-servers and the LOCAL_*_URL / LOCAL_*_KEY variables):

    python examples/python_quickstart.py examples/demo.yaml demo_group
"""

import asyncio
import sys

import echelon


async def main(config: str, route: str) -> None:
    with echelon.Gateway.from_config(config) as gw:  # closes (flushes the ledger) at the end
        llm = gw.llm(route)
        try:
            print("text   ->", repr(await llm("In one sentence, what is the sky's colour?", max_tokens=40)))
            resp = await llm.chat([{"role": "user", "content": "Say hi."}], temperature=0, max_tokens=16)
            print("chat   ->", repr(resp["choices"][0]["message"]["content"]), "by", resp.get("model"))
            print("stream -> ", end="")
            async for chunk in llm.chat_stream([{"role": "user", "content": "Count to five."}], max_tokens=32):
                if chunk["choices"]:
                    print(chunk["choices"][0]["delta"].get("content") or "", end="", flush=True)
            print()
        except echelon.AllAttemptsFailed as e:
            print(f"failed with {e.status}: {e}")
            for a in e.attempts:
                print(f"  {a['model']} ({a['provider']}, key {a['key_id']}): {a['kind']} {a['status']} {a['message']}")
        print("usage  ->", llm.get_usage_summary())
        print("stats  ->", llm.stats())
        print("health ->", await gw.health_check_all())


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
