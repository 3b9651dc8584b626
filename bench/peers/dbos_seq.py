"""The `seq` workload for DBOS: workflow `seq` runs K no-op steps (@DBOS.step) one after another.

    python dbos_seq.py --database-url postgresql://USER@127.0.0.1:PORT/DB --instances N --steps K --concurrency C

DBOS is a library: the workflows run inside this process, which checkpoints the workflow's
status, each step's output and the workflow's result in PostgreSQL. The driver keeps C workflows
in flight (C asyncio loops, each awaiting one workflow at a time).
"""

import argparse
import asyncio
import logging
import os
import sys

from dbos import DBOS, DBOSConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import drive, report  # noqa: E402


@DBOS.step()
async def noop(payload: dict) -> dict:
    return payload


@DBOS.workflow()
async def seq(payload: dict) -> dict:
    out = {"n": payload["n"]}
    for _ in range(int(payload.get("steps", 3))):
        out = await noop(out)
    return out


async def main_async(args):
    if args.executor_threads:
        # DBOS's async workflows and steps do their database work through asyncio.to_thread,
        # whose default pool has min(32, cores + 4) threads: 6 on this 2-core machine.
        from concurrent.futures import ThreadPoolExecutor

        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=args.executor_threads, thread_name_prefix="to-thread")
        )
    config: DBOSConfig = {
        "name": "weir-peer-seq",
        "system_database_url": args.database_url,
        "log_level": "WARNING",
    }
    if args.pool_size:
        config["sys_db_pool_size"] = args.pool_size
    DBOS(config=config)
    DBOS.launch()
    try:
        await seq({"n": -1, "steps": args.steps})  # warm-up

        async def one(i):
            out = await seq({"n": i, "steps": args.steps})
            if out.get("n") != i:
                raise RuntimeError(f"wrong result {out!r} for {i}")

        elapsed, lat, errors = await drive(one, args.instances, args.concurrency, args.max_seconds)
        report("dbos", args.instances, args.steps, args.concurrency, elapsed, lat, errors,
               {"sys_db_pool_size": args.pool_size or 20,
                "executor_threads": args.executor_threads or min(32, (os.cpu_count() or 1) + 4)})
    finally:
        DBOS.destroy()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--database-url", required=True)
    p.add_argument("--instances", type=int, default=200)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop starting new instances after this many seconds")
    p.add_argument("--pool-size", type=int, default=0, help="sys_db_pool_size (0 = DBOS default, 20)")
    p.add_argument("--executor-threads", type=int, default=0,
                   help="threads of asyncio's default executor (0 = Python's default)")
    args = p.parse_args()
    logging.getLogger("dbos").setLevel(logging.WARNING)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
