"""The Celery side of `scripts/bench peers`: the same job as an Ember worker's, as a Celery task.

One task, `peers.detect`: PNG bytes in, the SSD person detector's detections out, computed the
way Ember's worker computes them for models/ssdlite-person (read from its model.toml):

- decode (Pillow; grey/RGBA become RGB), resize to the model's input with a bilinear
  *convolution* filter (Pillow's BILINEAR: the same kind of filter as the worker's
  fast_image_resize Convolution(Bilinear), as tests/clients/known_answers.py does it; the two
  round a little differently: astronaut.png scores 0.9136 here, 0.9106 in the worker,
  docs/benchmarks/offline-cpu.json), stretch (model.toml's default resize), uint8 NHWC
  [1, H, W, 3];
- one `session.run` of a session created once per pool process (worker_process_init) and warmed
  up with a blank image: ONNX Runtime 1.31.1 as the worker's, the worker's session options
  (worker/src/runtime.rs): graph optimisation ORT_ENABLE_LAYOUT (what the ort crate's Level3
  maps to; not Python's default ORT_ENABLE_ALL), intra-op spinning off, sequential execution;
  intra-op threads from EMBER_PEERS_ORT_THREADS (the worker's default is ONNX Runtime's, one per
  core);
- the SSD output decoding of worker/src/process/ssd.rs: the first num_detections slots, scores
  at or above score_threshold, boxes clamped to 0..1, scaled to the input and mapped back to the
  original image's pixels (clamped to it), class ids rounded, labels from model.toml.

It returns {"job_id", "status", "outputs": {"detections"}, "timing"} like an Ember result, with
its own task id as job_id (the driver checks it against the id it sent).

Broker settings, chosen to match Ember's (docs/protocol.md) at Celery's documented best for long
tasks (docs "Optimizing: Prefetch limits" and "Using Quorum Queues"): a quorum queue with the
arguments of an Ember job queue (x-delivery-limit 5, x-overflow reject-publish, x-max-length
10000; Ember's dead-letter exchange left out: it does nothing unless a job is dead-lettered),
task_acks_late, prefetch multiplier 1, publisher confirms (confirm_publish), rpc:// results,
msgpack for the task (binary-safe: the PNG travels as raw bytes, as Ember's job body does), JSON
for the result (as Ember's). The task's exchange is direct, as Ember's `ember.jobs` (Celery warns
that its native delayed delivery, which it sets up for quorum queues, needs a topic exchange: only
ETA/countdown tasks use it, and none is sent here). Events, remote control, gossip, mingle and
heartbeats are off (the driver starts the worker with --without-gossip --without-mingle
--without-heartbeat).

Environment: EMBER_PEERS_QUEUE (the queue, also the task's routing key), EMBER_PEERS_ORT_THREADS
(default 1), EMBER_PEERS_MODEL_DIR (default models/ssdlite-person), EMBER_PEERS_BROKER (default
the local RabbitMQ), EMBER_PEERS_READY_DIR (where each pool process writes a file once its session
is warm).
"""

from __future__ import annotations

import io
import os
import time
import tomllib
from pathlib import Path

from celery import Celery, signals
from kombu import Exchange, Queue

ROOT = Path(__file__).resolve().parents[2]
BROKER = os.environ.get("EMBER_PEERS_BROKER", "amqp://guest:guest@127.0.0.1:5672//")
QUEUE = os.environ.get("EMBER_PEERS_QUEUE", "peers.celery")
MODEL_DIR = Path(os.environ.get("EMBER_PEERS_MODEL_DIR", ROOT / "models" / "ssdlite-person"))
TASK = "peers.detect"

# An Ember job queue's arguments (core/src/topology.rs jobs_queue_arguments), less the DLX.
QUEUE_ARGUMENTS = {
    "x-queue-type": "quorum",
    "x-delivery-limit": 5,
    "x-overflow": "reject-publish",
    "x-max-length": 10_000,
}


def settings(queue: str = QUEUE) -> dict:
    """The app's configuration (also what the driver writes next to the figures)."""
    return {
        "broker_url": BROKER,
        "result_backend": "rpc://",
        "broker_transport_options": {"confirm_publish": True},
        "broker_connection_retry_on_startup": True,
        "task_queues": [
            Queue(
                queue,
                Exchange(queue, type="direct", durable=True),
                routing_key=queue,
                durable=True,
                queue_arguments=QUEUE_ARGUMENTS,
            )
        ],
        "task_default_queue": queue,
        "task_default_exchange": queue,
        "task_default_routing_key": queue,
        "task_create_missing_queues": False,
        "task_acks_late": True,
        "worker_prefetch_multiplier": 1,
        "task_serializer": "msgpack",
        "result_serializer": "json",
        "accept_content": ["msgpack", "json"],
        "result_accept_content": ["json"],
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "worker_enable_remote_control": False,
        "worker_hijack_root_logger": False,
    }


