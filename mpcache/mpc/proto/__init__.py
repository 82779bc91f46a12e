"""Generated gRPC/protobuf stubs for protos/mpcache.proto (regenerate with `python -m mpcache.mpc.proto.build`)."""
