"""The reliability battery's scenarios and API cases: files a user brings and bad values given to the Python API
end in one clear error naming the culprit (or succeed where success is right), and no earlier file is lost."""

import pytest

from dpolicy.bench.reliability import SCENARIOS, _api_cases, classify, run_api_cases, run_scenario


@pytest.mark.parametrize("command,setup,culprit", SCENARIOS,
                         ids=[f"{c}:{getattr(s, '__name__', 'setup')}:{k}" for c, s, k in SCENARIOS])
def test_files_a_user_brings(tmp_path, command, setup, culprit):
    kind, lost = run_scenario(command, setup, culprit, tmp_path)
    assert kind == ("ok" if culprit is None else "clear") and lost == []


def test_api_cases_are_clear_errors():
    results = dict(run_api_cases())
    assert len(results) == len(_api_cases()) >= 20
    assert {k for k in results.values()} == {"clear"}, {n: k for n, k in results.items() if k != "clear"}


def test_classify_tells_clear_errors_from_tracebacks():
    assert classify(2, "error: train.steps='x' must be an integer.\n", "train.steps") == "clear"
    assert classify(2, "error: something else\n", "train.steps") == "unclear"
    assert classify(2, "error: a\nerror: b\n", "a") == "unclear"
    assert classify(1, "Traceback (most recent call last):\n  ...\nValueError: x\n", "x") == "traceback"
