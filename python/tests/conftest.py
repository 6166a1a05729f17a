"""Fixtures of the binding tests: fault-injecting test upstreams (the echelon-testkit
binary), configs written to a temporary directory, and gateways closed after each test."""

import os
import pathlib
import re
import subprocess
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
TESTKIT = os.environ.get("ECHELON_TESTKIT", str(ROOT / "target" / "debug" / "echelon-testkit"))


class Upstream:
    """One running echelon-testkit: `url` is its base (append /v1)."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen(
            [TESTKIT, "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line = self.proc.stdout.readline()
        m = re.match(r"listening on (http\S+)", line)
        if not m:
            self.proc.kill()
            raise RuntimeError(f"testkit did not start: {line!r}")
        self.url = m.group(1)

    def stop(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def upstream():
    """A factory: upstream("--fault-rate", "1", "--faults", "500") starts a testkit."""
    started = []

    def start(*args: str) -> Upstream:
        u = Upstream(*args)
        started.append(u)
        return u

    yield start
    for u in started:
        u.stop()


@pytest.fixture
def gateway(tmp_path):
    """A factory: gateway(yaml_text) writes echelon.yaml (with a ledger in tmp_path unless
    the text sets `usage:`) and returns an echelon.Gateway, closed at the end."""
    import echelon

    made = []

    def make(text: str):
        if "usage:" not in text:
            text += f"\nusage:\n  ledger: {tmp_path / 'ledger.db'}\n  flush_interval_ms: 10\n"
        path = tmp_path / "echelon.yaml"
        path.write_text(text)
        gw = echelon.Gateway.from_config(str(path))
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.close_sync()


def wait_for(predicate, timeout=5.0):
    """Polls `predicate` until true or `timeout` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.01)
