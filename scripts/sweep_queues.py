#!/usr/bin/env python3
"""Deletes the per-test model queues earlier test runs left on the local broker (a test that
is killed cannot clean up after itself, and RabbitMQ slows down under hundreds of idle quorum
queues). Only names the tests make: ember.{jobs,retry,dead,deadnotice}.{test,http,bench,chaos,deploy,drain,kmock}-<model>-<id>,
and the version queues of those models (ember.jobs.<that model>@<version>)."""

import re
import subprocess
import sys

import pika

TEST_QUEUE = re.compile(r"^ember\.(jobs|retry|dead|deadnotice)\.(test|http|bench|chaos|deploy|drain|kmock)-[A-Za-z0-9_-]+(@[A-Za-z0-9._-]+)?$")

listed = subprocess.run(["rabbitmqctl", "list_queues", "name", "-q", "--no-table-headers"],
                        capture_output=True, text=True, timeout=120)
if listed.returncode != 0:
    sys.exit(f"rabbitmqctl list_queues failed: {listed.stderr.strip()}")
names = [n.strip() for n in listed.stdout.splitlines() if TEST_QUEUE.match(n.strip())]
# Queues as declared before they had a bound (issue 18): ember.results.store, the callbacks' and
# the dead-letter queues are now declared with x-max-length (and the store with x-message-ttl),
# which RabbitMQ refuses for a queue declared without them.
# Only results of earlier test runs are in it on a test machine (docs/security.md says what to do
# on a real broker).
arguments = subprocess.run(["rabbitmqctl", "list_queues", "name", "arguments", "-q", "--no-table-headers"],
                           capture_output=True, text=True, timeout=120)
BOUNDED_SINCE_ISSUE_18 = re.compile(r"^ember\.(results\.store|callbacks|callbacks\.dead|dead\..+|deadnotice\..+)$")
for line in arguments.stdout.splitlines():
    name, _, args = line.strip().partition("\t")
    if BOUNDED_SINCE_ISSUE_18.match(name) and "x-max-length" not in args and name not in names:
        names.append(name)
# The binding of ember.results.store to ember.results (`#`) that dispatchers made before results
# were stored only when asked: on a test machine nothing older is running, so it goes
# (docs/deploy.md says when to remove it on a real broker).
bindings = subprocess.run(["rabbitmqctl", "list_bindings", "source_name", "destination_name", "routing_key",
                           "-q", "--no-table-headers"], capture_output=True, text=True, timeout=120)
legacy = any(line.split("\t") == ["ember.results", "ember.results.store", "#"] for line in bindings.stdout.splitlines())
if names or legacy:
    connection = pika.BlockingConnection(pika.ConnectionParameters(
        "127.0.0.1", 5672, connection_attempts=5, retry_delay=3, stack_timeout=60))
    channel = connection.channel()
    for name in names:
        channel.queue_delete(name)
    if legacy:
        channel.queue_unbind("ember.results.store", "ember.results", "#")
    connection.close()
print(f"swept {len(names)} queues left by earlier test runs" + (", and the store's old binding to ember.results" if legacy else ""))
