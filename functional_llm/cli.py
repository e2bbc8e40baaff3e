"""functional-llm command line: `functional-llm generate "PROMPT" [--model PATH]`,
`functional-llm chat [--model PATH]`, `functional-llm replay TRACE [--model PATH]` and
`functional-llm serve [OPTIONS]` (functional_llm/serve/main.py).

Arguments are checked by argparse (usage message, exit code 2) before any model loads."""
from __future__ import annotations

import argparse
import contextlib
import pathlib
import re
import sys

from functional_llm.core import trace as T   # core only: no torch until a model is loaded
from functional_llm.errors import FunctionalLLMError

DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


def _checked(convert, ok, why):
    """An argparse type: convert, then check; a failure is a usage error naming the value."""
    def parse(text):
        with contextlib.suppress(ValueError):
            if ok(value := convert(text)):
                return value
        raise argparse.ArgumentTypeError(f"{text!r}: {why}")
    return parse


def _model_folder(text: str) -> str:
    path = pathlib.Path(text)
    if path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is a file: pass the model folder "
                                         "(config.json + *.safetensors)")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: no such folder")
    return text


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:   # its own parser: the LLM's options come from its signature
        from functional_llm.serve.main import main as serve
        return serve(argv[1:])
    common = argparse.ArgumentParser(add_help=False)   # generate's and chat's: model, sampling
    common.add_argument("--model", type=_model_folder, default=None,
                        help="HF-format folder (default: embedded SmolLM2-135M-Instruct)")
    common.add_argument("--max-tokens", type=_checked(int, lambda n: n >= 1, "must be an int >= 1"))
    common.add_argument("--temperature", default=0.0,
                        type=_checked(float, lambda t: t >= 0, "must be a number >= 0 (0 = greedy)"))
    common.add_argument("--top-p", default=1.0,
                        type=_checked(float, lambda p: 0 < p <= 1, "must be in (0, 1]"))
    common.add_argument("--seed", type=_checked(int, lambda n: 0 <= n < 2**63, "must be an int >= 0"))
    common.add_argument("--device", type=_checked(str, lambda d: re.fullmatch(r"cpu|cuda(:\d+)?", d),
                                                  "expected cpu, cuda or cuda:N"))
    common.add_argument("--dtype", choices=DTYPES)
    common.add_argument("--kv-cache-dtype", choices=("auto", "fp8", "fp8_e4m3"), default="auto",
                        help="fp8: K and V kept as float8 e4m3 with a scale per token and kv head "
                             "(about twice the tokens in the same memory); auto: the model dtype")
    parser = argparse.ArgumentParser(prog="functional-llm")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", parents=[common], help="generate a completion for one or more prompts")
    gen.add_argument("prompts", nargs="+")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.set_defaults(max_tokens=64)
    chat = sub.add_parser("chat", parents=[common], help="chat in the terminal: one line per turn; "
                                                         "/exit, Ctrl-D or Ctrl-C leaves")
    chat.add_argument("--system", default=None, help="a system message opening the conversation")
    chat.set_defaults(max_tokens=256)
    sub.add_parser("serve", help="an OpenAI-compatible HTTP server ('serve --help' lists its options)")
    rep = sub.add_parser("replay", help="replay a trace (LLM(trace=PATH)) and report the first "
                                        "step that does not reproduce; exit code 1 if one")
    rep.add_argument("path")
    rep.add_argument("--model", type=_model_folder, default=None,
                     help="also re-run this model folder and check the recorded tokens")
    rep.add_argument("--device", default=None, help="default: the recorded device")
    trace = sub.add_parser("trace", help="work with traces").add_subparsers(dest="action", required=True)
    plot = trace.add_parser("plot", help="plot a trace's steps (needs matplotlib: pip install "
                                         "'functional_llm[plot]')")
    plot.add_argument("path")
    plot.add_argument("-o", "--output", default="trace.png")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:   # a usage error (2) or --help (0): an exit code, like every path
        return e.code
    run = {"generate": _generate, "chat": _chat, "replay": _replay, "trace": _plot}[args.command]
    try:
        return run(args)
    except FunctionalLLMError as e:   # the user's mistake (a bad folder, trace, prompt...)
        print(f"error: {e}", file=sys.stderr)
        return 2


