"""docs/transitions.md and the test names agree (properties/doc_check.py); the example runs."""
from properties.doc_check import ROOT, check, doc_invariants, problems, tagged_tests


def test_doc_and_test_names_agree():
    assert check() == []


def test_doc_check_reports_every_kind_of_mismatch():
    doc = doc_invariants("| I1 | partition | `test_I1_pool` |\n"
                         "| I2 | refcount | `test_I2_gone` |\n"
                         "| I3 | tail | |\n"
                         "| I4 | hashes | `test_I1_pool` |\n")
    tests = tagged_tests({"t.py": "def test_I1_pool(): pass\n"
                                  "def test_I7_orphan(): pass\n"
                                  "def test_I3_unlisted(): pass\n"
                                  "def test_plain(): pass\n"})
    assert tests == {"test_I1_pool": {"I1"}, "test_I7_orphan": {"I7"}, "test_I3_unlisted": {"I3"}}
    found = problems(doc, tests)
    assert len(found) == 5, found
    for fragment in ("I2: the doc lists `test_I2_gone`", "I3: the doc names no test",
                     "I4: the doc lists `test_I1_pool`, whose name does not carry I4",
                     "`test_I7_orphan` names I7, which the doc does not define",
                     "`test_I3_unlisted` names I3, but the doc does not list it"):
        assert any(fragment in p for p in found), fragment


def test_walkthrough_example_runs(capsys):
    """examples/walkthrough.py stays runnable and still shows what it says it shows."""
    import runpy
    runpy.run_path(str(ROOT / "examples" / "walkthrough.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "preempted: C" in out and "cached prefix 8" in out and "abort C" in out
