"""On the GPU machine: client p50 at c=1 and c=8 on vae_timeseries without a shadow and with a 100 % shadow
of version 2, in alternating blocks, through a real `tgw up` (GPU configs; docs/traffic.md, "Measured").

    PYTHONPATH=.:$SITE python3 scripts/gpu/shadow_p50.py   # after scripts/gpu/run.sh's prepare step
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import numpy as np

BASE = "http://127.0.0.1:8080"
MODEL = "vae_timeseries"
NO_CACHE = {"Cache-Control": "no-cache, no-store"}


def put(spec: dict[str, Any]) -> None:
    r = httpx.put(f"{BASE}/v1/admin/models/{MODEL}/traffic", json=spec, timeout=10)
    assert r.status_code == 200, r.text
    time.sleep(1.5)  # every worker has the policy (each polls its revision every 0.5 s)


def p50_ms(n: int, conc: int, rng: np.random.Generator) -> float:
    lat: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(base_url=BASE, timeout=30) as c:
            for _ in range(n // conc):
                x = (50 + rng.normal(size=20)).round(4).tolist()
                t = time.perf_counter()
                r = c.post(f"/v1/models/{MODEL}/infer", json={"inputs": {"series": [[x]]}}, headers=NO_CACHE)
                d = time.perf_counter() - t
                assert r.status_code == 200 and r.json()["model_version"] == "1", r.text
                with lock:
                    lat.append(d)

    threads = [threading.Thread(target=worker) for _ in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statistics.median(lat) * 1000


def main() -> int:
    repo = "/tmp/vae-repo"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(f"model_repository/{MODEL}", f"{repo}/{MODEL}")
    env = {**os.environ, "TGW_MODEL_REPOSITORY": repo, "TGW_WORKERS": "2",
           "TGW_TRITON_MODEL_CONFIG_NAME": "gpu", "TGW_STATE_DIR": "/tmp/tgw-shadow",
           "TGW_LOG_LEVEL": "WARNING"}  # fmt: skip
    with open("/tmp/shadow-up.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "up"], env=env, stdout=log, stderr=log)
    try:
        for _ in range(240):
            try:
                if httpx.get(f"{BASE}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            print(open("/tmp/shadow-up.log").read()[-3000:])
            return 1
        rng = np.random.default_rng(1)
        put({"weights": {"1": 100}})
        p50_ms(200, 1, rng)  # warm-up
        for conc in (1, 8):
            rows = []
            for block in range(4):
                put({"weights": {"1": 100}})
                without = p50_ms(400, conc, rng)
                put({"weights": {"1": 100}, "shadow": "2", "shadow_sample": 1.0})
                shadowed = p50_ms(400, conc, rng)
                rows.append((without, shadowed))
                print(f"c={conc} block {block}: p50 without {without:.3f} ms, "
                      f"with a 100 % shadow {shadowed:.3f} ms")  # fmt: skip
            a, b = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
            print(f"c={conc} median of blocks: without {a:.3f} ms, with a shadow {b:.3f} ms "
                  f"({b - a:+.3f} ms)")  # fmt: skip
        s = httpx.get(f"{BASE}/v1/admin/models/{MODEL}/traffic", timeout=10).json()
        print({k: s[k] for k in ("shadow", "evidence") if k in s})
        return 0
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    sys.exit(main())
