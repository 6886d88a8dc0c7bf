"""The math of a Llama-family decoder, as stage functions on token-packed tensors. No MPI here."""

from ghmpi.model.args import ModelArgs
from ghmpi.model.attention import decode_attention, prefill_attention
from ghmpi.model.kvcache import KVCache
from ghmpi.model.llama import Transformer
from ghmpi.model.loader import check_checkpoint
from ghmpi.model.sampling import sample

__all__ = [
    "KVCache",
    "ModelArgs",
    "Transformer",
    "check_checkpoint",
    "decode_attention",
    "prefill_attention",
    "sample",
]
