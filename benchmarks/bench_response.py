"""What FastAPI's JSON response costs the images route, in-process (no Serve, no network): the service's
`ImagesResponse` with one base64 image of `--kib` KiB through its `response_model` (validated and serialised by
FastAPI, as `/v1/images/generations` returns it), the same JSON serialised by pydantic in the handler and sent as
bytes, and an empty body after the same base64 encoding: ms per request through Starlette's TestClient.

    python benchmarks/bench_response.py                 # 214 KiB: a 512x512 JPEG of noise, the size bench_serve sends
    python benchmarks/bench_response.py --kib 852       # a PNG's

It answers where the time outside the replica's handler goes (bench_serve's "outside the handler"): if not here, in
Serve's proxy and Ray's hops.
"""
from __future__ import annotations

import argparse
import base64
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kib", type=int, default=214, help="the encoded image's size")
    p.add_argument("--requests", type=int, default=300, help="per route and round, after 30 unmeasured")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.kib < 1 or args.requests < 1 or args.rounds < 1:
        p.error("--kib, --requests and --rounds must be at least 1")

    from fastapi import FastAPI, Response
    from fastapi.testclient import TestClient

    from serve.app import GeneratedImage, ImagesResponse

    image = os.urandom(args.kib * 1024)
    app = FastAPI()

    def images() -> ImagesResponse:
        return ImagesResponse(created=int(time.time()), data=[GeneratedImage(b64_json=base64.b64encode(image).decode(), seed=1)], output_format="jpeg")

    @app.post("/response-model", response_model=ImagesResponse)
    async def response_model() -> ImagesResponse:
        return images()

    @app.post("/pre-serialised")
    async def pre_serialised() -> Response:
        return Response(images().model_dump_json(), media_type="application/json")

    @app.post("/empty")
    async def empty() -> Response:
        base64.b64encode(image)
        return Response(b"{}", media_type="application/json")

    client = TestClient(app)
    routes = ("/response-model", "/pre-serialised", "/empty")
    ms: dict[str, list[float]] = {route: [] for route in routes}
    sizes = {}
    for _ in range(args.rounds):  # interleaved, so that a slow spell of the machine hits every route
        for route in routes:
            for _ in range(30):
                client.post(route)
            started = time.perf_counter()
            for _ in range(args.requests):
                sizes[route] = len(client.post(route).content)
            ms[route].append((time.perf_counter() - started) / args.requests * 1e3)
    print(f"| route | response KiB | ms per request, each round |\n|---|---|---|")
    for route in routes:
        print(f"| {route} | {sizes[route] / 1024:.0f} | {', '.join(f'{m:.2f}' for m in ms[route])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
