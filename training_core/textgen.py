"""Chat-level text generation over a SamplingClient: the `evals.protocols.Generator` implementation.

Prompts are rendered with the same renderer used for training (pain-points cluster 2), sampled in one
batched call per eval batch, and decoded up to the renderer's end-of-turn.
"""

from __future__ import annotations

import math
from typing import Any

from training_core.renderers import get_renderer
from training_core.sampling_client import SamplingClient
from training_core.types import ModelInput, SamplingParams


class SamplingGenerator:
    """Generator over a training_core SamplingClient. `name` labels results (e.g. 'base', 'step-200')."""

    def __init__(self, client: SamplingClient, name: str, renderer: str = "chat_template",
                 batch_size: int = 64) -> None:
        self.client, self.name, self.batch_size = client, name, batch_size
        self.tokenizer = client.get_tokenizer()
        self._renderer_name = renderer
        self.renderer = get_renderer(renderer, self.tokenizer)

    def _renderer_for(self, protocol: Any) -> Any:
        name = getattr(protocol, "renderer", "default")
        if name in ("default", self._renderer_name):
            return self.renderer
        return get_renderer(name, self.tokenizer)

    def generate(self, prompts: list[list[dict[str, str]]], protocol: Any) -> list[list[str]]:
        renderer = self._renderer_for(protocol)
        stop: list[str] | None = list(protocol.stop) if protocol.stop else None
        params = SamplingParams(max_tokens=protocol.max_tokens, seed=protocol.seed, temperature=protocol.temperature,
                                top_p=protocol.top_p, top_k=protocol.top_k, stop=stop)
        outs: list[list[str]] = []
        for i in range(0, len(prompts), self.batch_size):
            chunk = [renderer.build_generation_prompt(m) for m in prompts[i : i + self.batch_size]]
            for resp in self.client.sample_batch(chunk, params, protocol.num_samples).result():
                outs.append([renderer.parse_response(s.tokens)[0]["content"] for s in resp.sequences])
        return outs

    def nll(self, texts: list[str]) -> list[tuple[float, int]]:
        out = []
        bos = self.tokenizer.bos_token_id
        for t in texts:
            ids = self.tokenizer.encode(t, add_special_tokens=False)
            if bos is not None:
                ids = [bos, *ids]
            lps = self.client.compute_logprobs(ModelInput.from_ints(ids)).result()
            vals = [v for v in lps[1:] if v is not None]
            # Every scored token counts: dropping a -inf (zero-probability) token and shrinking the count
            # made a model that rules out held-out text look better. Non-finite -> NLL inf, scored against it.
            nll = -math.fsum(vals) if all(math.isfinite(v) for v in vals) else math.inf
            out.append((nll, len(vals)))
        return out
