"""Errors a user can cause. Each is a ValueError subclass naming the offending parameter and
value, raised before anything is admitted, so engine state is unchanged when one escapes."""


class FunctionalLLMError(ValueError):
    """Base class: `parameter` names what was wrong, `value` is what was given."""

    def __init__(self, parameter: str, value, message: str):
        self.parameter, self.value = parameter, value
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        super().__init__(f"{parameter}={shown}: {message}")


class InvalidSamplingParams(FunctionalLLMError):
    """A SamplingParams field outside its domain."""


class InvalidPrompt(FunctionalLLMError):
    """An empty prompt, a token id outside the vocabulary, or a prompt that is too long."""


class RequestTooLarge(FunctionalLLMError):
    """A request that could never fit in the KV pool."""


class InvalidModel(FunctionalLLMError):
    """A model folder that is missing files or describes an unsupported architecture."""


class InvalidConfig(FunctionalLLMError):
    """An engine argument (block size, pool size, budgets, device, dtype) out of range."""


class UnknownRequest(FunctionalLLMError):
    """abort() or finish() of a request id the engine does not know."""


class QueueFull(FunctionalLLMError):
    """AsyncLLM: a request arrived while `max_waiting` requests were waiting to start."""


class EngineDead(RuntimeError):
    """AsyncLLM: the engine loop has stopped (a step failed, its cause chained, or shutdown()
    was called); every waiting caller and every later call gets one. Not a ValueError: nothing
    the caller passed was wrong."""

    @classmethod
    def because(cls, reason: str, cause: BaseException | None) -> "EngineDead":
        """A fresh error per caller (one shared object would collect every caller's
        traceback), with the failure that stopped the loop chained."""
        err = cls(reason)
        err.__cause__ = cause
        return err


class EngineStalled(FunctionalLLMError):
    """A step that can schedule nothing while requests wait and none runs: the engine would
    repeat it forever. `value` holds the stuck request ids; the state is unchanged (abort
    them to go on)."""
