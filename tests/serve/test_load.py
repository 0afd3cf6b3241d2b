"""A bounded load on loopback: 50 generations from 4 concurrent clients against uvicorn on a free
port (tiny model, 2 steps). Every request is answered, every generation ends ``done`` with its
own PNG (its seed in the metadata), and the process's resident memory stays bounded."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from tests.serve.support import LiveServer, plugin_manager, start_service, write_job

httpx = pytest.importorskip("httpx")

REQUESTS, CLIENTS, WARM_UP = 50, 4, 8
RSS_GROWTH_LIMIT = 64 * 2**20  # bytes the process may grow by between warm-up and the end


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def generate(client: Any, seed: int) -> dict[str, Any]:
    """Submit, follow the events to the end, fetch the PNG: what one client sees."""
    r = client.post("/api/generations", json={"prompt": f"load {seed}", "seed": seed})
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    kinds, last = [], None
    with client.stream("GET", f"/api/generations/{job}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kinds.append(line[7:])
            elif line.startswith("data: "):
                last = json.loads(line[6:])
    image = client.get(f"/api/generations/{job}/image")
    return {"id": job, "seed": seed, "kinds": kinds, "last": last, "status": image.status_code}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from t2i_engine.serve.app import create_app

    job = write_job(tmp_path_factory.mktemp("load"), queue_size=CLIENTS, extra="")
    service, worker, ctx = start_service(job, plugin_manager())
    with LiveServer(create_app(service)) as server:
        yield server, ctx
    worker.stop()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident set size from /proc")
def test_fifty_requests_four_at_a_time_nothing_lost_memory_bounded(live):
    server, ctx = live
    seeds = list(range(REQUESTS))
    with httpx.Client(base_url=server.url, timeout=120) as client:
        with ThreadPoolExecutor(CLIENTS) as pool:
            results = list(pool.map(lambda s: generate(client, s), seeds[:WARM_UP]))
            before = rss()
            results += list(pool.map(lambda s: generate(client, s), seeds[WARM_UP:]))
        after = rss()
        gallery = client.get("/api/generations").json()["generations"]
    assert len(results) == REQUESTS
    assert all(r["kinds"][0] == "queued" and r["kinds"][-1] == "done" and r["status"] == 200 for r in results)
    assert sorted(int(r["last"]["metadata"]["seed"]) for r in results) == seeds
    assert len({r["id"] for r in results}) == REQUESTS
    written = sorted(Path(ctx.output_dir).glob("*.png"))
    assert sorted(p.stem for p in written) == sorted(r["id"] for r in results)
    assert len(gallery) == REQUESTS and all(g["state"] == "done" for g in gallery)
    print(f"RSS after warm-up {before / 2**20:.0f} MiB, after {REQUESTS} requests {after / 2**20:.0f} MiB")
    assert after - before < RSS_GROWTH_LIMIT, f"resident memory grew by {(after - before) / 2**20:.0f} MiB"
