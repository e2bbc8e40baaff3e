"""What an 8-bit KV cache costs in accuracy, on the embedded SmolLM2-135M (real weights, CPU,
fp32 weights, reference backend): python benchmarks/kv_fp8_accuracy.py

1. Mean negative log-likelihood of tests/data/coriolanus_act1.txt (Shakespeare, public domain,
   ~3k tokens) through prompt_logprobs, prefilled in chunks of 256 tokens so every later chunk
   attends over keys and values read back from the cache: fp8 cache vs fp32 cache (target:
   within 1%).
2. Greedy continuations (32 tokens) of 32 chat prompts, token by token: how many positions
   agree, and how many continuations agree whole.
Prints one JSON line."""
import json
import pathlib
import time

from functional_llm import LLM, SamplingParams

TEXT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "coriolanus_act1.txt"
TOPICS = ["the moon", "bread", "rivers", "a lighthouse", "chess", "winter", "bees", "a library",
          "volcanoes", "the violin", "tea", "bridges", "owls", "the desert", "clocks", "salt",
          "a harbour", "paper", "glaciers", "the piano", "coffee", "maps", "whales", "a garden",
          "thunder", "glass", "the alphabet", "mountains", "candles", "trains", "honey", "fog"]


def run(kv_cache_dtype: str) -> dict:
    t = time.perf_counter()
    llm = LLM(dtype="float32", device="cpu", max_num_batched_tokens=256, kv_cache_dtype=kv_cache_dtype)
    ids = llm.tokenizer.encode(TEXT.read_text())
    out = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    nll = -sum(d[i].logprob for d, i in zip(out.prompt_logprobs[1:], ids[1:])) / (len(ids) - 1)
    chats = [[{"role": "user", "content": f"Write two sentences about {t}."}] for t in TOPICS]
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    tokens = [o.token_ids for o in llm.chat(chats, greedy, use_tqdm=False)]
    blocks = llm.engine.sched.num_blocks
    return dict(nll=nll, tokens=tokens, text_tokens=len(ids), blocks=blocks,
                seconds=round(time.perf_counter() - t, 1))


def main() -> None:
    full, fp8 = run("auto"), run("fp8")
    same = sum(a == b for x, y in zip(full["tokens"], fp8["tokens"]) for a, b in zip(x, y))
    total = sum(len(x) for x in full["tokens"])
    prefix = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
              for x, y in zip(full["tokens"], fp8["tokens"])]
    print(json.dumps(dict(
        model="SmolLM2-135M-Instruct (embedded), fp32 weights, CPU, reference backend",
        text_tokens=full["text_tokens"], nll_fp32_cache=round(full["nll"], 5),
        nll_fp8_cache=round(fp8["nll"], 5),
        nll_change_pct=round(100 * (fp8["nll"] - full["nll"]) / full["nll"], 3),
        greedy_tokens_agreeing=f"{same}/{total}",
        greedy_tokens_before_first_difference_mean=round(sum(prefix) / len(prefix), 1),
        greedy_continuations_identical=sum(x == y for x, y in zip(full["tokens"], fp8["tokens"])),
        blocks_same_memory=dict(fp32=full["blocks"], fp8=fp8["blocks"]),
        seconds=dict(fp32=full["seconds"], fp8=fp8["seconds"]))))


if __name__ == "__main__":
    main()
