"""Generated gRPC/protobuf stubs for protos/mpcache.proto.

Regenerate with `python -m mpcache.mpc.transport.proto.build` (`--check` verifies the committed ones).
"""
