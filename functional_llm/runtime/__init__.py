"""The device side: step inputs, the compiled step, sampling, KV pool, TP workers."""
