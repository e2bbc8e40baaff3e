"""CPU throughput of generate() on the embedded model, next to Hugging Face generate (padded
batch) on the same prompts in the same process.

    python benchmarks/cpu_generate.py [--prompts 32] [--new-tokens 64] [--repeats 2]
Prints output tok/s for both (best of --repeats, alternating runs) and the ratio.
"""
import argparse
import time

import torch

from functional_llm import LLM, SamplingParams
from functional_llm.model.gguf import ensure_default_model

TOPICS = ["the ocean", "a mountain village", "quantum computers", "the history of tea", "bicycles",
          "volcanoes", "a lost key", "the moon landing", "honey bees", "jazz music", "deserts",
          "trains in winter", "a chess game", "the printing press", "coral reefs", "old maps"]


def make_prompts(tok, n):
    texts = [f"Write {'a short' if i % 2 else 'a detailed'} paragraph about {TOPICS[i % len(TOPICS)]}"
             + " and why it matters" * (i % 4) + "." for i in range(n)]
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                               add_generation_prompt=True), add_special_tokens=False)
            for t in texts]


def run_ours(llm, prompts, new):
    sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    dt = time.perf_counter() - t
    return sum(len(o.token_ids) for o in outs) / dt, dt


def run_hf(model, tok, prompts, new):
    width = max(map(len, prompts))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])       # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, pad_token_id=pad)
    dt = time.perf_counter() - t
    return (out.shape[1] - width) * len(prompts) / dt, dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM
    path = ensure_default_model()
    llm = LLM(str(path))
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    prompts = make_prompts(llm.tokenizer, args.prompts)
    run_ours(llm, prompts[:2], 4)       # warm-up both
    run_hf(hf, llm.tokenizer, prompts[:2], 4)
    ours, theirs = [], []
    for _ in range(args.repeats):
        ours.append(run_ours(LLM(str(path)), prompts, args.new_tokens)[0])   # fresh engine: no cache hits
        theirs.append(run_hf(hf, llm.tokenizer, prompts, args.new_tokens)[0])
    print(f"{args.prompts} prompts x {args.new_tokens} new tokens, {sum(map(len, prompts))} prompt tokens, "
          f"torch threads {torch.get_num_threads()}")
    print(f"functional_llm generate: {max(ours):.1f} tok/s (runs: {', '.join(f'{x:.1f}' for x in ours)})")
    print(f"HF generate (padded):    {max(theirs):.1f} tok/s (runs: {', '.join(f'{x:.1f}' for x in theirs)})")
    print(f"ratio: {max(ours) / max(theirs):.2f}x")


if __name__ == "__main__":
    main()
