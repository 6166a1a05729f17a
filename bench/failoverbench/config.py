"""Writes the Echelon config failoverbench runs against (scripts/failoverbench.sh).

Usage: config.py CATALOGUE WALL_URL > echelon.yaml

One task group per scenario, named by the scenario's model (the name the runner sends):
echelon1 is the wall's faulty model, echelon2 the scenario's healthy fallback. The
settings are what a new user would write from the README: deadlines of 10 s for the
first token and between chunks, the default retry policy, and continuation of a stream
that fails after its first chunk (`stream_failure: continue`).
"""

import sys

import yaml


def model_id(upstream: str) -> str:
    # `fb-s01-429-retry-after` is the route; the model behind it is `wall-s01`.
    tag = upstream[3:].split("-", 1)[0] if upstream.startswith("fb-s") else upstream[3:]
    return f"wall-{tag}"


def main() -> None:
    catalogue, wall_url = sys.argv[1], sys.argv[2]
    with open(catalogue, encoding="utf-8") as fh:
        cat = yaml.safe_load(fh)
    default_fb = cat.get("default_fallback", "fb-ok")
    models = {
        # The healthy models: fb-ok accepts an assistant prefill, fb-ok-noprefill does not.
        default_fb: {"provider": "wall", "model": default_fb, "prefill": True},
        "fb-ok-noprefill": {"provider": "wall", "model": "fb-ok-noprefill"},
    }
    groups = {}
    for sc in cat["scenarios"]:
        upstream = sc["model"]
        mid = model_id(upstream)
        models[mid] = {"provider": "wall", "model": upstream}
        fb = sc.get("fallback_model", default_fb)
        models.setdefault(fb, {"provider": "wall", "model": fb})
        groups[upstream] = {
            "description": f"{sc['id']}: {sc['title']}",
            "echelon1": {"models": [mid]},
            "echelon2": {"models": [fb]},
            "stream_failure": {"mode": "continue", "max_continuations": 1},
        }
    cfg = {
        "server": {"api_keys": ["sk-failoverbench"]},
        "providers": {"wall": {"base_url": wall_url}},
        "model_defaults": {"first_token_timeout": 10, "chunk_timeout": 10},
        "models": models,
        "task_groups": groups,
    }
    sys.stdout.write("# written by bench/failoverbench/config.py for scripts/failoverbench.sh\n")
    yaml.safe_dump(cfg, sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main()
