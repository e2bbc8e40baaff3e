"""Planted-bug check: apply known mutants to a temporary copy of functional_llm/ (core/, and
the pipelined engine's order in runtime/engine.py) and show that the property suite catches
every one.

    python -m properties.mutants                 # core properties, ~5 minutes on 2 cores
    python -m properties.mutants --with-model    # also the tiny-model differential properties
    python -m properties.mutants --only free_shared_block

The real files are never edited: functional_llm/, properties/ and tests/tiny_models.py are
copied to a temporary folder, one mutant is applied there, and pytest runs the properties
from that folder (so `import functional_llm` resolves to the mutated copy; checked before each
run). The bounded profile is derandomized, so the table is reproducible; shrinking is off
(FUNCTIONAL_LLM_HYPOTHESIS_PROFILE=mutants) since only "caught or not" matters here.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor, as_completed

import attrs

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORE_TESTS = ["properties/test_pool_machine.py", "properties/test_scheduler_machine.py",
              "properties/test_pipeline_machine.py", "properties/test_hashing.py",
              "properties/test_trace_roundtrip.py", "properties/test_outputs_machine.py"]
MODEL_TESTS = ["properties/test_model_differential.py"]


@attrs.frozen
class Mutant:
    name: str
    what: str
    file: str                 # relative to functional_llm/
    edits: tuple              # (old, new) pairs; each old must occur exactly once


def _m(name, what, file, *edits):
    return Mutant(name, what, file, edits)


MUTANTS = (
    _m("append_off_by_one", "schedule appends blocks for one token fewer than scheduled",
       "core/scheduler.py", ("B.blocks_for(seq.num_computed + n, S)", "B.blocks_for(seq.num_computed + n - 1, S)")),
    _m("free_shared_block", "free drops every reference of a block, shared or not",
       "core/blocks.py", ("        ref[b] -= 1\n        if ref[b] == 0:", "        ref[b] = 0\n        if ref[b] == 0:")),
    _m("match_last_partial_block", "match_prefix also tries the last (partial) block",
       "core/blocks.py", ("for j in range((len(tokens) - 1) // S):", "for j in range(-(-len(tokens) // S)):")),
    _m("hash_before_kv", "commit indexes blocks full of tokens, not of computed KV",
       "core/commit.py", ("full = seq.num_computed // S", "full = len(seq.tokens) // S"),
       ("caching and seq.num_computed // S >", "caching and len(seq.tokens) // S >")),
    _m("keep_hash_on_evict", "allocate reuses a cached block without dropping its hash",
       "core/blocks.py", ("            info = cached.get(b)\n", "            info = None\n")),
    _m("keep_num_computed_on_preempt", "a preempted sequence keeps its num_computed",
       "core/scheduler.py", ("return Seq(seq.req, seq.tokens, 0, NO_BLOCKS,",
                        "return Seq(seq.req, seq.tokens, seq.num_computed, NO_BLOCKS,")),
    _m("trust_the_hash", "match_prefix believes the hash, skipping the token comparison",
       "core/blocks.py", ("if info is None or info.tokens != block_tokens or info.parent != parent:",
                     "if info is None or info.parent != parent:")),
    _m("ignore_parent_link", "match_prefix skips the parent-link comparison",
       "core/blocks.py", ("if info is None or info.tokens != block_tokens or info.parent != parent:",
                     "if info is None or info.tokens != block_tokens:")),
    _m("budget_not_charged", "running sequences do not use up the token budget",
       "core/scheduler.py", ("        budget -= n\n        i += 1", "        i += 1")),
    _m("leak_on_finish", "commit does not free a finished sequence's blocks",
       "core/commit.py", ("        seq = seqs.pop(rid)\n        pool = B.free(pool, seq.block_table)\n",
                          "        seq = seqs.pop(rid)\n")),
    _m("compaction_loses_positions", "free-queue compaction keeps the blocks, not their positions",
       "core/blocks.py", ("        queued_at[b] = i\n", "        queued_at[b] = queued_at[b]\n")),
    _m("free_first_block_first", "free queues a table's first block first (tails outlive prefixes)",
       "core/blocks.py", ("for b in reversed([int(b) for b in blocks]):", "for b in [int(b) for b in blocks]:")),
    _m("preempt_frees_front_first", "a preemption frees the victim's table first block first "
       "(its cached prefix is evicted before its tail)", "core/scheduler.py",
       ("pool = B.free(pool, seq.block_table)", "pool = B.free(pool, seq.block_table[::-1])")),
    _m("resolve_leaves_it_waiting", "resolve drops a finished sequence preempted meanwhile "
       "from seqs but leaves it waiting", "core/commit.py",
       ("        if waiting:\n            waiting = tuple(r for r in waiting if r not in finished)\n", "")),
    _m("index_pending_block", "advance counts full blocks one token too far (indexes the block "
       "of the pending token)", "core/commit.py", ("full = seq.num_computed // S", "full = (seq.num_computed + 1) // S"),
       ("caching and seq.num_computed // S >", "caching and (seq.num_computed + 1) // S >")),
    _m("without_keeps_gone_rows", "Plan.without drops no rows", "core/records.py",
       ("keep = [rid not in gone for rid in self.rids]", "keep = [True for rid in self.rids]")),
    _m("engine_resolve_after_advance", "the pipelined engine advances step k before resolving k-1",
       "runtime/engine.py",
       ("        if launched is not None:\n            plan, _ = plan.without(launched.gone)\n"
        "            self.state = C.advance(self.state, self.sched, plan)\n", ""),
       ("        deltas = Deltas()\n        if prev is not None:\n",
        "        if launched is not None:\n            self.state = C.advance(self.state, self.sched, plan)\n"
        "        deltas = Deltas()\n        if prev is not None:\n")),
    _m("stop_window_one_short", "stop strings are searched with one character too few of the "
       "earlier text", "outputs.py", ("max(map(len, stops)) - 1", "max(map(len, stops)) - 2")),
)


def make_workspace() -> pathlib.Path:
    work = pathlib.Path(tempfile.mkdtemp(prefix="fl-mutants-"))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "functional_llm", work / "functional_llm", ignore=ignore)
    shutil.copytree(ROOT / "properties", work / "properties", ignore=ignore)
    (work / "tests").mkdir()
    shutil.copy(ROOT / "tests" / "tiny_models.py", work / "tests" / "tiny_models.py")
    shutil.copy(ROOT / "pyproject.toml", work / "pyproject.toml")
    return work


def apply(work: pathlib.Path, mutant: Mutant) -> None:
    path = work / "functional_llm" / mutant.file
    text = path.read_text()
    for old, new in mutant.edits:
        if text.count(old) != 1:
            raise SystemExit(f"mutant {mutant.name}: {old!r} occurs {text.count(old)} times in "
                             f"{mutant.file}; update properties/mutants.py")
        text = text.replace(old, new)
    path.write_text(text)


def run_mutant(mutant, tests) -> dict:
    """Apply one mutant to a fresh copy and run the properties there."""
    work = make_workspace()
    try:
        if mutant is not None:
            apply(work, mutant)
        return run_suite(work, tests)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_suite(work: pathlib.Path, tests: list) -> dict:
    """test name -> None if it passed, else the invariants its failure message names."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(FUNCTIONAL_LLM_HYPOTHESIS_PROFILE="mutants", PYTHONDONTWRITEBYTECODE="1")
    where = subprocess.run([sys.executable, "-c", "import functional_llm; print(functional_llm.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(work)), f"the copy is not what gets imported: {where}"
    report = work / "report.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                    *tests], cwd=work, env=env, capture_output=True, text=True)
    results = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        failure = case.find("failure") if case.find("failure") is not None else case.find("error")
        if failure is None:
            results[case.get("name")] = None
        else:   # the exception's own message: the traceback's source lines name invariants too
            text = failure.get("message") or ""
            results[case.get("name")] = sorted(set(re.findall(r"\b(I\d+)(?=[:\s]|$)", text)),
                                               key=lambda t: int(t[1:])) or ["?"]
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--with-model", action="store_true", help="also run the tiny-model properties")
    parser.add_argument("--only", nargs="*", help="mutant names")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="mutants run at once")
    args = parser.parse_args(argv)
    tests = CORE_TESTS + (MODEL_TESTS if args.with_model else [])
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    baseline = run_mutant(None, tests)
    if failures(baseline) or not baseline:
        print(f"the unmutated suite does not pass: {sorted(failures(baseline)) or 'no tests ran'}")
        return 2
    caught = {}
    with ThreadPoolExecutor(args.jobs) as pool:     # each run is its own pytest process
        futures = {pool.submit(run_mutant, m, tests): m for m in mutants}
        for future in as_completed(futures):
            m = futures[future]
            caught[m.name] = failures(future.result())
            print(f"{m.name:30s} {'CAUGHT' if caught[m.name] else 'MISSED'} by {len(caught[m.name])} test(s)",
                  flush=True)
    print_table([(m, caught[m.name]) for m in mutants], sorted(baseline))
    return 0 if all(caught.values()) else 1


def failures(results: dict) -> dict:
    """The failed tests of a run_suite result, with the invariants they name."""
    return {t: r for t, r in results.items() if r is not None}


LABELS = {"pool_machine": "pool", "pool_machine_with_weak_hash": "pool-weak",
          "free_queue_compaction_over_long_runs": "compaction", "scheduler_machine": "sched",
          "scheduler_machine_with_weak_hash": "sched-weak", "pipeline_machine": "pipe",
          "equal_prefixes_iff_equal_chain_hashes": "hash", "chain_hash_stable_across_processes": "hash-proc",
          "generated_traces_replay_exactly": "replay", "generated_pipelined_traces_replay_exactly": "replay-pipe",
          "tampered_step_is_reported_at_that_step": "tamper",
          "any_split_into_deltas_gives_the_one_delta_output": "out-split",
          "abort_after_k_tokens_gives_the_output_of_those_k": "out-abort",
          "streamed_deltas_join_to_the_final_output_and_never_show_a_stop": "out-stream",
          "text_is_the_decode_of_the_tokens_cut_before_the_first_stop": "out-text",
          "prefix_hit_kv_equals_recomputed_kv": "model-I9",
          "tokens_independent_of_batching_chunking_preemption_and_hits": "model-I10"}


def label(test: str) -> str:
    """test_I1_I2_pool_machine -> 'pool' (the name without its invariant tags, shortened)."""
    bare = re.sub(r"^test_(I\d+_)*", "", test)
    return LABELS.get(bare, bare)


def print_table(rows, tests) -> None:
    """One row per mutant: x where a property failed, then the invariants the failures name."""
    order = list(LABELS.values())
    tests = sorted(tests, key=lambda t: order.index(label(t)) if label(t) in order else len(order))
    columns = [label(t) for t in tests]
    print("\n" + " " * 30 + " ".join(f"{c:>{len(c)}}" for c in columns) + "  invariants violated")
    for m, caught in rows:
        cells = " ".join(f"{'x' if t in caught else '.':>{len(c)}}" for t, c in zip(tests, columns))
        fired = sorted({i for r in caught.values() for i in r}, key=lambda t: (t == "?", t[1:].zfill(3)))
        print(f"{m.name:30s}{cells}  {', '.join(fired) if caught else 'MISSED'}")
    print("\n" + "\n".join(f"{m.name:30s}{m.what}" for m, _ in rows))


if __name__ == "__main__":
    sys.exit(main())
