"""tuneloop's engine: Tinker-style primitives over Hugging Face causal LMs + peft LoRA.

    from training_core import ServiceClient, types
"""

from training_core import types
from training_core.futures import APIFuture
from training_core.sampling_client import SamplingClient
from training_core.service_client import ServiceClient
from training_core.training_client import TrainingClient

__all__ = ["APIFuture", "SamplingClient", "ServiceClient", "TrainingClient", "types"]
