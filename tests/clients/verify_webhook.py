#!/usr/bin/env python3
"""Verifies recorded callbacks with the Standard Webhooks reference library.

Reads a JSON file: {"secret": "whsec_...", "deliveries": [{"headers": {...}, "body": "..."}]}
and verifies each; prints the verified payloads' job ids, one per line. Exits 1 on the first
failure.
"""

import json
import sys

from standardwebhooks import Webhook


def main():
    with open(sys.argv[1]) as f:
        recorded = json.load(f)
    webhook = Webhook(recorded["secret"])
    for delivery in recorded["deliveries"]:
        payload = webhook.verify(delivery["body"], delivery["headers"])
        print(payload["job_id"])
    # A tampered body must fail.
    first = recorded["deliveries"][0]
    try:
        webhook.verify(first["body"] + " ", first["headers"])
    except Exception:
        pass
    else:
        print("a tampered body verified", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
