"""Gateway-side tokenization for gRPC workers: load a model's tokenizer, incremental
detokenization, stop strings, the GetTokenizer bundle and the encode caches."""

from smg.tokenizer.cache import TokenizerCacheConfig
from smg.tokenizer.detok import IncrementalDetokenizer
from smg.tokenizer.load import Tokenizer, TokenizerLoadError, load_tokenizer
from smg.tokenizer.stops import StopMatcher

__all__ = [
    "IncrementalDetokenizer",
    "StopMatcher",
    "Tokenizer",
    "TokenizerCacheConfig",
    "TokenizerLoadError",
    "load_tokenizer",
]
