"""mpcache: private LLM inference with MPC-friendly KV-cache eviction, plus a plaintext path.

    from mpcache.generate import generate
    from mpcache.methods import make_policy
    tokens = generate(model, input_ids, max_new_tokens=16, policy=make_policy("snapkv", 128))

The package itself imports nothing: light entry points that need one submodule (a container's health check, every
2 s, `mpcache-certs`) do not pay for torch (3.5 CPU-s per import on the 2-core machine).
"""

__version__ = "0.1.0"
