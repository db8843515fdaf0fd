"""``ragguard demo`` at small scale: the same scenario, the same promises."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest
from pydantic import ValidationError

from ragguard.cli import main
from ragguard.cli.demo import DemoOptions, run_demo, theoretical_min_s

pytestmark = pytest.mark.openai


def test_monday_morning_at_small_scale() -> None:
    options = DemoOptions(users=200, rpm=3000, tpm=1_000_000, seed=3)
    report = anyio.run(run_demo, options)
    modes = {m.mode: m for m in report.modes}
    assert list(modes) == ["naive", "sdk-default", "guarded"]

    naive, sdk, guarded = modes["naive"], modes["sdk-default"], modes["guarded"]
    assert naive.failed >= 0.4 * naive.users  # the burst of 200 meets a bucket of 50
    assert guarded.succeeded == guarded.users
    # The full-scale demo holds 429s to <= 2 % (README); at 1/5 of the scale a handful of arrivals bunched by a
    # busy 2-core machine is a larger share, so the smoke test allows 5 %.
    assert guarded.upstream_429 <= 0.05 * guarded.upstream_requests
    assert guarded.theoretical_min_s > 0
    assert guarded.wall_s <= 1.3 * guarded.theoretical_min_s + 1.0  # + a second of latency at this small scale
    assert sdk.succeeded >= naive.succeeded
    assert sdk.upstream_requests > guarded.upstream_requests  # retries the SDK made blindly


def test_cli_writes_the_documented_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo.json"
    code = main(["demo", "--users", "20", "--rpm", "6000", "--modes", "guarded", "--json", str(out), "--no-progress"])
    assert code == 0
    data = json.loads(out.read_text())
    assert {"rpm", "tpm", "modes"} <= set(data)
    [mode] = data["modes"]
    keys = {"mode", "users", "succeeded", "failed", "upstream_requests", "upstream_429", "tokens"}
    keys |= {"p50_s", "p95_s", "p99_s", "wall_s", "theoretical_min_s"}
    assert keys <= set(mode)
    assert mode["mode"] == "guarded"
    assert mode["succeeded"] == 20
    assert "guarded" in capsys.readouterr().out


def test_theoretical_minimum_is_the_slowest_bucket() -> None:
    # 3000 RPM = 50/s with a bucket of 50: 200 requests need (200 - 50) / 50 = 3 s
    assert theoretical_min_s({"a": 200, "b": 100}, {"a": 0}, 3000, 1e9, 1.0) == pytest.approx(3.0)
    # tokens bind: 60,000 TPM = 1000/s, bucket 1000: 5000 tokens need 4 s
    assert theoretical_min_s({"a": 10}, {"a": 5000}, 3000, 60_000, 1.0) == pytest.approx(4.0)
    assert theoretical_min_s({}, {}, 3000, 60_000, 1.0) == 0.0


def test_bad_options_name_the_field() -> None:
    with pytest.raises(ValidationError, match="users"):
        DemoOptions(users=0)
    with pytest.raises(ValidationError, match="modes"):
        DemoOptions(modes=("naive", "yolo"))


@pytest.mark.pinecone
def test_the_rag_round_trip_at_small_scale() -> None:
    options = DemoOptions(users=60, rpm=3000, tpm=1_000_000, rag=True, corpus=60, modes=("naive", "guarded"))
    report = anyio.run(run_demo, options)
    naive, guarded = report.modes
    assert report.rag
    assert guarded.vectors_stored == 60  # every chunk landed, in bulk, within the index's write limit
    assert guarded.vector_429 == 0
    assert guarded.succeeded == 60
    assert naive.vectors_stored < guarded.vectors_stored  # one upsert per chunk at once meets the write limit
    assert naive.vector_429 > 0
