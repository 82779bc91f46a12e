"""One party of a multi-process communicator test: `python tests/grpc_party.py SCENARIO RANK ARGS.json`.

Run by tests/test_grpc_comm.py as a separate OS process per party (no fork, no shared state). ARGS.json holds
world_size, peers, session, backend ("grpc" or "gloo"), timeout_s, out (where the JSON result goes) and
per-scenario extras. The result file is written even when the scenario raises, with the error's type and
message, so the test can assert on how a party failed.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import time
import traceback
from pathlib import Path

import torch
from torch.distributed import ReduceOp

from mpcache.mpc.arith.crypten_compat import import_crypten

crypten = import_crypten()


def start(rank: int, args: dict):
    """Initialise CrypTen over the requested backend and return the communicator."""
    crypten.cfg.communicator.verbose = True  # rounds/bytes counters on, as the parity test compares them
    if args["backend"] == "gloo":
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(args["world_size"]),
            RENDEZVOUS=args["rendezvous"],
            DISTRIBUTED_BACKEND="gloo",
        )
        crypten.init()
        return crypten.communicator.get()
    from mpcache.mpc.transport.grpc_comm import init_party

    return init_party(
        rank,
        args["world_size"],
        args["peers"],
        args["session"],
        timeout_s=args.get("timeout_s", 20.0),
        connect_timeout_s=args.get("connect_timeout_s", 60.0),
        max_message_bytes=args.get("max_message_bytes", 2**28),
    )


def crypten_program(rank: int, comm, args: dict) -> dict:
    """Arithmetic, comparisons, softmax and matmul with fixed seeds: shares, plaintexts and rounds per step."""
    crypten.cfg.debug.debug_mode = True  # the only way CrypTen allows user-chosen PRZS seeds
    crypten.manual_seed(1000 + rank, 2000 + rank, 42)
    crypten.cfg.debug.debug_mode = False
    torch.manual_seed(7 + rank)  # TFP draws its Beaver triples from torch's default generator
    gen = torch.Generator().manual_seed(3)  # the same plaintext inputs at every party (only src's copy is used)
    x_plain, y_plain = torch.randn(4, 8, generator=gen) * 3, torch.randn(4, 8, generator=gen)
    w_plain = torch.randn(8, 5, generator=gen)
    x, y = crypten.cryptensor(x_plain, src=0), crypten.cryptensor(y_plain, src=1)
    w = crypten.cryptensor(w_plain, src=0)
    steps = {
        "add": lambda: x + y,
        "mul": lambda: x * y,
        "gt": lambda: x > y,
        "relu": lambda: y.relu(),
        "softmax": lambda: x.softmax(dim=-1),
        "matmul": lambda: x.matmul(w),
    }
    out = {}
    for name, fn in steps.items():
        comm.reset_communication_stats()
        z = fn()
        stats = comm.get_communication_stats()
        out[name] = {
            "share": z.share.flatten().tolist(),
            "plain": z.get_plain_text().flatten().tolist(),
            "rounds": stats["rounds"],
            "bytes": stats["bytes"],
        }
    out["expected"] = {
        "add": (x_plain + y_plain).flatten().tolist(),
        "mul": (x_plain * y_plain).flatten().tolist(),
        "softmax": x_plain.softmax(-1).flatten().tolist(),
        "matmul": (x_plain @ w_plain).flatten().tolist(),
    }
    return out


def collectives(rank: int, comm, args: dict) -> dict:
    """Every collective once, with rank-dependent data the test can predict."""
    rounds_before = comm.get_communication_stats()["rounds"]  # crypten.init() already made 3 calls
    ws = comm.get_world_size()
    x = torch.arange(6, dtype=torch.long).reshape(2, 3) + 100 * rank
    out = {}
    out["all_reduce_sum"] = comm.all_reduce(x).tolist()
    out["all_reduce_xor"] = comm.all_reduce(x, op=ReduceOp.BXOR).tolist()
    out["all_reduce_batched"] = [t.tolist() for t in comm.all_reduce([x, x[0] * 3], batched=True)]
    out["all_reduce_batched_xor"] = [t.tolist() for t in comm.all_reduce([x, -x], op=ReduceOp.BXOR, batched=True)]
    r = comm.reduce(x, ws - 1)
    out["reduce"] = None if r is None else r.tolist()
    r = comm.reduce([x, x + 1], 0, op=ReduceOp.BXOR, batched=True)
    out["reduce_batched_xor"] = None if r is None else [t.tolist() for t in r]
    b = x.clone()
    out["broadcast_returned_same"] = comm.broadcast(b, 1) is b
    out["broadcast"] = b.tolist()
    bb = [x.clone(), x[:, :1].clone()]
    out["broadcast_batched"] = [t.tolist() for t in comm.broadcast(bb, 0, batched=True)]
    g = comm.gather(x, 0)
    out["gather"] = [None if t is None else t.tolist() for t in g]
    out["all_gather"] = [t.tolist() for t in comm.all_gather(x)]
    chunks = [torch.full((2,), 10 * rank + j, dtype=torch.long) for j in range(ws)]
    out["scatter"] = comm.scatter(chunks, ws - 1).tolist()
    out["scatter_sized"] = comm.scatter(chunks if rank == 0 else None, 0, size=(2,)).tolist()
    nxt, prv = (rank + 1) % ws, (rank - 1) % ws
    comm.send(x, nxt)
    out["recv"] = comm.recv(torch.zeros_like(x), prv).tolist()
    buf = torch.zeros(6, dtype=torch.long)
    h_send, h_recv = comm.isend(x, nxt), comm.irecv(buf, prv)
    h_send.wait()
    h_recv.wait()
    out["irecv"] = buf.tolist()
    comm.send_obj({"from": rank, "size": torch.Size([rank, 2]), "t": torch.tensor([rank, 1.5])}, nxt)
    obj = comm.recv_obj(prv)
    out["recv_obj"] = [obj["from"], list(obj["size"]), obj["t"].tolist(), type(obj["size"]).__name__]
    out["broadcast_obj"] = comm.broadcast_obj({"root": rank, "items": (1, 2.5, "s")} if rank == 1 else None, 1)
    out["broadcast_obj"]["items"] = list(out["broadcast_obj"]["items"])
    t0 = time.monotonic()
    comm.barrier()
    out["barrier_s"] = time.monotonic() - t0
    out["stats"] = comm.get_communication_stats()  # wire totals since init: all sent messages have arrived
    out["rounds"] = out["stats"]["rounds"] - rounds_before
    out["identity"] = [comm.get_rank(), comm.get_world_size(), comm.get_name(), comm.get_distributed_backend()]
    return out


def wait_for_peer_failure(rank: int, comm, args: dict) -> dict:
    """Rank 1 says it is ready and idles (the test kills or freezes it); rank 0 then waits for it in all_reduce."""
    if rank == 1:
        Path(args["ready"]).write_text("ready")
        time.sleep(120)
        return {}
    while not Path(args["ready"]).exists():
        time.sleep(0.01)
    comm.all_reduce(torch.ones(3, dtype=torch.long))
    return {}


def wrong_dtype(rank: int, comm, args: dict) -> dict:
    """Rank 1 sends its share as int32 while rank 0 reduces int64: both must refuse."""
    comm.all_reduce(torch.ones(3, dtype=torch.long if rank == 0 else torch.int32))
    return {}


def malicious_object(rank: int, comm, args: dict) -> dict:
    """Rank 1 bypasses dumps() and sends a pickle that would run a shell command; rank 0 must refuse it."""
    if rank == 1:
        from mpcache.mpc.transport.proto import mpcache_pb2 as pb

        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {args['marker']}",))

        comm._send(0, pb.OP_SEND_OBJ, obj=pickle.dumps(Evil()))
        time.sleep(1.0)
        return {}
    return {"obj": repr(comm.recv_obj(1))}


class Custom(torch.nn.Module):
    """A module class the receiving party registers as safe (as crypten.load_from_party(model_class=...) does)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)


