#!/usr/bin/env python3
"""An Ember client written the way the RabbitMQ RPC tutorial writes one (pika).

Publishes each image to the `ember.jobs` exchange with the model as routing key, `reply_to` and a
`correlation_id`, and waits for the matching reply. With --direct-reply-to it uses RabbitMQ's
Direct Reply-to pseudo-queue instead of an exclusive reply queue.

Prints one JSON result per line (the worker's result body), in the order the files were given.
"""

import argparse
import json
import mimetypes
import sys
import time
import uuid

import pika

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


class EmberRpcClient:
    def __init__(self, url, model, direct_reply_to):
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.model = model
        if direct_reply_to:
            self.callback_queue = DIRECT_REPLY_TO
        else:
            result = self.channel.queue_declare(queue="", exclusive=True)
            self.callback_queue = result.method.queue
        self.channel.basic_consume(
            queue=self.callback_queue,
            on_message_callback=self.on_response,
            auto_ack=True,
        )
        self.responses = {}

    def on_response(self, ch, method, props, body):
        self.responses[props.correlation_id] = body

    def call(self, body, content_type, timeout):
        corr_id = str(uuid.uuid4())
        self.channel.basic_publish(
            exchange="ember.jobs",
            routing_key=self.model,
            properties=pika.BasicProperties(
                reply_to=self.callback_queue,
                correlation_id=corr_id,
                content_type=content_type,
                message_id=corr_id,
                delivery_mode=2,
                headers={"ember-submitted-at": int(time.time() * 1000)},
            ),
            body=body,
        )
        deadline = time.monotonic() + timeout
        while corr_id not in self.responses:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no reply within {timeout} s")
            self.connection.process_data_events(time_limit=min(remaining, 1.0))
        return json.loads(self.responses.pop(corr_id))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+")
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    parser.add_argument("--model", default="ssdlite-person")
    parser.add_argument("--direct-reply-to", action="store_true")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--pretty", action="store_true", help="print a short human summary too")
    args = parser.parse_args()

    client = EmberRpcClient(args.url, args.model, args.direct_reply_to)
    for path in args.images:
        with open(path, "rb") as f:
            body = f.read()
        content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
        started = time.monotonic()
        result = client.call(body, content_type, args.timeout)
        elapsed_ms = (time.monotonic() - started) * 1000
        if args.pretty:
            outputs = result.get("outputs") or {}
            if "classes" in outputs:
                # One list per row, best first.
                summary = "; ".join(
                    f"{row[0]['label']} {row[0]['score']:.2f}" for row in outputs["classes"]
                )
            else:
                summary = ", ".join(
                    f"{d['label']} {d['score']:.2f} at [{', '.join(f'{v:.0f}' for v in d['box'])}]"
                    for d in outputs.get("detections", [])
                ) or "nothing found"
            if result.get("error"):
                summary = result["error"]["code"]
            print(f"{path}: {summary}  ({elapsed_ms:.1f} ms round trip)", file=sys.stderr)
        print(json.dumps(result), flush=True)
    client.connection.close()


if __name__ == "__main__":
    main()
