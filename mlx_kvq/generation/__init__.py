"""Generation workflows over the caches: the prefill loop, prompts, documents cached
once and questioned later, summaries of long documents, and batched generation."""

from .batch import BatchResponse, batch_generate
from .distributed import kv_bytes_by_rank, rank_files, rank_path
from .documents import cache_document, continuation_tokens, load_document_cache, read_document
from .prefill import Progress, build_cache, prefill
from .prompts import encode_prompt
from .summaries import Summary, summarize, summarize_cached
