"""Writes the Echelon config failoverbench runs against (scripts/failoverbench.sh).

Usage: config.py CATALOGUE WALL_URL [--plain] > echelon.yaml

One task group per scenario, named by the scenario's model (the name the runner sends):
echelon1 is the wall's faulty model, echelon2 the scenario's healthy fallback. The
settings are what a new user would write from the README: deadlines of 10 s for the
first token and between chunks, the default retry policy (`retry_on`), and three choices
the README leaves to the user, each a preference the scenarios score:

- `stream_failure: continue` on every group: a stream cut after its first chunk is
  finished by the fallback (S08, S09, S14) instead of ending with the error event;
- `rate_limit_wait: 3` on every model: a 429 with `Retry-After: 2` is waited out on the
  primary (S01 wants it retried) instead of going to the fallback at once (the default,
  which S01 scores `partial`);
- the healthy models declare `context_window: 128000`: the larger-context model S12
  asks a context-length refusal to move to (the faulty models declare none; Echelon
  reads the window the refusal states).

`--plain` leaves those three out: the defaults with the two deadlines only.
"""

import sys

import yaml


def model_id(upstream: str) -> str:
    # `fb-s01-429-retry-after` is the route; the model behind it is `wall-s01`.
    tag = upstream[3:].split("-", 1)[0] if upstream.startswith("fb-s") else upstream[3:]
    return f"wall-{tag}"


def main() -> None:
    catalogue, wall_url = sys.argv[1], sys.argv[2]
    plain = "--plain" in sys.argv[3:]
    with open(catalogue, encoding="utf-8") as fh:
        cat = yaml.safe_load(fh)
    default_fb = cat.get("default_fallback", "fb-ok")
    healthy = {"provider": "wall"} if plain else {"provider": "wall", "context_window": 128000}
    models = {
        # The healthy models: fb-ok accepts an assistant prefill, fb-ok-noprefill does not.
        default_fb: {**healthy, "model": default_fb, "prefill": True},
        "fb-ok-noprefill": {**healthy, "model": "fb-ok-noprefill"},
    }
    groups = {}
    for sc in cat["scenarios"]:
        upstream = sc["model"]
        mid = model_id(upstream)
        models[mid] = {"provider": "wall", "model": upstream}
        fb = sc.get("fallback_model", default_fb)
        models.setdefault(fb, {**healthy, "model": fb})
        groups[upstream] = {
            "description": f"{sc['id']}: {sc['title']}",
            "echelon1": {"models": [mid]},
            "echelon2": {"models": [fb]},
        }
        if not plain:
            groups[upstream]["stream_failure"] = {"mode": "continue", "max_continuations": 1}
    cfg = {
        "server": {"api_keys": ["sk-failoverbench"]},
        "providers": {"wall": {"base_url": wall_url}},
        "model_defaults": {"first_token_timeout": 10, "chunk_timeout": 10}
        if plain
        else {"first_token_timeout": 10, "chunk_timeout": 10, "rate_limit_wait": 3},
        "models": models,
        "task_groups": groups,
    }
    sys.stdout.write("# written by bench/failoverbench/config.py for scripts/failoverbench.sh\n")
    yaml.safe_dump(cfg, sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main()
