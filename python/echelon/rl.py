"""Reward functions for RL training loops (verl), scored by Echelon's judge.

``make_compute_score(config, route, rubric=..., on_failure="raise" | "skip")`` returns a
function with verl's ``compute_score(data_source, solution_str, ground_truth,
extra_info=None)`` signature. It judges the solution through the gateway (task groups,
failover, the judge's re-asks and cache) and returns a dict verl accepts
(``{"score": float, ...}``; the extra keys go to ``reward_extra_info``).

A judge failure is never a number: with ``on_failure="raise"`` it raises
:class:`JudgeFailed`; with ``"skip"`` it returns ``{"score": None, "scored": False,
"error": ...}`` so the reward manager can leave the sample out (mask it) instead of
training on an invented 0.0.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from ._native import EchelonError, Gateway

__all__ = ["JudgeFailed", "make_compute_score"]


class JudgeFailed(EchelonError):
    """The judge could not score a sample (the judge call failed, or its answer had no
    score in range after the re-asks). ``result`` is the judge's result dict."""

    def __init__(self, message: str, result: Dict[str, Any]):
        super().__init__(message)
        self.result = result
        self.status = 502
        self.type = "api_error"
        self.code = "judge_failed"
        self.attempts = []


def _item(index: int, solution_str: str, ground_truth: Any, extra_info: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    extra = extra_info or {}
    prompt = extra.get("prompt", extra.get("question", ""))
    if not isinstance(prompt, str):
        prompt = str(prompt)
    reference = ground_truth if ground_truth is None or isinstance(ground_truth, str) else str(ground_truth)
    return {
        "id": index,
        "prompt": prompt,
        "response": solution_str,
        "reference": reference,
    }


def _outcome(result: Mapping[str, Any], on_failure: str) -> Dict[str, Any]:
    if result.get("error") is None and result.get("reward") is not None:
        return {
            "score": result["reward"],
            "judge_score": result["score"],
            "length_penalty": result["length_penalty"],
            "cached": result["cached"],
            "scored": True,
        }
    why = result.get("error") or "no score"
    if on_failure == "raise":
        raise JudgeFailed(f"judge failed on item {result.get('id')!r}: {why}", dict(result))
    return {"score": None, "scored": False, "error": why}


def make_compute_score(
    config: Union[str, "os.PathLike[str]", Gateway],
    route: str,
    rubric: Optional[str] = None,
    on_failure: str = "raise",
    **judge_options: Any,
) -> Callable[..., Dict[str, Any]]:
    """A verl ``compute_score`` function judging through ``route`` of ``config`` (a config
    path, or an :class:`echelon.Gateway`).

    ``judge_options`` go to :meth:`echelon.Gateway.judge` (``concurrency``,
    ``max_reasks``, ``cache``, ``reward_coefficient``, ``target_tokens``, ``patterns``, …).
    The returned function also has ``.batch(data_sources, solution_strs, ground_truths,
    extra_infos)`` (verl's batch reward signature, a list in input order), ``.abatch``
    (the same, awaitable) and ``.judge`` / ``.gateway``.

    Raises ``ValueError`` for an unknown ``on_failure``, ``ConfigError`` for a bad config.
    """
    if on_failure not in ("raise", "skip"):
        raise ValueError(f"on_failure must be 'raise' or 'skip', got {on_failure!r}")
    gateway = config if isinstance(config, Gateway) else Gateway.from_config(os.fspath(config))
    judge = gateway.judge(route=route, rubric=rubric, **judge_options)

    def compute_score(data_source: Any, solution_str: str, ground_truth: Any,
                      extra_info: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        (result,) = judge.score_sync([_item(0, solution_str, ground_truth, extra_info)])
        return _outcome(result, on_failure)

    def _items(solution_strs: Sequence[str], ground_truths: Sequence[Any],
               extra_infos: Optional[Sequence[Any]]) -> List[Dict[str, Any]]:
        extras = list(extra_infos) if extra_infos is not None else [None] * len(solution_strs)
        return [
            _item(i, s, g, e)
            for i, (s, g, e) in enumerate(zip(solution_strs, ground_truths, extras))
        ]

    def batch(data_sources: Sequence[Any], solution_strs: Sequence[str], ground_truths: Sequence[Any],
              extra_infos: Optional[Sequence[Any]] = None) -> List[Dict[str, Any]]:
        results = judge.score_sync(_items(solution_strs, ground_truths, extra_infos))
        return [_outcome(r, on_failure) for r in results]

    async def abatch(data_sources: Sequence[Any], solution_strs: Sequence[str], ground_truths: Sequence[Any],
                     extra_infos: Optional[Sequence[Any]] = None) -> List[Dict[str, Any]]:
        results = await judge.score(_items(solution_strs, ground_truths, extra_infos))
        return [_outcome(r, on_failure) for r in results]

    compute_score.batch = batch  # type: ignore[attr-defined]
    compute_score.abatch = abatch  # type: ignore[attr-defined]
    compute_score.judge = judge  # type: ignore[attr-defined]
    compute_score.gateway = gateway  # type: ignore[attr-defined]
    return compute_score
