"""Where a decode-heavy run spends its time: host phases (cProfile) and device kernels
(torch.profiler), on a reduced headline workload. python benchmarks/profile_step.py [backend]"""
import cProfile
import pstats
import sys
import tempfile

import torch

sys.path.insert(0, "benchmarks")
from throughput import random_model, workload  # noqa: E402

from functional_llm import LLM, SamplingParams  # noqa: E402

backend = sys.argv[1] if len(sys.argv) > 1 else None
folder = random_model(tempfile.mkdtemp())
llm = LLM(folder, attention_backend=backend, max_model_len=4096)
prompts, outs = workload(256)
params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=64) for _ in outs]
llm.generate([[20000 + t for t in p] for p in prompts], params, use_tqdm=False)  # capture graphs
prof = cProfile.Profile()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as tp:
    prof.enable()
    llm.generate(prompts, params, use_tqdm=False)
    prof.disable()
pstats.Stats(prof).sort_stats("tottime").print_stats(14)
pstats.Stats(prof).sort_stats("cumtime").print_stats("engine.py|graphs.py|scheduler.py|commit.py|staging.py", 10)
print(tp.key_averages().table(sort_by="cuda_time_total", row_limit=18))
