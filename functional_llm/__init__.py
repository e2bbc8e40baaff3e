"""functional_llm: a small, fast LLM inference engine built from pure transitions.

    from functional_llm import LLM, SamplingParams
    llm = LLM()                                   # the embedded SmolLM2-135M-Instruct
    print(llm.generate("The capital of France is")[0].text)
"""
from functional_llm.core.records import SamplingParams
from functional_llm.errors import (EngineDead, FunctionalLLMError, InvalidConfig, InvalidModel,
                                   InvalidPrompt, InvalidSamplingParams, QueueFull, RequestTooLarge,
                                   UnknownRequest)

__version__ = "0.2.0"
__all__ = ["LLM", "AsyncLLM", "SamplingParams", "RequestOutput", "FunctionalLLMError", "InvalidConfig",
           "InvalidModel", "InvalidPrompt", "InvalidSamplingParams", "RequestTooLarge", "UnknownRequest",
           "QueueFull", "EngineDead"]


def __getattr__(name):
    # LLM pulls in torch and transformers; importing core/ alone must stay light
    if name == "LLM":
        from functional_llm.llm import LLM
        return LLM
    if name == "AsyncLLM":
        from functional_llm.async_llm import AsyncLLM
        return AsyncLLM
    if name == "RequestOutput":
        from functional_llm.outputs import RequestOutput
        return RequestOutput
    raise AttributeError(name)
