"""Loaders reading from object storage vs local disk, one rank, in one run, interleaved.

An S3-compatible server (moto's, on 127.0.0.1) holds a copy of a token dataset and of
an ImageNet-format split; a tiny TCP proxy in front of it adds a fixed delay to every
request (client -> server direction, once per request: each GET arrives as one chunk),
standing in for an object store's first-byte latency. Contenders (data.remote settings):
  local        the same files on local disk (memory-mapped tokens, ranged file reads)
  s3           the server directly, read-ahead 2 steps, 16 requests in flight
  s3+lat       through the proxy (--latency-ms), same read-ahead
  s3+lat/none  through the proxy, no read-ahead and one request at a time (the latency
               a rank would wait on without read-ahead)

Each contender runs `--steps` steps of `TokenBatches` / `ImageBatches` (num_workers=0:
read-ahead threads only), once with no model (the loader's own rate) and once with a
simulated model step of `--model-ms` (sleep) after each step; "wait" is the time per
step spent inside next_step, i.e. what the rank waits on data. Contenders take turns
(A B C D A B C D ...), medians over `--repeats`; ratios are against local from the same
run. About two minutes here:
    PYTHONPATH=$PWD python benchmarks/data_objectstore.py [--latency-ms 20] [--repeats 3]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.data.objectstore import S3Server, free_port  # noqa: E402


class LatencyProxy:
    """127.0.0.1:port -> target, each client->server chunk delayed by `delay` seconds."""

    def __init__(self, target_port: int, delay: float):
        self.port, self.target, self.delay = free_port(), target_port, delay
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(lambda loop, ctx: None)  # read-ahead left running at exit: not news
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result()

    async def _start(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _pipe(self, reader, writer, delay: float):
        try:
            while data := await reader.read(65536):
                if delay:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, client_r, client_w):
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(self._pipe(client_r, server_w, self.delay), self._pipe(server_r, client_w, 0))


def _use_endpoint(url: str) -> None:
    import s3fs

    os.environ["AWS_ENDPOINT_URL"] = url
    s3fs.S3FileSystem.clear_instance_cache()  # a cached client keeps its old endpoint


def _run(make, steps: int, model_s: float) -> tuple[float, float]:
    """(items per second, seconds waited on data per step) over `steps` steps."""
    src = make()
    src.next_step()  # open files, start the read-ahead: not part of the steady state
    wait = 0.0
    items = 0
    start = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        batches = src.next_step()
        wait += time.perf_counter() - t
        items += sum(b["input"].numel() if src.unit == "tok" else len(b["input"]) for b in batches)
        if model_s:
            time.sleep(model_s)
    if hasattr(src, "close"):
        src.close()
    return items / (time.perf_counter() - start), wait / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--model-ms", type=float, default=100.0)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from distreg.data.images import ImageBatches, ImageSamples
    from distreg.data.imagenet_convert import convert_imagenet
    from distreg.data.synth_imagenet import synth_imagenet
    from distreg.data.tokens import TokenBatches, TokenDataset, synth_tokens

    tmp = tempfile.mkdtemp(prefix="objstore-bench-", dir="/tmp")
    synth_tokens(f"{tmp}/tokens", num_tokens=400_000, vocab_size=256, num_shards=4)
    synth_imagenet(f"{tmp}/ilsvrc", num_classes=4, train_per_class=48, val_per_class=1, min_size=64, max_size=96)
    convert_imagenet(f"{tmp}/ilsvrc", f"{tmp}/imagenet", shard_size=64, processes=1, log=lambda *_: None)

    s3 = S3Server()
    proxy = LatencyProxy(s3.port, args.latency_ms / 1000)
    try:
        os.environ.update({k: v for k, v in s3.env.items() if k != "AWS_ENDPOINT_URL"})
        s3.fs.mkdir("bench")
        s3.fs.put(f"{tmp}/tokens/", "bench/tokens", recursive=True)
        s3.fs.put(f"{tmp}/imagenet/", "bench/imagenet", recursive=True)
        direct, slow = s3.url, f"http://127.0.0.1:{proxy.port}"
        seq, gb, img_gb = 512, 16, 16
        contenders = {  # name: (endpoint or None for local, readahead_steps, max_in_flight)
            "local": (None, 2, 16), "s3": (direct, 2, 16), "s3+lat": (slow, 2, 16), "s3+lat/none": (slow, 0, 1)}

        def tokens(name):
            endpoint, ahead, inflight = contenders[name]
            url = f"{tmp}/tokens" if endpoint is None else "s3://bench/tokens"
            return lambda: TokenBatches(TokenDataset(url, seq, max_in_flight=inflight), gb, 1, 0, 1, seed=0,
                                        readahead_steps=ahead)

        def images(name):
            endpoint, ahead, inflight = contenders[name]
            url = f"{tmp}/imagenet/train" if endpoint is None else "s3://bench/imagenet/train"
            return lambda: ImageBatches(ImageSamples(url, 64, max_in_flight=inflight), img_gb, 1, 0, 1, seed=0,
                                        readahead_steps=ahead)

        # The server's own cost per request (sequential 1 KiB ranged GETs, no proxy): moto
        # is a Python server sharing this machine's cores, so it bounds the s3 rows.
        _use_endpoint(direct)
        fs = s3.fs
        t = time.perf_counter()
        for k in range(40):
            fs.cat_file("bench/tokens/shard_00000.bin", start=k * 1024, end=(k + 1) * 1024)
        server_ms = (time.perf_counter() - t) / 40 * 1000

        results: dict[tuple, list] = {}
        for _ in range(args.repeats):
            for kind, maker in (("tokens", tokens), ("images", images)):
                for model_ms in (0.0, args.model_ms):
                    for name in contenders:
                        endpoint = contenders[name][0]
                        if endpoint:
                            _use_endpoint(endpoint)
                        results.setdefault((kind, model_ms, name), []).append(
                            _run(maker(name), args.steps, model_ms / 1000))
        print(f"\none rank; {args.latency_ms:.0f} ms injected per request for s3+lat; model step {args.model_ms:.0f} ms "
              f"(sleep) or none; medians of {args.repeats}, interleaved; moto serves one ranged GET in "
              f"{server_ms:.1f} ms here ({gb} token windows / {img_gb} images = requests per step)")
        print(f"{'reader':7} {'model':>6} {'contender':12} {'items/s':>10} {'wait/step ms':>13} {'ratio vs local':>15}")
        for kind in ("tokens", "images"):
            for model_ms in (0.0, args.model_ms):
                local = statistics.median(r[0] for r in results[(kind, model_ms, "local")])
                for name in contenders:
                    rs = results[(kind, model_ms, name)]
                    rate, wait = statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)
                    print(f"{kind:7} {model_ms:6.0f} {name:12} {rate:10.0f} {wait * 1000:13.1f} {rate / local:15.2f}")
    finally:
        s3.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
