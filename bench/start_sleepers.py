import http.client, json, sys, threading, time
host, port, n, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
prefix = sys.argv[5]
counter = iter(range(n)); lock = threading.Lock(); done = [0]
def work():
    c = http.client.HTTPConnection(host, port)
    while True:
        with lock:
            i = next(counter, None)
        if i is None: return
        body = json.dumps({"definition": "sleeper", "id": f"{prefix}-{i}", "input": {"n": i}})
        c.request("POST", "/v1/instances", body, {"content-type": "application/json"})
        r = c.getresponse(); r.read()
        if r.status not in (200, 201): print(r.status); return
        with lock: done[0] += 1
t0 = time.time()
ts = [threading.Thread(target=work) for _ in range(threads)]
[t.start() for t in ts]; [t.join() for t in ts]
print(f"started {done[0]} in {time.time()-t0:.1f}s ({done[0]/(time.time()-t0):.0f}/s)")
