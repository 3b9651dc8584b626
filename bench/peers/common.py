"""Shared by the Python drivers: keep exactly C instances in flight and report one JSON object.

Each driver supplies `one(i)`, an async function that starts instance i (payload {"n": i}) and
waits for its result. `drive` runs C loops; each takes the next index, calls `one`, records the
start-to-completion latency as the client sees it, and goes on until N instances are done.
"""

import asyncio
import json
import sys
import time


def percentile(sorted_values, q):
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, int(round(q * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


async def drive(one, instances, concurrency, max_seconds=None):
    """Run until `instances` are done, or stop starting new ones after `max_seconds`
    (those in flight still finish and count)."""
    next_index = 0
    latencies = []
    errors = []

    async def loop():
        nonlocal next_index
        while next_index < instances:
            if max_seconds is not None and time.perf_counter() - t0 >= max_seconds:
                break
            i = next_index
            next_index += 1
            t_start = time.perf_counter()
            try:
                await one(i)
            except Exception as e:  # counted, never hidden
                errors.append(repr(e)[:300])
                continue
            latencies.append((time.perf_counter() - t_start) * 1000.0)

    t0 = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    return elapsed, latencies, errors


def report(system, instances, steps, concurrency, elapsed, latencies, errors, extra=None):
    lat = sorted(latencies)
    done = len(lat)
    out = {
        "system": system,
        "instances": instances,
        "completed": done,
        "errors": len(errors),
        "first_errors": errors[:3],
        "steps": steps,
        "concurrency": concurrency,
        "elapsed_s": round(elapsed, 3),
        "instances_per_s": round(done / elapsed, 1) if elapsed > 0 else None,
        "step_completions_per_s": round(done * steps / elapsed, 1) if elapsed > 0 else None,
        "latency_ms": {
            "p50": round(percentile(lat, 0.50), 3) if lat else None,
            "p90": round(percentile(lat, 0.90), 3) if lat else None,
            "p99": round(percentile(lat, 0.99), 3) if lat else None,
            "max": round(lat[-1], 3) if lat else None,
        },
    }
    if extra:
        out.update(extra)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()
