"""functional-llm command line: `functional-llm generate "PROMPT" [--model PATH]`."""
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
    args = parser.parse_args(argv)

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


if __name__ == "__main__":
    sys.exit(main())
