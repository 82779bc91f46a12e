"""A computing party with fault injection, for the reliability tests and the soak benchmark (issue #13).

    python -m bench.faults [--load-delay S] <mpcache-party flags ...>

Exactly `mpcache-party` plus two things a healthy deployment never does:
* job "fault" (params {"rank": r, "after": k, "how": "raise" | "diverge" | "sleep", "seconds": s}): k secret
  products of the input with itself, then party r raises, makes a communicator call the other party does not make,
  or sleeps s seconds, while the other party goes on into the next product. The job must end with an error at both
  parties and leave the session serving.
* --load-delay S: party 0 holds its model S seconds longer before sharing it (a slow disk or a loaded machine),
  so a test can tell whether party 1's start-up wait follows the model's size.
"""

from __future__ import annotations

import sys
import time

from parties import jobs, party

FAULTS = ("raise", "diverge", "sleep")


def _check_fault(params: dict, shapes: list[tuple[int, ...]], ctx: jobs.JobContext) -> None:
    jobs._one_input(shapes, "fault")
    if set(params) - {"rank", "after", "how", "seconds"}:
        raise ValueError(f"unknown fault parameters {sorted(set(params) - {'rank', 'after', 'how', 'seconds'})}")
    if params.get("rank") not in (0, 1) or params.get("how") not in FAULTS:
        raise ValueError(f"fault needs rank 0 or 1 and how in {FAULTS}")
    after, seconds = params.get("after", 0), params.get("seconds", 0)
    if not isinstance(after, int) or isinstance(after, bool) or not 0 <= after <= 16:
        raise ValueError("after must be an integer in 0..16")
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or not 0 <= seconds <= 120:
        raise ValueError("seconds must be a number in 0..120")


@jobs.job("fault", _check_fault)
def fault(ctx: jobs.JobContext, inputs: list, params: dict) -> list:
    """See the module docstring."""
    import torch

    from mpcache.mpc.arith.crypten_compat import import_crypten

    (x,) = inputs
    acc = x
    for _ in range(params.get("after", 0)):
        ctx.checkpoint()
        acc = acc * x
    if ctx.rank == params["rank"]:
        how = params["how"]
        if how == "raise":
            raise RuntimeError(f"injected fault at party {ctx.rank} after {params.get('after', 0)} products")
        if how == "diverge":
            import_crypten().communicator.get().all_reduce(torch.zeros(3, dtype=torch.long))
        if how == "sleep":
            time.sleep(params.get("seconds", 0))
    return [acc * x]


def _slow_load(delay: float):
    load = party.Party._load_and_share

    def slowly(self, path):
        if self.rank == 0:
            time.sleep(delay)
        return load(self, path)

    return slowly


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["--load-delay"]:
        party.Party._load_and_share = _slow_load(float(argv[1]))
        argv = argv[2:]
    sys.argv[1:] = argv
    party.cli()


if __name__ == "__main__":
    main()
