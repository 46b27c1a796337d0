"""pagedserve: LLM inference and serving with a paged KV cache and continuous batching."""

from pagedserve.config import EngineArgs
from pagedserve.entrypoints.llm import LLM
from pagedserve.outputs import (ClassificationRequestOutput, CompletionOutput, EmbeddingRequestOutput, Logprob,
                                PoolingRequestOutput, RequestOutput, ScoringRequestOutput)
from pagedserve.pooling_params import PoolingParams
from pagedserve.sampling_params import RequestOutputKind, SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "PoolingParams", "RequestOutput", "PoolingRequestOutput", "EmbeddingRequestOutput",
           "ClassificationRequestOutput", "ScoringRequestOutput", "CompletionOutput", "Logprob", "RequestOutputKind",
           "EngineArgs", "__version__"]
