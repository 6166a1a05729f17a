"""Type stubs of ``echelon._native``, the Rust extension (crates/echelon-py)."""

from __future__ import annotations

import os
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, List, Literal, Mapping, Optional, Sequence, TypedDict, Union

__version__: str

class Attempt(TypedDict):
    """One try of one model: ``status`` is the provider's HTTP status (None when it never
    answered), ``kind`` the outcome (``ok``, ``timeout``, ``connect``, ``rate_limited``,
    ``server_error``, ``circuit_open``, …), ``latency_ms`` its wall time in ms. ``key_id``
    is a short id of the key (first 4 bytes of its SHA-256), never the key."""

    model: str
    provider: str
    key_id: Optional[str]
    status: Optional[int]
    kind: str
    message: str
    latency_ms: int

class EchelonError(Exception):
    """Base of every Echelon error."""

    status: int
    """The HTTP status the server would answer (400, 404, 429, 502, 503, 504, …)."""
    type: str
    """The OpenAI error type (``invalid_request_error``, ``api_error``, …)."""
    code: Optional[str]
    attempts: List[Attempt]

class AllAttemptsFailed(EchelonError):
    """Every candidate of the route failed or was skipped (429, 502, 503 or 504)."""

class RouteNotFound(EchelonError):
    """The route names nothing in the config (404)."""

class ConfigError(EchelonError):
    """The config is invalid; the message lists each problem as ``file:line:col``."""

class ModelUsage(TypedDict):
    total_cost: float
    total_tokens: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    requests: int
    failed_requests: int

class UsageSummary(ModelUsage):
    """``total_cost`` in USD; ``requests`` counts answered and failed requests."""

    by_model: Dict[str, ModelUsage]

class Stats(TypedDict):
    total_requests: int
    successful_requests: int
    fallbacks: int
    attempts: int
    fallback_history: List[Dict[str, Any]]

class Health(TypedDict):
    ok: bool
    error: Optional[str]

class Route(TypedDict):
    id: str
    kind: Literal["model", "task_group", "echelon", "polling_pool", "wrapper"]
    models: List[str]

class JudgeResult(TypedDict, total=False):
    """A judgement. ``score``/``reward``/``length_penalty`` are None and ``error`` is set
    (``"unparsed"`` or ``"<status>: <message>"``) when the item could not be scored."""

    id: Union[str, int]
    score: Optional[float]
    reward: Optional[float]
    length_penalty: Optional[float]
    response_tokens: int
    raw: Optional[str]
    route: str
    model: Optional[str]
    attempts: int
    reasks: int
    tokens: Dict[str, int]
    cost: float
    cached: bool
    latency_ms: int
    error: str

Message = Mapping[str, Any]

class ChatStream(AsyncIterator[Dict[str, Any]]):
    """``async for chunk in llm.chat_stream(...)``: OpenAI ``chat.completion.chunk`` dicts.
    A failure after the first content chunk raises (never a normal end)."""

    def __aiter__(self) -> ChatStream: ...
    def __anext__(self) -> Awaitable[Dict[str, Any]]: ...
    def aclose(self) -> Awaitable[None]:
        """Abandons the stream (the upstream connection closes; recorded as 499)."""

