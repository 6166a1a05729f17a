"""A verl reward function scored by Echelon's judge (seed 003's LengthPenaltyRewardManager,
without its hand-written retries): failover across judge models, re-asks, the cache and
the ledger come from the gateway.

In a verl config (custom reward function):

    custom_reward_function:
      path: examples/verl_reward.py
      name: compute_score

with ECHELON_CONFIG / ECHELON_JUDGE_ROUTE in the environment. verl's NaiveRewardManager
calls compute_score(data_source, solution_str, ground_truth, extra_info) per sample and
takes result["score"]; the other keys go to reward_extra_info.

A failed judgement is never a number. Here on_failure="skip" returns {"score": None,
"scored": False, "error": ...}; MaskingRewardManager below shows a reward manager that
leaves such samples out instead of training on an invented 0.0. With on_failure="raise"
(the default) the step fails loudly with echelon.rl.JudgeFailed.

Run it directly for a smoke test against any config:

    python examples/verl_reward.py examples/demo.yaml demo_group
"""

import os
import sys

import echelon.rl

RUBRIC = (
    "Question: {prompt}\nReference answer: {reference}\nAnswer to grade: {response}\n"
    "Grade the answer from 1 to 10 and end with a line 'Score: X'."
)

_compute_score = None


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """verl's compute_score signature; the judge is built on first use (per worker)."""
    global _compute_score
    if _compute_score is None:
        _compute_score = echelon.rl.make_compute_score(
            os.environ["ECHELON_CONFIG"],
            os.environ.get("ECHELON_JUDGE_ROUTE", "default"),
            rubric=RUBRIC,
            on_failure="skip",
            concurrency=256,
            max_reasks=2,
            cache=True,
            reward_coefficient=0.1,
            target_tokens=512,
        )
    return _compute_score(data_source, solution_str, ground_truth, extra_info)


class MaskingRewardManager:
    """The shape of a verl reward manager using the batch variant: scored samples get
    their reward, unscored ones are reported in `mask` (False) and keep no reward."""

    def __init__(self, config_path, route):
        self.score = echelon.rl.make_compute_score(config_path, route, rubric=RUBRIC, on_failure="skip")

    def __call__(self, data_sources, solution_strs, ground_truths, extra_infos=None):
        results = self.score.batch(data_sources, solution_strs, ground_truths, extra_infos)
        rewards = [r["score"] for r in results]  # None where unscored
        mask = [r["scored"] for r in results]
        return rewards, mask


if __name__ == "__main__":
    config, route = sys.argv[1], sys.argv[2]
    manager = MaskingRewardManager(config, route)
    rewards, mask = manager(
        ["gsm8k", "gsm8k"],
        ["2 + 2 = 4", "2 + 2 = 5"],
        ["4", "4"],
        [{"prompt": "What is 2 + 2?"}, {"prompt": "What is 2 + 2?"}],
    )
    print("rewards:", rewards, "scored:", mask)
