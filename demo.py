"""Watch it stream: a live page where the video plays as its chunks arrive and the prompt changes
mid-stream (CausVid's interactive streaming, Sec. 4.4 and 5.3; the KV cache keeps the past).

    python demo.py --tiny                    # the toy student on a CPU; open the address it prints
    python demo.py --config wan2.1-t2v-1.3b --model-dir W --run-dir runs/wan     # Wan, on a GPU

Each tab is a stream of its own: chunk after chunk from the causal student over a bounded cache
(the official re-encoding window, or the preset's rolling cache: any length), a prompt change
applied from the next chunk on, optionally from an image (image-to-video) or following a video
(video-to-video, SDEdit at --strength). The model: --ckpt; else the run's dmd.safetensors; else, on
the toy world, the student shipped in weights/ (weights/README.md).

FastAPI (uvicorn, WebSockets) serves demo.html and one WebSocket per tab. Each stream runs in a
worker thread, off the event loop, at most --max-streams at once (the next tab is told it is busy);
it produces at most a few chunks ahead of what its page has played, and a closed tab (or one that
plays nothing for IDLE seconds) stops it and frees its cache. Uploads travel as bytes over the
WebSocket (never as a path), limited in size before and after decoding. The server binds to
127.0.0.1 unless --host says otherwise, and a page of another origin cannot open its WebSocket.

--bench TABS opens that many headless Chromium tabs (Playwright; Debian's chromium) that play each
chunk as it arrives, and prints the time to the first chunk and the frames per second each page
received (--screenshot PATH: the first tab, as a PNG).
"""

import argparse
import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import itertools
import json
import os
import sys
import threading
import time

import torch

import causvid as cv
import utils

HERE = os.path.dirname(os.path.abspath(__file__))
UPLOAD_LIMITS = {"image": 4 << 20, "video": 32 << 20}  # bytes, after base64 decoding
DECODED_LIMIT = "64MB"  # an upload's decoded pixels at most (imageio's decompression-bomb guard)
AHEAD = 3  # chunks a stream may make ahead of what its page has played
IDLE = 120.0  # seconds a stream waits for its page to play a chunk before it stops


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    utils.add_common_args(p)
    p.add_argument("--ckpt", help="the student (default: <run>/dmd.safetensors, else weights/'s)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any free one)")
    p.add_argument(
        "--max-streams", type=int, default=4, help="streams at once, all tabs together (default: 4)"
    )
    p.add_argument("--fps", type=float, default=8.0, help="the page's playback rate (default: 8)")
    p.add_argument(
        "--window",
        type=int,
        help="frames a chunk attends over at most (default: the training length)",
    )
    p.add_argument(
        "--bench", type=int, metavar="TABS", help="measure TABS headless tabs, then exit"
    )
    p.add_argument("--seconds", type=float, default=20.0, help="--bench: how long (default: 20)")
    p.add_argument("--screenshot", help="--bench: save the first tab as this PNG")
    return p.parse_args(argv)


class Model:
    """What every stream shares: the student, its text encoder and its world."""

    def __init__(self, args):
        cfg, device, run = utils.resolve(args)
        path = args.ckpt or os.path.join(run, "dmd.safetensors")
        shipped = utils.make_world(cfg, device).pretrained_student  # (the toy world's, weights/)
        if not args.ckpt and not os.path.exists(path) and shipped:
            path = shipped
        student = utils.load_model(path, causal=True, device=device, expect=cfg)
        self.student = utils.prepare_for_inference(student, device)
        self.cfg = student.cfg
        self.world = utils.make_world(self.cfg, device, args.model_dir)
        self.world.check_pixels()
        self.text_encoder = self.world.text_encoder(path)
        self.device = device
        self.path = path
        K = self.cfg.chunk_size
        window = args.window or self.cfg.num_frames
        if window % K or window < 2 * K:
            raise cv.CausVidError(f"--window {window} must be whole chunks of {K}, at least 2")
        sink = self.cfg.sink if self.cfg.sink >= 0 else None  # the preset's long-video policy
        if sink is not None and sink > window - 2 * K:
            raise cv.CausVidError(
                f"sink {sink} leaves no room for two chunks in the window {window}"
            )
        self.generate = utils.streaming(window, sink, self.cfg.sink_gap)
        self.lock = threading.Lock()  # the text encoder, one prompt at a time
        self.embeddings = {}

    def embed(self, prompt: str) -> torch.Tensor:
        """The prompt's embedding (1, L, D_text) on the device; the latest 64 are kept."""
        with self.lock:
            if prompt not in self.embeddings:
                if len(self.embeddings) >= 64:
                    self.embeddings.pop(next(iter(self.embeddings)))  # the oldest
                self.embeddings.update(self.text_encoder.embed([prompt]))
            return self.embeddings[prompt][None].to(self.device)


