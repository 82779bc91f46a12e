"""The private runtime: two-party inference under CrypTen, a dealer for correlated randomness, gRPC between processes.

Subpackages by concern, each importing only from the ones before it (tests/test_layering.py checks it):

    fss        function secret sharing primitives (numpy + cryptography; nothing from mpcache)
    arith      fixed-point numerics and their CrypTen shims, ring math shared with the dealer, score bounds,
               accounting, the append-only secret operand
    transport  the gRPC communicator, wire format, TLS, proto stubs, the in-process two-party pool
    dealer     tuple specs and seeds, the dealer service and its client, the parties' tuple provider
    nn         private transformer layers and the private decoder
    caches     private KV caches: MPCache and the StreamingLLM / H2O baselines
    deploy     the launcher (every role on loopback) and the private demo
"""
