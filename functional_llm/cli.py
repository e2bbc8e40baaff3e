"""functional-llm command line: `functional-llm generate "PROMPT" [--model PATH]` and
`functional-llm replay TRACE [--model PATH]`."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="functional-llm")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a completion for one or more prompts")
    gen.add_argument("prompts", nargs="+")
    gen.add_argument("--model", default=None, help="HF-format folder (default: embedded SmolLM2-135M-Instruct)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument("--device", default=None)
    gen.add_argument("--dtype", default=None)
    rep = sub.add_parser("replay", help="replay a trace (LLM(trace=PATH)) and report the first "
                                        "step that does not reproduce; exit code 1 if one")
    rep.add_argument("path")
    rep.add_argument("--model", default=None,
                     help="also re-run this model folder and check the recorded tokens")
    rep.add_argument("--device", default=None, help="default: the recorded device")
    trace = sub.add_parser("trace", help="work with traces").add_subparsers(dest="action", required=True)
    plot = trace.add_parser("plot", help="plot a trace's steps (needs matplotlib: pip install "
                                         "'functional_llm[plot]')")
    plot.add_argument("path")
    plot.add_argument("-o", "--output", default="trace.png")
    args = parser.parse_args(argv)
    if args.command == "replay":
        return _replay(args)
    if args.command == "trace":
        return _plot(args)

    from functional_llm import LLM, SamplingParams
    from functional_llm.errors import FunctionalLLMError

    try:
        llm = LLM(model=args.model, device=args.device, dtype=args.dtype)
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p,
                                max_tokens=args.max_tokens, seed=args.seed)
        chat = not args.raw and getattr(llm.tokenizer, "chat_template", None)
        if chat:
            outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params, use_tqdm=False)
        else:
            outs = llm.generate(args.prompts, params, use_tqdm=False)
    except FunctionalLLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for prompt, out in zip(args.prompts, outs):
        if len(args.prompts) > 1:
            print(f"### {prompt}")
        print(out.text.strip())
    return 0


def _replay(args) -> int:
    """Core only (no torch import) unless --model is given."""
    from functional_llm.core import trace as T
    from functional_llm.errors import FunctionalLLMError

    try:
        records = T.read_trace(args.path)
        step_tokens = _model_tokens(args, records[0]) if args.model else None
        report = T.replay(records, step_tokens)
    except FunctionalLLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if report.ok:
        print(f"{args.path}: {report.steps} steps replayed, every plan, token and digest matches")
        return 0
    d = report.divergence
    print(f"{args.path}: diverged at step {d.step} ({d.what})\n  recorded: {d.expected}\n"
          f"  replayed: {d.actual}", file=sys.stderr)
    return 1


def _model_tokens(args, header):
    """The engine of an LLM built like the recorded one: its device step re-runs each Plan."""
    from functional_llm import LLM
    from functional_llm.core import trace as T

    cfg, shell = header["config"], header.get("shell", {})
    llm = LLM(args.model, max_model_len=cfg["max_model_len"], max_num_seqs=cfg["max_num_seqs"],
              max_num_batched_tokens=cfg["max_num_batched_tokens"], block_size=cfg["block_size"],
              num_kv_blocks=cfg["num_blocks"], enable_prefix_caching=cfg["enable_prefix_caching"],
              dtype=shell.get("dtype"), device=args.device or shell.get("device"),
              attention_backend=shell.get("attention_backend"),
              enforce_eager=shell.get("enforce_eager", False))
    if T.config_to_json(llm.engine.sched) != cfg:
        raise T.TraceError("model", args.model, "gives another scheduler config than the trace's "
                           f"({T.config_to_json(llm.engine.sched)} vs {cfg})")
    return llm.engine.device_tokens


def _plot(args) -> int:
    """Three panels per step, from a core replay: scheduled tokens (prefill / decode), running
    and waiting requests, KV blocks in use; preemptions marked."""
    from functional_llm.core import trace as T
    from functional_llm.errors import FunctionalLLMError

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("error: trace plot needs matplotlib (pip install 'functional_llm[plot]')", file=sys.stderr)
        return 2
    rows = []   # per step: prefill tokens, decode tokens, running, waiting, blocks in use, preempted
    try:
        records = T.read_trace(args.path)
        prompt_len = {r["rid"]: len(r["prompt"]) for r in records if r["kind"] == "arrive"}

        def on_step(state, plan):
            decode = sum(n == 1 and s >= prompt_len[r] for r, s, n in zip(plan.rids, plan.starts, plan.counts))
            rows.append((plan.num_tokens - decode, decode, len(state.running), len(state.waiting),
                         state.blocks_in_use, len(plan.preempted)))
        report = T.replay(records, on_step=on_step)
    except FunctionalLLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prefill, decode, running, waiting, blocks, preempted = zip(*rows) if rows else ((),) * 6
    steps = range(len(rows))
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, sharex=True, figsize=(9, 7))
    ax1.bar(steps, prefill, label="prefill tokens")
    ax1.bar(steps, decode, bottom=prefill, label="decode tokens")
    ax2.step(steps, running, where="mid", label="running")
    ax2.step(steps, waiting, where="mid", label="waiting")
    ax3.step(steps, blocks, where="mid", label="KV blocks in use")
    for ax in (ax1, ax2, ax3):
        for step in (i for i, n in enumerate(preempted) if n):
            ax.axvline(step, color="red", alpha=0.3, linewidth=1)
        ax.legend(loc="upper right", fontsize="small")
    ax3.set_xlabel("step (red: preemption)")
    ax1.set_title(f"{args.path}" + ("" if report.ok else f" (diverged at step {report.divergence.step})"))
    fig.savefig(args.output, dpi=100, bbox_inches="tight")
    print(f"{args.output}: {len(rows)} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
