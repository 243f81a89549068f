"""DeepSpeed ZeRO backend: the TrainingClient surface executed by N ranks that the caller's process owns.

    from training_core.distributed import create_distributed_training_client
    tc = create_distributed_training_client("tiny", world_size=2, zero_stage=3, lora=LoraConfig(rank=8))

Importing this package does not import DeepSpeed; only the worker ranks do.
"""

from training_core.distributed.client import DistributedTrainingClient
from training_core.distributed.controller import WorkerPool
from training_core.distributed.protocol import DistributedCallError, DistributedError, DistributedWorkerError
from training_core.distributed.service import (
    DistributedServiceClient,
    create_distributed_training_client,
    make_service_client,
)

__all__ = [
    "DistributedCallError",
    "DistributedError",
    "DistributedServiceClient",
    "DistributedTrainingClient",
    "DistributedWorkerError",
    "WorkerPool",
    "create_distributed_training_client",
    "make_service_client",
]
