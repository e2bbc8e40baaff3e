"""generate's progress bar (the shell's only terminal output while it runs)."""
from __future__ import annotations

import time

from tqdm.auto import tqdm

from functional_llm.outputs import RequestOutput


class Progress:
    """generate's progress bar: output tokens against the sum of max_tokens (a request that
    ends early adds what it did not use), with prompts done and prompt / output tok/s since
    the call started (not the last step's; tqdm's own rate would count those jumps too)."""

    def __init__(self, reqs, counters, enabled: bool):
        self.max_tokens = {req.rid: req.params.max_tokens for req, _ in reqs}
        self.start, self.prefilled0 = time.perf_counter(), counters.prefill_tokens
        self.prefilled = self.made = self.done = 0
        self.bar = tqdm(total=sum(self.max_tokens.values()), disable=not enabled, desc="Generating",
                        dynamic_ncols=True,    # the line is cut to the width: it never wraps
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} tokens "
                                   "[{elapsed}<{remaining}{postfix}]")

    def step(self, deltas, counters) -> None:
        n = sum(rid in self.max_tokens for rid in deltas.rids)
        self.made += n
        self.prefilled = counters.prefill_tokens - self.prefilled0
        self._show(n)

    def finished(self, out: RequestOutput) -> None:
        self.done += 1
        self._show(self.max_tokens[out.request_id] - len(out.token_ids))

    def _show(self, n: int) -> None:   # a disabled bar ignores both calls
        dt = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.done}/{len(self.max_tokens)} prompts, prompt "
                                 f"{self.prefilled / dt:.0f} tok/s, output {self.made / dt:.0f} tok/s",
                                 refresh=False)
        self.bar.update(n)         # redraws at most every 0.1 s, on the same line

    def close(self) -> None:
        self.bar.close()
