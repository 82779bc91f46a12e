"""Role entry points of a private-inference deployment: `dealer`, `party --rank {0,1}` and `client`.

Each is a console script (see pyproject) and a module (`python -m parties.dealer` ...). All are configured by flags
or MPCACHE_* environment variables and talk gRPC with mutual TLS unless started with --insecure.
"""
