"""florence2_rs: Florence-2 in Rust, a drop-in for transformers' Florence-2 classes."""

from ._native import Florence2Error

__all__ = ["Florence2Error"]
