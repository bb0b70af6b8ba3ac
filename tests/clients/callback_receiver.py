#!/usr/bin/env python3
"""A callback receiver for the demo: listens on 127.0.0.1:PORT, verifies each POST with the
Standard Webhooks library, prints what it got, and exits after --count callbacks (or --timeout).
"""

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from standardwebhooks import Webhook


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=60)
    args = parser.parse_args()
    webhook = Webhook(args.secret)
    received = []
    done = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
            try:
                result = webhook.verify(body, dict(self.headers.items()))
            except Exception as error:  # a bad signature is the sender's bug: say so
                print(f"callback: signature check FAILED: {error}", file=sys.stderr)
                self.send_response(400)
                self.end_headers()
                return
            found = (result.get("outputs") or {}).get("detections") or []
            summary = ", ".join(f"{d['label']} {d['score']:.2f}" for d in found) or "nothing found"
            print(f"callback: job {result['job_id']} ({result['status']}): {summary} "
                  f"[signature verified, webhook-id {self.headers['webhook-id']}]", file=sys.stderr)
            self.send_response(204)
            self.end_headers()
            received.append(result)
            if len(received) >= args.count:
                done.set()

        def log_message(self, *_):
            pass

    server = HTTPServer(("127.0.0.1", args.port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    ok = done.wait(args.timeout)
    server.shutdown()
    print(json.dumps(received))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
