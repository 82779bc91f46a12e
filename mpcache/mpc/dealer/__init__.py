"""Correlated randomness: tuple specs and the seed scheme both sides expand (`tuples`), the dealer's gRPC service and
client (`service`), and the parties' CrypTen tuple provider (`provider`)."""
