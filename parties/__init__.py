"""Role entry points of a private-inference deployment: `dealer`, `party --rank {0,1}` and `client`.

Each is a console script (see pyproject) and a module (`python -m parties.dealer` ...). All are configured by flags
or MPCACHE_* environment variables and talk gRPC with mutual TLS unless started with --insecure.
"""

import os

# gRPC's C core reads this when it is loaded; its own log lines (e.g. a failed bind) would break the roles' rule of
# one clear line per error. Set GRPC_VERBOSITY=debug to see them when debugging.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