class LivePrompt:
    """The text of every chunk is the prompt the page asks for when the chunk starts:
    stream_generate's per-chunk text, read lazily (the cache keeps what the past was made with).
    `started` lists, in order, the prompt each chunk started under."""

    def __init__(self, prompt: str, embedding: torch.Tensor):
        self.current = (prompt, embedding)  # swapped whole by the page's thread
        self.started = collections.deque()

    def __getitem__(self, c):
        if isinstance(c, slice):  # (a window's chunks, windowed_generate)
            return self
        prompt, embedding = self.current
        self.started.append(prompt)
        return embedding


class Stream:
    """One tab's video: made in a worker thread, sent to the page by the event loop."""

    ids = itertools.count()

    def __init__(self, model: Model, prompt: str, seed: int, image=None, video=None, strength=1.0):
        self.id = next(Stream.ids)
        self.model = model
        self.world = model.world.fork()  # (Wan: a VAE cache of its own)
        self.prompt = LivePrompt(prompt, model.embed(prompt))
        self.seed = seed
        self.image = image  # uint8 (1, H, W, 3): image-to-video
        self.video = video  # uint8 (1, F, H, W, 3): video-to-video
        self.strength = strength
        self.stop = threading.Event()
        self.credit = threading.BoundedSemaphore(AHEAD)  # a chunk made per chunk the page played

    def played(self):
        """The page started playing a chunk: room for one more (never more than AHEAD)."""
        with contextlib.suppress(ValueError):
            self.credit.release()

    def switch(self, prompt: str):
        """From the next chunk on, the video follows `prompt`."""
        self.prompt.current = (prompt, self.model.embed(prompt))

    def chunks(self):
        """-> uint8 chunks (1, k, H, W, 3), each with the prompt it started under, until stop."""
        m = self.model
        cfg = m.cfg
        world = self.world
        device = m.device
        K = cfg.chunk_size
        start = 0
        video = None
        if self.video is not None:  # the video's frames, as the stream reaches them
            start = utils.student_start(cfg, self.strength)
            video = world.encode_stream(self.video.split(world.pixel_frames(K), 1), K)
        context = None
        if self.image is not None:  # the image, still for a chunk, is the cached chunk 0
            context = world.encode(self.image.expand(world.pixel_frames(K), -1, -1, -1)[None])
        make = utils.sampler(m.student, "student", cfg, device, generate=m.generate, start=start)
        shape = (1, K, cfg.channels, cfg.height, cfg.width)
        noise = (
            torch.randn(shape, generator=utils.chunk_rng(self.seed, c, 0, device), device=device)
            for c in itertools.takewhile(lambda _: not self.stop.is_set(), itertools.count())
        )

        def renoise(c):  # Alg. 2 line 8's noise for chunk c
            return utils.chunk_rng(self.seed, c, 1, device)

        made = make(noise, self.prompt, context, renoise, video)
        prompts = (self.prompt.started.popleft() for _ in itertools.count())
        if context is not None:  # the given image leads the video
            made = itertools.chain([context], made)
            prompts = itertools.chain([self.prompt.current[0]], prompts)
        with torch.no_grad(), utils.autocast(device):
            yield from zip(world.decode_stream(self.paced(made)), prompts)

    def paced(self, chunks):
        """The chunks, each made once the page has room for it (or stop; or IDLE seconds of a
        page that plays nothing, a hidden tab: its slot and its cache go back)."""
        for chunk in chunks:
            yield chunk
            waited = time.perf_counter()
            while not self.credit.acquire(timeout=0.1):
                if self.stop.is_set():
                    return
                if time.perf_counter() - waited > IDLE:
                    raise cv.CausVidError(f"the page played nothing for {IDLE:.0f} s; start again")


def check_prompt(prompt) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise cv.CausVidError("the prompt is empty; write one, e.g. 'a red square moving left'")
    if len(prompt) > 500:
        raise cv.CausVidError(f"the prompt has {len(prompt)} characters; 500 at most")
    return prompt.strip()


def png(frame: torch.Tensor) -> bytes:
    """uint8 (H, W, 3) -> PNG bytes."""
    import imageio.v3 as iio

    return iio.imwrite("<bytes>", frame.numpy(), extension=".png")


