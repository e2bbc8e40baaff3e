"""The project's Hypothesis profiles, loaded explicitly by properties/conftest.py (so Hypothesis'
own "ci" profile, picked when the CI variable is set, never decides the budget).

    FUNCTIONAL_LLM_HYPOTHESIS_PROFILE=bounded    (default) derandomized, ~1 min on 2 cores
    FUNCTIONAL_LLM_HYPOTHESIS_PROFILE=thorough   random, 10x the examples, longer machines

Tests state their example count for the bounded profile through budget(n); the thorough
profile scales it. Derandomized runs are reproducible: the mutant table relies on that.
"""
import os

from hypothesis import HealthCheck, Phase, settings

ENV = "FUNCTIONAL_LLM_HYPOTHESIS_PROFILE"
_SCALE = {"bounded": 1, "thorough": 10, "mutants": 1}
_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

settings.register_profile("functional_llm.bounded", derandomize=True, database=None,
                          max_examples=50, stateful_step_count=40, **_COMMON)
# the planted-bug check (properties/mutants.py): bounded, without shrinking (only "fails?" counts)
settings.register_profile("functional_llm.mutants", parent=settings.get_profile("functional_llm.bounded"),
                          phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.register_profile("functional_llm.thorough", derandomize=False,
                          max_examples=500, stateful_step_count=100, **_COMMON)


def active() -> str:
    name = os.environ.get(ENV, "bounded")
    if name not in _SCALE:
        raise ValueError(f"{ENV}={name!r}: expected one of {sorted(_SCALE)}")
    return name


def load() -> None:
    settings.load_profile(f"functional_llm.{active()}")


def budget(n: int) -> int:
    """Examples for a test that runs n of them under the bounded profile."""
    return n * _SCALE[active()]
