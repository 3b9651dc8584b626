"""The `seq` workload for Temporal: workflow SeqWorkflow runs K no-op activities one after another.

    python temporal_seq.py worker --address 127.0.0.1:PORT --concurrency W
    python temporal_seq.py drive  --address 127.0.0.1:PORT --instances N --steps K --concurrency C

The worker is its own process (as weir's example worker is); the driver keeps C workflow
executions in flight, each started with execute_workflow (start, then wait for the result).
"""

import argparse
import asyncio
import os
import sys
import uuid
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.worker import Worker

TASK_QUEUE = "seq"


@activity.defn
async def noop(payload: dict) -> dict:
    return payload


@workflow.defn
class SeqWorkflow:
    @workflow.run
    async def run(self, payload: dict) -> dict:
        steps = int(payload.get("steps", 3))
        out = {"n": payload["n"]}
        for _ in range(steps):
            out = await workflow.execute_activity(
                noop, out, start_to_close_timeout=timedelta(seconds=60)
            )
        return out


async def worker_main(args):
    client = await Client.connect(args.address, namespace="default")
    extra = {}
    if args.unsandboxed:
        from temporalio.worker import UnsandboxedWorkflowRunner

        extra["workflow_runner"] = UnsandboxedWorkflowRunner()
    worker = Worker(
        client,
        task_queue=TASK_QUEUE,
        workflows=[SeqWorkflow],
        activities=[noop],
        max_concurrent_activities=args.concurrency,
        max_concurrent_workflow_tasks=args.concurrency,
        **extra,
    )
    print("worker ready", file=sys.stderr, flush=True)
    import signal

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    async with worker:
        await stop.wait()


async def drive_main(args):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import drive, report

    client = await Client.connect(args.address, namespace="default")
    run_id = uuid.uuid4().hex[:8]
    # Warm-up: one instance end to end, so connection set-up is not measured.
    await client.execute_workflow(
        SeqWorkflow.run, {"n": -1, "steps": args.steps}, id=f"seq-{run_id}-warm", task_queue=TASK_QUEUE
    )

    async def one(i):
        out = await client.execute_workflow(
            SeqWorkflow.run,
            {"n": i, "steps": args.steps},
            id=f"seq-{run_id}-{i}",
            task_queue=TASK_QUEUE,
        )
        if out.get("n") != i:
            raise RuntimeError(f"wrong result {out!r} for {i}")

    elapsed, lat, errors = await drive(one, args.instances, args.concurrency, args.max_seconds)
    report("temporal", args.instances, args.steps, args.concurrency, elapsed, lat, errors)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["worker", "drive"])
    p.add_argument("--address", required=True)
    p.add_argument("--instances", type=int, default=200)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop starting new instances after this many seconds")
    p.add_argument("--unsandboxed", action="store_true",
                   help="worker: run workflows without the Python SDK's sandbox")
    args = p.parse_args()
    asyncio.run(worker_main(args) if args.mode == "worker" else drive_main(args))
    if args.mode == "drive":
        # The result is printed. Leave without the interpreter's finalization, which
        # crashed once with the SDK's native threads still running ("Fatal Python error:
        # PyGILState_Release ... Python runtime state: finalizing") and lost a measured point.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
