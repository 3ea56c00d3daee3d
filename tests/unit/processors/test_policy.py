from pathlib import Path

import pytest

from pydantic import ValidationError

from throttlex.processors.core.policy import PolicyFileError, SlidingWindowAlgorithm, load_policies
from tests.factories import make_event

FILES = Path(__file__).parent / "policy_files"
SAMPLE = Path(__file__).parents[3] / "deploy" / "config" / "policies.yaml"


def test_the_shipped_sample_policy_file_loads() -> None:
    policies = load_policies(SAMPLE)
    algorithms = {policy.name: policy.algorithm.type for policy in policies.policies}
    assert algorithms == {"per-key-10s": "sliding_window", "per-tenant-burst": "token_bucket",
                          "per-ip-hourly": "fixed_window", "monthly-plan-quota": "quota",
                          "writes-per-second": "sliding_window"}  # fmt: skip
    assert policies.limit_of(policies.policies[3], policies.default_plan) == 100_000  # the free plan's month


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("window_not_whole_buckets", "policy 'uneven': algorithm.sliding_window: Value error, window_s must be a whole multiple of bucket_s"),
        ("unknown_algorithm", "policy 'leaky': algorithm: Input tag 'leaky_bucket'"),
        ("duplicate_names", "policy names must be unique; repeated: twice"),
        ("zero_limit", "policy 'nothing-allowed': algorithm.sliding_window.limit: Input should be greater than 0"),
        ("unknown_dimension", "policy 'per-country': key.0: Input should be 'api_key', 'tenant', 'ip', 'route' or 'method'"),
        ("unknown_time_zone", "policy 'monthly': algorithm.quota: Value error, unknown time zone 'Europe/Atlantis'"),
        ("quota_without_plan_units", "policy 'daily': a quota without a limit needs plans with daily_units"),
        ("not_yaml", "not valid YAML"),
        ("unknown_default_plan", "default_plan 'gold' is not one of the plans: free"),
        ("shared_key_limit_from_plan", "policy 'tenant-month': keyed on [tenant], which keys of different plans share, "
                                       "it cannot take its limit from the calling key's plan; give it a limit"),
        ("shared_key_match_on_plan", "policy 'free-ip-burst': keyed on [ip], which keys of different plans share, "
                                     "it cannot match on plans (its block would refuse keys of every plan)"),
        ("absurd_window", "policy 'forever': algorithm.sliding_window.window_s: Input should be less than or equal to 31622400"),
        ("too_many_buckets", "policy 'fine-grained': algorithm.sliding_window: Value error, at most 100000 buckets per window"),
        ("negative_route_cost", "policy 'refunds': route_costs./v1/refund: Input should be greater than or equal to 0"),
    ],
)
def test_bad_policy_files_are_refused_with_file_policy_and_defect(name: str, message: str) -> None:
    path = FILES / f"{name}.yaml"
    with pytest.raises(PolicyFileError) as caught:
        load_policies(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)


def test_missing_file_is_named() -> None:
    with pytest.raises(PolicyFileError, match="nowhere.yaml: cannot read policy file"):
        load_policies(FILES / "nowhere.yaml")


def test_match_on_route_glob_and_method(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "policies:\n"
        "  - {name: writes, match: {routes: ['/v1/items/*'], methods: [post]}, key: [api_key],\n"
        "     algorithm: {type: sliding_window, limit: 5, window_s: 1, bucket_s: 0.1}}\n"
    )
    policies = load_policies(path)
    assert policies.matching(make_event(route="/v1/items/{item_id}", method="POST"))
    assert not policies.matching(make_event(route="/v1/items/{item_id}", method="GET"))
    assert not policies.matching(make_event(route="/v2/other", method="POST"))


def test_a_sliding_window_under_a_millisecond_is_refused() -> None:
    """5e-324 s passed `gt=0`, rounded to a 0 ms window that every bucket size divides, and the window's
    construction then failed inside a dry run (a 500 the API fuzzing found)."""
    with pytest.raises(ValidationError, match="window_s"):
        SlidingWindowAlgorithm.model_validate({"type": "sliding_window", "limit": 1, "window_s": 5e-324})