def read_upload(model: Model, kind, data) -> torch.Tensor:
    """A page's upload (base64 of an image or a video file) -> uint8 frames, or a one-line error."""
    if kind not in ("image", "video") or not isinstance(data, str):
        raise cv.CausVidError("an upload is an image or a video, as base64 text")
    try:
        raw = base64.b64decode(data.split(",")[-1], validate=True)
    except (ValueError, TypeError):
        raise cv.CausVidError(f"the {kind} did not arrive as base64; upload it again") from None
    if len(raw) > UPLOAD_LIMITS[kind]:
        limit = UPLOAD_LIMITS[kind] >> 20
        raise cv.CausVidError(f"the {kind} is {len(raw) >> 20} MB; the limit is {limit} MB")
    if raw[:2] == b"PK":
        raise cv.CausVidError(f"the {kind} is an archive; upload an image or a video file")
    name = f"the uploaded {kind}"
    read = dict(memtest=DECODED_LIMIT, note=lambda line: print(line, file=sys.stderr))
    if kind == "video":
        return utils.read_video(raw, model.world, name=name, **read)[:1]
    return utils.read_frames(raw, *model.world.pixel_size, name=name, **read)[0, :1]


UPLOADS = concurrent.futures.ThreadPoolExecutor(2)  # uploads are decoded two at a time


async def send(ws, s: Stream, done):
    """Run the stream's worker thread and send each chunk as it comes: a JSON line (its index, its
    prompt, the times), then its frames as PNGs. done(s) when it ends."""
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()

    def work():
        try:
            for item in s.chunks():
                loop.call_soon_threadsafe(queue.put_nowait, item)
        except Exception as e:  # said to the page, not lost in the thread
            loop.call_soon_threadsafe(queue.put_nowait, e)
        loop.call_soon_threadsafe(queue.put_nowait, None)

    worker = threading.Thread(target=work, daemon=True)
    t0 = time.perf_counter()
    worker.start()
    shown = 0
    first = None
    try:
        for c in itertools.count():
            item = await queue.get()
            if item is None:
                break
            if isinstance(item, Exception):
                await ws.send_json({"type": "error", "message": f"the stream stopped: {item}"})
                return
            if s.stop.is_set():  # (another start, a stop: what is queued is not sent)
                return
            frames, prompt = item
            now = time.perf_counter() - t0
            first = first or now
            shown += frames.shape[1]
            stats = {"type": "chunk", "stream": s.id, "index": c, "frames": frames.shape[1]}
            stats |= {"prompt": prompt}
            stats |= {"first_chunk_s": first, "fps": shown / now if now else 0.0}
            await ws.send_json(stats)
            for frame in frames[0]:
                await ws.send_bytes(await asyncio.to_thread(png, frame))
        await ws.send_json({"type": "ended"})
    finally:
        s.stop.set()
        await asyncio.to_thread(worker.join)
        done(s)


class Tab:
    """One page's WebSocket: its uploads and at most one stream."""

    def __init__(self, ws, model: Model, args, running: set):
        self.ws = ws
        self.model = model
        self.args = args
        self.running = running  # every tab's running streams
        self.inputs = {}  # this tab's uploads: "image", "video" -> uint8 frames
        self.current = None  # (its Stream, the task sending it)

    async def handle(self, message: dict):
        kind = message.get("type")
        if kind == "start":
            await self.start(message)
        elif kind == "prompt" and self.current is not None:  # from the next chunk on
            prompt = check_prompt(message.get("prompt"))
            await asyncio.to_thread(self.current[0].switch, prompt)
        elif kind == "played" and self.current is not None:  # room for one more chunk
            self.current[0].played()
        elif kind == "stop":
            await self.stop()
        elif kind == "upload":
            upload = message.get("kind")
            loop = asyncio.get_running_loop()
            data = message.get("data")
            frames = await loop.run_in_executor(UPLOADS, read_upload, self.model, upload, data)
            self.inputs[upload] = frames
            await self.ws.send_json({"type": "uploaded", "kind": upload, "frames": len(frames)})

    async def start(self, message: dict):
        await self.stop()
        if len(self.running) >= self.args.max_streams:
            busy = f"busy: {len(self.running)} streams are running, the most this server makes"
            await self.ws.send_json({"type": "busy", "message": busy + " at once; try again soon"})
            return
        slot = object()  # held while the prompt is encoded, so two tabs cannot both take it
        self.running.add(slot)
        try:
            prompt = check_prompt(message.get("prompt"))
            seed = message.get("seed", self.args.seed)
            strength = message.get("strength", 0.75)
            if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**31):
                raise cv.CausVidError("the seed is a whole number in [0, 2^31)")
            if not (isinstance(strength, (int, float)) and 0 < strength <= 1):
                raise cv.CausVidError("the strength is a number in (0, 1]")
            s = await asyncio.to_thread(  # (its prompt is encoded off the event loop)
                Stream,
                self.model,
                prompt,
                seed=seed,
                image=self.inputs.get("image") if message.get("use_image") else None,
                video=self.inputs.get("video") if message.get("use_video") else None,
                strength=strength,
            )
        finally:
            self.running.discard(slot)
        self.running.add(s)
        await self.ws.send_json({"type": "started", "stream": s.id})
        self.current = (s, asyncio.create_task(send(self.ws, s, self.running.discard)))

    async def stop(self):
        """Stop the stream: its thread ends after the chunk in progress, its cache goes."""
        if self.current is not None:
            self.current[0].stop.set()
            await asyncio.gather(self.current[1], return_exceptions=True)
            self.current = None


