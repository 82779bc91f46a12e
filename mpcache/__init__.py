"""mpcache: private LLM inference with MPC-friendly KV-cache eviction, plus a plaintext path."""

__version__ = "0.1.0"