class Llm:
    """A route used like one model. Keyword ``params`` are OpenAI body fields
    (``temperature``, ``max_tokens``, ``tools``, …) plus ``timeout`` (seconds, the call's
    limit: 504 when it passes). Raises :class:`AllAttemptsFailed`, never returns a
    placeholder."""

    @property
    def name(self) -> str: ...
    def __call__(self, prompt: str, **params: Any) -> Awaitable[str]:
        """``await llm(prompt)``: the answer's text."""
    def call_with_format(self, prompt: str, formatter: Optional[Callable[[str], Any]] = None, **params: Any) -> Awaitable[Any]:
        """``formatter(await llm(prompt))`` (the text when no formatter)."""
    def complete_sync(self, prompt: str, **params: Any) -> str:
        """``llm(prompt)`` blocking the thread (not the GIL)."""
    def chat(self, messages: Sequence[Message], **params: Any) -> Awaitable[Dict[str, Any]]:
        """The completion as an OpenAI-shaped dict (``stream`` is ignored)."""
    def chat_sync(self, messages: Sequence[Message], **params: Any) -> Dict[str, Any]: ...
    def chat_stream(self, messages: Sequence[Message], **params: Any) -> ChatStream: ...
    def get_usage_summary(self) -> UsageSummary:
        """Tokens and cost of this route's requests through this gateway (= its ledger rows)."""
    def stats(self) -> Stats: ...
    def reset_stats(self) -> None: ...

class Judge:
    """An LLM judge over a route (seed 003)."""

    @property
    def route(self) -> str: ...
    def score(self, items: Sequence[Mapping[str, Any]]) -> Awaitable[List[JudgeResult]]:
        """Items: dicts with ``id`` (str or int), ``prompt``, ``response``, optional
        ``reference``. Results in input order."""
    def score_sync(self, items: Sequence[Mapping[str, Any]]) -> List[JudgeResult]: ...

class Gateway:
    """Every model and route of a config, with its ledger."""

    @staticmethod
    def from_config(path: Union[str, os.PathLike[str]]) -> Gateway:
        """Loads the files ``echelon serve --config`` reads. Raises :class:`ConfigError`."""
    def llm(self, route: str) -> Llm:
        """Raises :class:`RouteNotFound`."""
    def routes(self) -> List[Route]: ...
    def state(self) -> Dict[str, Any]:
        """``GET /admin/state``: ``models``, ``echelons``, ``pools``, ``routes``."""
    def health_check_all(self) -> Awaitable[Dict[str, Health]]: ...
    def health_check_all_sync(self) -> Dict[str, Health]: ...
    def judge(
        self,
        route: str,
        rubric: Optional[str] = None,
        concurrency: int = 64,
        max_reasks: int = 2,
        cache: Union[bool, str, os.PathLike[str], None] = None,
        reward_coefficient: float = 0.1,
        target_tokens: int = 512,
        patterns: Optional[List[str]] = None,
        min_score: float = 1.0,
        max_score: float = 10.0,
        temperature: Optional[float] = None,
        max_tokens: Optional[int] = None,
        reminder: Optional[str] = None,
        verdict: str = "auto",
        reasoning_field: bool = False,
        samples: int = 1,
        aggregate: str = "mean",
        quorum: Optional[int] = None,
        seed: Optional[int] = None,
        mode: str = "pointwise",
        swap: bool = False,
        inconsistent: str = "tie",
        max_tokens_cap: Optional[int] = 4096,
        reasoning_effort: Optional[str] = None,
    ) -> Judge:
        """A judge over ``route`` (seed 003), with ``echelon judge``'s options:
        ``verdict`` ``auto`` | ``json_schema`` | ``regex``; ``samples`` K judgements per
        item aggregated by ``aggregate`` ``mean`` | ``median`` | ``majority`` (fewer
        than ``quorum`` parsed → ``error: no_quorum``); ``mode="pairwise"`` judges items
        with ``response_a`` / ``response_b`` (``swap`` both orders, ``inconsistent``
        ``tie`` | ``error``). ``temperature`` None is 0, or 0.7 when ``samples`` > 1.
        Raises :class:`EchelonError` (400) for a bad option or rubric."""
    @property
    def ledger_path(self) -> Optional["os.PathLike[str]"]:
        """The ledger file (a pathlib.Path), None when the config disables it."""
    def close(self) -> Awaitable[None]:
        """Stops background tasks and flushes the ledger. Idempotent."""
    def close_sync(self) -> None: ...
    def __enter__(self) -> Gateway: ...
    def __exit__(self, *args: object) -> bool: ...

_open_gateways: Any