def make_app(model: Model, args):
    """The page, what it needs to know, and its WebSocket."""
    from fastapi import FastAPI, WebSocket, WebSocketDisconnect
    from fastapi.responses import HTMLResponse, JSONResponse

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    with open(os.path.join(HERE, "demo.html")) as f:
        page = f.read()
    running = set()  # the streams now running, every tab's

    @app.get("/")
    def index():
        return HTMLResponse(page)

    @app.get("/info")
    def info():
        return JSONResponse(
            {
                "model": os.path.basename(model.path),
                "world": model.world.name,
                "prompts": list(model.world.prompts),
                "chunk_size": model.cfg.chunk_size,
                "fps": args.fps,
                "streams": len(running),
                "max_streams": args.max_streams,
            }
        )

    @app.websocket("/stream")
    async def stream(ws: WebSocket):
        origin = ws.headers.get("origin")
        if origin is not None and origin != f"http://{ws.headers.get('host')}":
            await ws.close(code=1008)  # another site's page may not drive this server
            return
        await ws.accept()
        tab = Tab(ws, model, args, running)
        try:
            while True:
                try:
                    message = json.loads(await ws.receive_text())
                    if not isinstance(message, dict):
                        raise cv.CausVidError("a message is a JSON object")
                    await tab.handle(message)
                except cv.CausVidError as e:  # said to the page, in a line
                    await ws.send_json({"type": "error", "message": str(e)})
                except (ValueError, KeyError, TypeError) as e:  # not JSON text, or not ours
                    await ws.send_json({"type": "error", "message": f"a bad message ({e!r:.80})"})
        except WebSocketDisconnect:
            pass
        finally:  # a closed tab stops its stream
            await tab.stop()

    return app


def serve(args, model: Model):
    import uvicorn

    app = make_app(model, args)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        ws_max_size=48 << 20,  # an upload in one message
        ws_max_queue=2,
    )
    server = uvicorn.Server(config)

    async def run():
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.05)
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        print(f"demo: {model.path} ({model.world.name}) at http://{host}:{port}", flush=True)
        if args.bench:
            await asyncio.to_thread(bench, args, f"http://{host}:{port}")
            server.should_exit = True
        await task

    asyncio.run(run())


def bench(args, url: str):
    """--bench: TABS headless tabs play every chunk as it arrives for --seconds; per tab the time to
    its first chunk and the frames per second it received, as the page measured them."""
    import shutil

    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        raise cv.CausVidError("--bench drives Debian's chromium: apt-get install -y chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        pages = [browser.new_page() for _ in range(args.bench)]
        for i, page in enumerate(pages):
            page.goto(f"{url}/?asap=1&seed={i}")
            page.wait_for_function("window.demo && window.demo.ready")
        for page in pages:
            page.click("#start")
        time.sleep(args.seconds)
        stats = [page.evaluate("window.demo.stats()") for page in pages]
        if args.screenshot:
            pages[0].screenshot(path=args.screenshot)
        browser.close()
    print(f"| tab | first chunk (s) | frames/s received | frames |  ({args.bench} tabs)")
    for i, s in enumerate(stats):
        print(f"| {i} | {s['first']:.3f} | {s['fps']:.1f} | {s['frames']} |")
    return stats


# Chromium here: headless, no sandbox (root), no background connections (the network is closed)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def main(argv=None):
    args = parse_args(argv)
    if args.max_streams < 1:
        raise cv.CausVidError(f"--max-streams {args.max_streams} must be at least 1")
    if args.fps <= 0:
        raise cv.CausVidError(f"--fps {args.fps} must be positive")
    if args.bench:  # every tab measured, none told it is busy
        args.max_streams = max(args.max_streams, args.bench)
    serve(args, Model(args))


if __name__ == "__main__":
    utils.run_cli(main)