def odd_shapes(rank: int, comm, args: dict) -> dict:
    """What gloo carries and the wire format once refused: broadcasting (a stride-0 dimension), an expanded
    tensor, modules CrypTen deems safe (its own allow-list and a registered class), crypten.load_from_party."""
    out = {}
    x = crypten.cryptensor(torch.tensor(1.0))
    out["broadcast_add"] = (x + torch.tensor([2.0])).get_plain_text().tolist()
    out["all_reduce_expanded"] = comm.all_reduce(torch.tensor(5).expand(1)).tolist()
    out["all_reduce_expanded_2d"] = comm.all_reduce(torch.arange(3).reshape(3, 1).expand(3, 4)).tolist()
    lin = comm.broadcast_obj(torch.nn.Linear(2, 2) if rank == 0 else None, 0)
    out["linear"] = [type(lin).__name__, type(lin.weight).__name__, list(lin.weight.shape)]
    crypten.common.serial.register_safe_class(Custom)
    custom = comm.broadcast_obj(Custom() if rank == 0 else None, 0)
    out["custom"] = [type(custom).__name__, list(custom.lin.weight.shape)]
    path = Path(args["out"]).parent / "weights.pt"
    if rank == 0:
        torch.save(torch.arange(4.0), path)
    loaded = crypten.load_from_party(str(path) if rank == 0 else None, src=0)
    out["load_from_party"] = loaded.get_plain_text().tolist()
    return out


SCENARIOS = {
    "odd_shapes": odd_shapes,
    "crypten_program": crypten_program,
    "collectives": collectives,
    "wait_for_peer_failure": wait_for_peer_failure,
    "wrong_dtype": wrong_dtype,
    "malicious_object": malicious_object,
}


def main() -> None:
    scenario, rank, args = sys.argv[1], int(sys.argv[2]), json.loads(Path(sys.argv[3]).read_text())
    result: dict = {"rank": rank}
    t0 = time.monotonic()
    try:
        comm = start(rank, args)
        result.update(SCENARIOS[scenario](rank, comm, args))
    except Exception as e:
        result.update(error_type=type(e).__name__, error=str(e), failed_at=time.time(), trace=traceback.format_exc())
    result["elapsed_s"] = time.monotonic() - t0
    out = Path(args["out"].format(rank=rank))
    out.write_text(json.dumps(result))
    try:
        crypten.uninit()
    except Exception as e:  # a failed run may leave nothing to uninit; the result above is what matters
        print(f"uninit: {type(e).__name__}: {e}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip torch's slow interpreter teardown (~1 s per process); everything is written and closed


if __name__ == "__main__":
    main()
