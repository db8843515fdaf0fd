"""Policy validation and loading from RAGGUARD_* environment variables."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

import ragguard


@pytest.mark.parametrize(
    ("sections", "field"),
    [
        ({"rate_limit": {"rpm": -1}}, "rate_limit.rpm"),
        ({"rate_limit": {"tpm": 0}}, "rate_limit.tpm"),
        ({"retry": {"base": 2.0, "cap": 1.0}}, "retry.cap"),
        ({"retry": {"jitter": "sometimes"}}, "retry.jitter"),
        ({"retry": {"attempts": 0}}, "retry.attempts"),
        ({"breaker": {"window": 5, "min_calls": 10}}, "breaker.min_calls"),
        ({"breaker": {"failure_rate": 1.5}}, "breaker.failure_rate"),
        ({"concurrency": {"max_in_flight": 0}}, "concurrency.max_in_flight"),
        ({"timeout": {"attempt": -3}}, "timeout.attempt"),
        ({"retry": {"atempts": 3}}, "retry.atempts"),
    ],
)
def test_invalid_policy_names_the_field(sections: dict[str, dict[str, object]], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        ragguard.Policy(**sections)  # type: ignore[arg-type]
    locations = {".".join(str(p) for p in error["loc"]) for error in info.value.errors()}
    assert field in locations


def test_policy_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAGGUARD_RATE_LIMIT__RPM", "3000")
    monkeypatch.setenv("RAGGUARD_RATE_LIMIT__TPM", "250000")
    monkeypatch.setenv("RAGGUARD_RETRY__ATTEMPTS", "6")
    monkeypatch.setenv("RAGGUARD_RETRY__JITTER", "decorrelated")
    monkeypatch.setenv("RAGGUARD_BREAKER__ENABLED", "false")
    policy = ragguard.Policy()
    assert policy.rate_limit.rpm == 3000
    assert policy.rate_limit.tpm == 250_000
    assert policy.retry.attempts == 6
    assert policy.retry.jitter == "decorrelated"
    assert policy.breaker.enabled is False
    # code wins over the environment for what it sets
    assert ragguard.Policy(retry={"attempts": 2}).retry.attempts == 2  # type: ignore[arg-type]


def test_malformed_environment_is_a_validation_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAGGUARD_RATE_LIMIT__RPM", "lots")
    with pytest.raises(ValidationError, match="rpm"):
        ragguard.Policy()


def test_sections_are_frozen() -> None:
    policy = ragguard.Policy()
    with pytest.raises(ValidationError):
        policy.retry.attempts = 9  # type: ignore[misc]
