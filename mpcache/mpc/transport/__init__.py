"""Moving bytes between parties: CrypTen's communicator over gRPC (`grpc_comm`), the wire format (`wire`), mutual TLS
(`tls`), the generated stubs of protos/mpcache.proto (`proto`) and the in-process two-party pool for tests
(`local`)."""