def _llm_and_params(args):
    """The LLM and SamplingParams that generate's and chat's shared options describe."""
    from functional_llm import LLM, SamplingParams

    llm = LLM(model=args.model, device=args.device, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype)
    return llm, SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                               seed=args.seed)


def _generate(args) -> int:
    llm, params = _llm_and_params(args)
    if not args.raw and getattr(llm.tokenizer, "chat_template", None):
        outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params, use_tqdm=False)
    else:
        outs = llm.generate(args.prompts, params, use_tqdm=False)
    for prompt, out in zip(args.prompts, outs):
        if len(args.prompts) > 1:
            print(f"### {prompt}")
        print(out.text.strip())
    return 0


def _chat(args) -> int:
    """The interactive loop around chat_session: every way out is clean (exit code 0)."""
    ask = "> " if sys.stdin.isatty() else ""
    try:
        llm, params = _llm_and_params(args)
        if not getattr(llm.tokenizer, "chat_template", None):
            print("error: this model has no chat template", file=sys.stderr)
            return 2
        chat_session(llm, params, lambda: input(ask), lambda text: print(text, end="", flush=True),
                     args.system)
    except (EOFError, KeyboardInterrupt):
        print()
    return 0


def chat_session(llm, params, read_line, write, system=None) -> list:
    """Read a line, answer it streaming, until read_line raises EOFError or says /exit.
    The conversation so far (system, user and assistant messages) is the prompt of each
    answer, through the model's chat template. Returns the messages."""
    messages = [{"role": "system", "content": system}] if system else []
    while True:
        line = read_line().strip()
        if line in ("/exit", "/quit"):
            return messages
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        text = llm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        for out in llm.stream([llm.tokenizer.encode(text, add_special_tokens=False)], params):
            write(out.delta_text)
        write("\n")   # the last output's text (cumulative) is the whole answer
        messages.append({"role": "assistant", "content": out.text})


def _replay(args) -> int:
    """Core only (no torch import) unless --model is given."""
    records = T.read_trace(args.path)
    report = T.replay(records, _model_tokens(args, records[0]) if args.model else None)
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

    cfg, shell = header["config"], header.get("shell", {})
    # the scheduler limits the trace's config and the LLM name alike
    same = ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size", "enable_prefix_caching")
    llm = LLM(args.model, **{k: cfg[k] for k in same}, num_kv_blocks=cfg["num_blocks"],
              device=args.device or shell.get("device"), attention_backend=shell.get("attention_backend"),
              dtype=shell.get("dtype"), enforce_eager=shell.get("enforce_eager", False),
              kv_cache_dtype=shell.get("kv_cache_dtype", "auto"),
              batch_invariant=shell.get("determinism", {}).get("batch_invariant", False))
    if T.config_to_json(llm.engine.sched) != cfg:
        raise T.TraceError("model", args.model, "gives another scheduler config than the trace's "
                           f"({T.config_to_json(llm.engine.sched)} vs {cfg})")
    return llm.engine.device_tokens


def _plot(args) -> int:
    """Three panels per step, from a core replay: scheduled tokens (prefill / decode), running
    and waiting requests, KV blocks in use; preemptions marked."""
    try:
        from matplotlib.figure import Figure   # no pyplot: no global backend or figure state
    except ImportError:
        print("error: trace plot needs matplotlib (pip install 'functional_llm[plot]')", file=sys.stderr)
        return 2
    rows = []   # per step: prefill tokens, decode tokens, running, waiting, blocks in use, preempted
    records = T.read_trace(args.path)
    prompt_len = {r["rid"]: len(r["prompt"]) for r in records if r["kind"] == "arrive"}

    def on_step(state, plan):
        decode = sum(n == 1 and s >= prompt_len[r] for r, s, n in zip(plan.rids, plan.starts, plan.counts))
        rows.append((plan.num_tokens - decode, decode, len(state.running), len(state.waiting),
                     state.blocks_in_use, len(plan.preempted)))
    report = T.replay(records, on_step=on_step)
    prefill, decode, running, waiting, blocks, preempted = zip(*rows) if rows else ((),) * 6
    steps = range(len(rows))
    fig = Figure(figsize=(9, 7))
    ax1, ax2, ax3 = fig.subplots(3, 1, sharex=True)
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
