"""mpcache: private LLM inference with MPC-friendly KV-cache eviction, plus a plaintext path.

    import mpcache
    from mpcache.methods import make_policy
    tokens = mpcache.generate(model, input_ids, max_new_tokens=16, policy=make_policy("snapkv", 128))
"""

from mpcache.generate import generate, stream_generate

__version__ = "0.1.0"
__all__ = ["generate", "stream_generate"]
