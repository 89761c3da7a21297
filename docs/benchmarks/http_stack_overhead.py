"""Server CPU per streamed chunk: aiohttp against FastAPI on uvicorn (the measurement behind docs/http-api.md).

    pip install fastapi uvicorn && python docs/benchmarks/http_stack_overhead.py

Each stack serves one POST that streams CHUNKS server-sent events of a completion chunk's JSON; a client
in this process reads REQUESTS such responses, three times; the server's own CPU time (getrusage, read
through a GET) divided by the chunks it wrote is the figure. Not part of the suite: FastAPI and uvicorn
are not dependencies.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time

CHUNKS, REQUESTS, REPEATS = 4000, 5, 3
CHUNK = {"id": "cmpl-x", "object": "text_completion", "created": 0, "model": "m",
         "choices": [{"index": 0, "text": " tok", "logprobs": None, "finish_reason": None}]}

AIOHTTP = f"""
import asyncio, json, resource, sys
from aiohttp import web
async def stream(request):
    resp = web.StreamResponse(headers={{"Content-Type": "text/event-stream"}})
    await resp.prepare(request)
    for _ in range({CHUNKS}):
        await asyncio.sleep(0)  # a token arrives from the engine: one trip through the loop each
        await resp.write(b"data: " + json.dumps({CHUNK!r}).encode() + b"\\n\\n")
    await resp.write(b"data: [DONE]\\n\\n")
    return resp
async def cpu(request):
    r = resource.getrusage(resource.RUSAGE_SELF)
    return web.json_response({{"cpu": r.ru_utime + r.ru_stime}})
app = web.Application(); app.router.add_post("/s", stream); app.router.add_get("/cpu", cpu)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""

FASTAPI = f"""
import asyncio, json, resource, sys
import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
app = FastAPI()
@app.post("/s")
async def stream():
    async def chunks():
        for _ in range({CHUNKS}):
            await asyncio.sleep(0)
            yield "data: " + json.dumps({CHUNK!r}) + "\\n\\n"
        yield "data: [DONE]\\n\\n"
    return StreamingResponse(chunks(), media_type="text/event-stream")
@app.get("/cpu")
async def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {{"cpu": r.ru_utime + r.ru_stime}}
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def server_cpu(port: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/cpu")
    seconds = json.loads(conn.getresponse().read())["cpu"]
    conn.close()
    return seconds


def measure(name: str, source: str, port: int) -> list[float]:
    proc = subprocess.Popen([sys.executable, "-c", source, str(port)])
    try:
        for _ in range(100):
            try:
                server_cpu(port)
                break
            except OSError:
                time.sleep(0.2)
        per_chunk_us = []
        for _ in range(REPEATS):
            before = server_cpu(port)
            for _ in range(REQUESTS):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                conn.request("POST", "/s", body=b"{}")
                events = conn.getresponse().read().count(b"data: ")
                conn.close()
                assert events == CHUNKS + 1, (name, events)
            per_chunk_us.append((server_cpu(port) - before) / (REQUESTS * CHUNKS) * 1e6)
        return per_chunk_us
    finally:
        proc.kill()


if __name__ == "__main__":
    for name, source, port in (("aiohttp", AIOHTTP, 8101), ("fastapi+uvicorn", FASTAPI, 8102)):
        print(f"{name}: server CPU per streamed chunk {', '.join(f'{x:.1f}' for x in measure(name, source, port))} us")