def make_app(queue: str = QUEUE) -> Celery:
    app = Celery("peers", set_as_current=True)
    app.conf.update(settings(queue))
    return app


app = make_app()


class SsdPipeline:
    """Ember's image + ssd path for one model directory, in Python."""

    def __init__(self, model_dir: Path, intra_threads: int):
        import numpy as np
        import onnxruntime as ort

        self.np = np
        spec = tomllib.loads((model_dir / "model.toml").read_text())
        image, output = spec["input"], spec["output"]
        checks = {
            "input.kind": (image.get("kind", "tensor"), "image"),
            "input.layout": (image.get("layout", "nchw"), "nhwc"),
            "input.dtype": (image.get("dtype", "float32"), "uint8"),
            "input.resize": (image.get("resize", "stretch"), "stretch"),
            "input.channels": (image.get("channels", "rgb"), "rgb"),
            "output.decoder": (output.get("decoder"), "ssd"),
        }
        wrong = {k: got for k, (got, want) in checks.items() if got != want}
        if wrong:
            raise ValueError(f"this pipeline does the SSD path only; {model_dir} has {wrong}")
        self.width, self.height = int(image["width"]), int(image["height"])
        self.input = image["tensor"]
        self.outputs = [output[k] for k in ("num_detections", "boxes", "scores", "classes")]
        self.threshold = float(output.get("score_threshold", 0.5))
        self.labels = {int(k): str(v) for k, v in spec.get("labels", {}).items()}
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_LAYOUT
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = intra_threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(model_dir / spec.get("file", "model.onnx")),
            sess_options=options,
            providers=["CPUExecutionProvider"],
        )
        self.ort_version = ort.__version__
        # Warm-up, as the worker's Engine::load does: one blank image.
        self.session.run(self.outputs, {self.input: np.zeros((1, self.height, self.width, 3), np.uint8)})

    def prepare(self, png: bytes):
        from PIL import Image

        img = Image.open(io.BytesIO(png))
        img = img.convert("RGB") if img.mode != "RGB" else img  # the worker's into_rgb8
        img.load()
        size = img.size
        if size != (self.width, self.height):
            img = img.resize((self.width, self.height), Image.Resampling.BILINEAR)
        tensor = self.np.asarray(img, dtype=self.np.uint8)[None]
        return tensor, size

    def decode(self, outputs, size) -> list[dict]:
        counts, boxes, scores, classes = (o[0] for o in outputs)
        fw, fh = float(size[0]), float(size[1])
        w, h = float(self.width), float(self.height)
        scale_x, scale_y = w / fw, h / fh
        slots = len(scores)
        count = min(int(max(float(counts.reshape(-1)[0]), 0.0)), slots)
        unit = lambda v: min(max(float(v), 0.0), 1.0)  # noqa: E731
        detections = []
        for k in range(count):
            score = float(scores[k])
            if score < self.threshold:
                continue
            b = boxes[k]
            x = lambda v: min(max(v / scale_x, 0.0), fw)  # noqa: E731
            y = lambda v: min(max(v / scale_y, 0.0), fh)  # noqa: E731
            class_id = max(round(float(classes[k])), 0)
            detections.append(
                {
                    "label": self.labels.get(class_id, f"class_{class_id}"),
                    "class_id": class_id,
                    "score": score,
                    "box": [x(unit(b[1]) * w), y(unit(b[0]) * h), x(unit(b[3]) * w), y(unit(b[2]) * h)],
                }
            )
        return detections

    def __call__(self, png: bytes) -> tuple[list[dict], dict]:
        started = time.perf_counter()
        tensor, size = self.prepare(png)
        prepared = time.perf_counter()
        outputs = self.session.run(self.outputs, {self.input: tensor})
        ran = time.perf_counter()
        detections = self.decode(outputs, size)
        done = time.perf_counter()
        timing = {
            "prepare_ms": (prepared - started) * 1e3,
            "inference_ms": (ran - prepared) * 1e3,
            "worker_ms": (done - started) * 1e3,
        }
        return detections, timing


_pipeline: SsdPipeline | None = None


@signals.worker_process_init.connect
def _load_model(**_):
    """Each pool process loads the model once, before it takes a job."""
    global _pipeline
    _pipeline = SsdPipeline(MODEL_DIR, int(os.environ.get("EMBER_PEERS_ORT_THREADS", "1")))
    ready = os.environ.get("EMBER_PEERS_READY_DIR")
    if ready:
        Path(ready, str(os.getpid())).write_text(_pipeline.ort_version)


@app.task(name=TASK, bind=True)
def detect(self, png: bytes) -> dict:
    if _pipeline is None:  # only outside a prefork pool (e.g. --pool solo)
        _load_model()
    detections, timing = _pipeline(png)
    return {
        "job_id": self.request.id,
        "status": "ok",
        "outputs": {"detections": detections},
        "timing": timing,
    }
