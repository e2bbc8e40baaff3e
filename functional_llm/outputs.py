"""What generate() returns (vLLM-shaped)."""
from __future__ import annotations

from typing import Optional

import attrs


@attrs.frozen(slots=True)
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: tuple
    text: str
    token_ids: tuple
    finish_reason: Optional[str]     # 'stop' | 'length' | 'abort' | None while running
    num_cached_tokens: int           # prompt tokens served from the prefix cache

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
