"""Echelon, a resilient LLM gateway, in-process.

The Rust router (task groups, echelons, polling pools, key pools, token buckets, circuit
breakers, the usage ledger, the judge) behind the interfaces the seeds' Python code already
calls::

    import echelon
    gw = echelon.Gateway.from_config("echelon.yaml")   # the files `echelon serve` reads
    llm = gw.llm("math_group")                         # model | task group | group.echelonN | pool | wrapper
    text = await llm("What is 2+2?")                   # str; never a placeholder
    resp = await llm.chat([{"role": "user", "content": "Hi"}], max_tokens=64)   # OpenAI-shaped dict
    async for chunk in llm.chat_stream(messages): ...  # chunk dicts
    llm.get_usage_summary(); llm.stats(); gw.state(); await gw.health_check_all()

Every call goes through the route's full resilience and is recorded in the ledger. A call
that cannot be answered raises :class:`AllAttemptsFailed` (a :class:`EchelonError`) with
``.status`` and ``.attempts``. The GIL is released while Rust works; cancelling the awaiting
asyncio task cancels the request (the upstream connection closes).
"""

from __future__ import annotations

import atexit
import os
from typing import Any, Dict, Optional, Union

from . import _native
from ._native import (
    AllAttemptsFailed,
    ChatStream,
    ConfigError,
    EchelonError,
    Judge,
    RouteNotFound,
    __version__,
)

Gateway = _native.Gateway
LLM = _native.Llm


def _close_open_gateways() -> None:
    """At exit: close the gateways still open, so that their ledger rows reach the disk,
    then end the calls still in flight and wait (at most 2 s) until the runtime's tasks
    are done, so that none of them touches Python while the interpreter finalizes."""
    for gw in list(_native._open_gateways):
        try:
            gw.close_sync()
        except Exception:  # noqa: BLE001 - exiting anyway; the rest still get closed
            pass
    _native._quiesce(2.0)


atexit.register(_close_open_gateways)

__all__ = [
    "AllAttemptsFailed",
    "ChatStream",
    "ConfigError",
    "EchelonError",
    "Gateway",
    "Judge",
    "LLM",
    "OpenAICompatible",
    "RouteNotFound",
    "__version__",
]


class OpenAICompatible:
    """Seed 004's loader: ``OpenAICompatible.load_from_json_file("provider.json")`` returns
    ``{provider: {model: LLM}}``, e.g. ``models["openai"]["gpt-4"]``. Each LLM is the route
    ``provider/model`` of a gateway built from the file (its keys, retries and rate limits
    as the file says), with the same resilience and ledger as any other route."""

    @staticmethod
    def load_from_json_file(path: Union[str, "os.PathLike[str]"]) -> Dict[str, Dict[str, Any]]:
        """Loads a seed ``provider.json`` (or any Echelon config) and returns its models by
        provider and seed name. Raises :class:`ConfigError` when the file is invalid."""
        gw = Gateway.from_config(os.fspath(path))
        out: Dict[str, Dict[str, Any]] = {}
        for route in gw.routes():
            if route["kind"] != "model":
                continue
            provider, sep, name = route["id"].partition("/")
            if not sep:
                continue
            out.setdefault(provider, {})[name] = gw.llm(route["id"])
        # The LLMs keep the gateway alive; keep it reachable for close() too.
        OpenAICompatible._last_gateway = gw
        return out

    _last_gateway: Optional[Any] = None
