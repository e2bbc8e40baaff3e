"""A walk through the engine's pure core: three requests on a tiny KV pool, printed after
every transition. No model and no torch: a stand-in "model" picks each next token from the
tokens before it, which is all the core needs to see.

    python examples/walkthrough.py

What to watch:
  * admit      puts a request in `waiting`; nothing is allocated yet.
  * schedule   gives running sequences their next tokens (1 for a decode, a chunk of the
               prompt for a prefill), allocates the blocks those tokens need, admits waiting
               requests (reusing cached prefix blocks: "cached" > 0) and, when the pool is
               full, preempts the youngest request (its blocks are freed, it waits again).
  * commit     folds the sampled tokens in, indexes full blocks in the prefix cache, and
               frees the blocks of finished requests (their full blocks stay cached).
  * abort      ends a request from outside; its blocks go back to the pool.
Docs: docs/transitions.md (every transition and invariant), docs/structure.md.
"""
from functional_llm.core import commit as C
from functional_llm.core import scheduler as S
from functional_llm.core.invariants import check_state
from functional_llm.core.records import Request, SamplingParams, SchedConfig, new_state

CFG = SchedConfig(block_size=4, num_blocks=8, max_num_seqs=3, max_num_batched_tokens=10,
                  max_model_len=32, eos_token_ids=(0,))
SYSTEM = (11, 12, 13, 14, 15, 16, 17, 18)       # a shared "system prompt": two full blocks


def model(tokens) -> int:
    """The stand-in model: the next token is a fixed function of the tokens so far."""
    return 20 + (7 * sum(tokens) + len(tokens)) % 70


def show(state, title, plan=None):
    print(f"\n== {title}")
    if plan is not None:
        rows = [f"{rid}[{start}:{start + n}]{'*' if smp else ''}"
                for rid, start, n, smp in zip(plan.rids, plan.starts, plan.counts, plan.sample)]
        print(f"   plan: {' '.join(rows) or '-'}   (* = samples a token)"
              + (f"   preempted: {' '.join(plan.preempted)}" if plan.preempted else ""))
    print(f"   waiting: {' '.join(state.waiting) or '-'}   running: {' '.join(state.running) or '-'}")
    for rid in state.waiting + state.running:
        seq = state.seqs[rid]
        print(f"   {rid}: {len(seq.req.prompt)} prompt + {seq.num_generated} generated tokens, "
              f"KV computed for {seq.num_computed}, blocks {seq.block_table.tolist()}, "
              f"cached prefix {seq.num_cached if seq.num_cached is not None else '-'}")
    pool = state.pool
    print(f"   pool: refs {list(pool.ref)}  free {pool.num_free}/{pool.num_blocks}  "
          f"indexed blocks {sorted(pool.cached)}")
    if plan is None:            # between steps, I1-I8 hold (mid-step, tables already
        check_state(state, CFG)  # cover the tokens being computed: I5 counts those too)


def step(state, n):
    state, plan = S.schedule(state, CFG)
    show(state, f"step {n}: schedule", plan)
    # the device step would run here: write the KV of the planned tokens, sample
    tokens = [model(state.seqs[rid].tokens[:start + count])
              for rid, start, count, smp in zip(plan.rids, plan.starts, plan.counts, plan.sample) if smp]
    state, deltas = C.commit(state, CFG, plan, tokens)
    done = ", ".join(f"{rid} finished ({why})" for rid, why in deltas.finished.items())
    show(state, f"step {n}: commit, sampled {dict(zip(deltas.rids, deltas.tokens))} {done}")
    return state


def main():
    state = new_state(CFG)
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    state = S.admit(state, CFG, Request("A", SYSTEM + (41, 42, 43), greedy, seed=0, arrival=0))
    show(state, "admit A (11 tokens: the system prompt + a question)")
    for n in (1, 2):                 # A's prompt does not fit one step's 10-token budget
        state = step(state, n)
    state = S.admit(state, CFG, Request("B", SYSTEM + (51, 52), greedy, seed=0, arrival=1))
    state = S.admit(state, CFG, Request("C", tuple(range(60, 72)), SamplingParams(max_tokens=9),
                                        seed=7, arrival=2))
    show(state, "admit B (shares A's system prompt) and C (12 unrelated tokens)")
    # step 3: B reuses A's two system-prompt blocks (cached prefix 8), C starts in chunks;
    # step 5: the pool is full, so C (the youngest) is preempted and waits again;
    # step 6: C comes back and recomputes only from token 8: its own first two blocks were
    # still in the prefix cache (blocks of finished or preempted requests stay indexed
    # until a new allocation evicts them)
    for n in range(3, 8):
        state = step(state, n)
    state = C.abort(state, "C")
    show(state, "abort C (its full blocks stay cached; every refcount is back to 0)")
    print(f"\ncounters: {state.counters}")


if __name__ == "__main__":
    main()
