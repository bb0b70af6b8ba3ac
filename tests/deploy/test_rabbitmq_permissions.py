"""RabbitMQ least privilege (manifests/base/rabbitmq/): the definitions template renders (by the
same script the broker's init container and compose run), each part's user is allowed exactly
the AMQP calls that part makes, and refused the others, on a real broker.

The live test imports the definitions into vhosts of its own on the local broker (scripts/setup
starts it; `rabbitmqctl` reaches it), with its own user names, and replays each part's calls
with pika, in the order and with the arguments of core/src/topology.rs, dispatcher/src/broker.rs
(declare_results_store, take_results) and callbacks.rs, worker/src/service and
autoscaler/src/control.rs. A part that starts making a new call needs it added here and in the
template."""

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid

import pytest

from conftest import ROOT, find, render, run

DEFINITIONS = ROOT / "manifests/base/rabbitmq"
TEMPLATE = DEFINITIONS / "definitions.template.jsonc"
RENDER = DEFINITIONS / "render-definitions.sh"
PARTS = ("dispatcher", "worker", "autoscaler")
USERS = ("admin",) + PARTS
MODEL = "permcheck-model"


def template() -> dict:
    text = "\n".join(line for line in TEMPLATE.read_text().splitlines() if not line.lstrip().startswith("//"))
    return json.loads(text)


def permissions() -> dict:
    return {p["user"]: p for p in template()["permissions"]}


def render_with(tmp_path, passwords: dict):
    for user, password in passwords.items():
        (tmp_path / f"amqp-{user}-password").write_text(password)
    out = tmp_path / "definitions.json"
    proc = run(["sh", str(RENDER), str(TEMPLATE), str(tmp_path), str(out)])
    return proc, out


# --- the template and the script ----------------------------------------------------------------


def test_the_template_names_one_user_per_part_and_no_tags_for_them():
    defs = template()
    users = {u["name"]: u for u in defs["users"]}
    assert set(users) == {f"ember-{u}" for u in USERS}
    assert defs["vhosts"] == [{"name": "/"}]
    for part in PARTS:
        assert users[f"ember-{part}"]["tags"] == "", f"ember-{part} must not reach the management API"
        assert users[f"ember-{part}"]["password"] == f"@{part}_password@"
    perms = permissions()
    assert set(perms) == set(users)
    assert all(p["vhost"] == "/" for p in perms.values())
    for part in PARTS:
        for kind in ("configure", "write", "read"):
            regex = perms[f"ember-{part}"][kind]
            assert regex.startswith("^(") and regex.endswith(")$"), f"{part} {kind}: anchor the whole name"


# (user, permission, resource name, allowed): the calls each part makes, and what it must not do.
# Exchanges and queues share the names the regexes see.
EXPECTED = [
    # Everyone declares the shared topology (declare_shared) and the model queues (declare_model).
    *[(p, "configure", n, True) for p in PARTS for n in (
        "ember.jobs", "ember.dlx", "ember.results", "ember.results.stored", "ember.cancel", "ember.telemetry", "ember.callbacks",
        f"ember.jobs.{MODEL}", f"ember.retry.{MODEL}", f"ember.dead.{MODEL}", f"ember.deadnotice.{MODEL}", "amq.gen-AbC_12")],
    *[(p, "configure", n, False) for p in PARTS for n in ("other", "ember.jobs.a.b", "ember.jobs.", "amq.default", "ember.jobs.x$y")],
    ("dispatcher", "configure", "ember.results.store", True), ("dispatcher", "configure", "ember.callbacks.dead", True),
    ("dispatcher", "configure", "ember.results.expired", True), ("worker", "configure", "ember.results.expired", False),
    ("worker", "configure", "ember.results.store", False), ("autoscaler", "configure", "ember.callbacks.dead", False),
    # Publishing: jobs and cancellations by the dispatcher only; results and heartbeats by the
    # worker only; the default exchange by the dispatcher (dead callbacks) and the worker (replies,
    # callbacks, retry lane), not the autoscaler, which publishes nothing.
    ("dispatcher", "write", "ember.jobs", True), ("worker", "write", "ember.jobs", False), ("autoscaler", "write", "ember.jobs", False),
    ("dispatcher", "write", "ember.cancel", True), ("worker", "write", "ember.cancel", False), ("autoscaler", "write", "ember.cancel", False),
    ("worker", "write", "ember.results", True), ("dispatcher", "write", "ember.results", False), ("autoscaler", "write", "ember.results", False),
    ("worker", "write", "ember.results.stored", True), ("dispatcher", "write", "ember.results.stored", False), ("autoscaler", "write", "ember.results.stored", False),
    ("worker", "write", "ember.telemetry", True), ("dispatcher", "write", "ember.telemetry", False), ("autoscaler", "write", "ember.telemetry", False),
    ("dispatcher", "write", "amq.default", True), ("worker", "write", "amq.default", True), ("autoscaler", "write", "amq.default", False),
    *[(p, "write", n, True) for p in PARTS for n in ("ember.dlx", f"ember.jobs.{MODEL}", f"ember.dead.{MODEL}", f"ember.deadnotice.{MODEL}", "amq.gen-x")],
    ("dispatcher", "write", "ember.results.store", True), ("worker", "write", "ember.results.store", False),
    # Consuming: each part its own queues.
    ("dispatcher", "read", "ember.results.store", True), ("dispatcher", "read", "ember.callbacks", True), ("dispatcher", "read", "amq.rabbitmq.reply-to", True),
    ("dispatcher", "read", "ember.results.expired", True), ("worker", "read", "ember.results.expired", False), ("autoscaler", "read", "ember.results.expired", False),
    ("worker", "read", "ember.results.store", False), ("worker", "read", "ember.callbacks", False), ("autoscaler", "read", "ember.callbacks", False),
    ("worker", "read", f"ember.deadnotice.{MODEL}", True), ("dispatcher", "read", f"ember.deadnotice.{MODEL}", False), ("autoscaler", "read", f"ember.deadnotice.{MODEL}", False),
    *[(p, "read", f"ember.dead.{MODEL}", False) for p in PARTS],
    *[(p, "read", "ember.callbacks.dead", False) for p in PARTS],
    ("worker", "read", "ember.cancel", True), ("dispatcher", "read", "ember.cancel", False), ("autoscaler", "read", "ember.cancel", False),
    ("dispatcher", "read", "ember.telemetry", True), ("autoscaler", "read", "ember.telemetry", True), ("worker", "read", "ember.telemetry", False),
    ("dispatcher", "read", "ember.results", True), ("worker", "read", "ember.results", False), ("autoscaler", "read", "ember.results", False),
    ("dispatcher", "read", "ember.results.stored", True), ("worker", "read", "ember.results.stored", False), ("autoscaler", "read", "ember.results.stored", False),
]


@pytest.mark.parametrize("user,kind,resource,allowed", EXPECTED, ids=lambda v: str(v))
def test_each_parts_regexes_allow_what_it_does_and_refuse_the_rest(user, kind, resource, allowed):
    regex = permissions()[f"ember-{user}"][kind]
    assert (re.search(regex, resource) is not None) == allowed


def test_the_render_script_fills_every_password(tmp_path):
    passwords = {u: f"{u}-pw-{uuid.uuid4().hex}" for u in USERS}
    proc, out = render_with(tmp_path, passwords)
    assert proc.returncode == 0, proc.stderr
    defs = json.loads(out.read_text())
    assert {u["name"]: u["password"] for u in defs["users"]} == {f"ember-{u}": p for u, p in passwords.items()}
    assert {p["user"]: p for p in defs["permissions"]} == permissions()
    assert oct(out.stat().st_mode & 0o777) == "0o600", "the rendered file holds passwords"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("amqp-")) == ["definitions.json"]


@pytest.mark.parametrize("password,why", [
    ("has spaces in it 12345", "may hold only"),
    ("quote\"breaks-json-1234", "may hold only"),
    ("pipe|breaks-sed-123456", "may hold only"),
    ("short-1", "fewer than 16"),
    (None, "amqp-worker-password"),
])
def test_the_render_script_refuses_an_unusable_password(tmp_path, password, why):
    passwords = {u: f"{u}-pw-0123456789abcdef" for u in USERS}
    if password is None:
        del passwords["worker"]
    else:
        passwords["worker"] = password
    proc, out = render_with(tmp_path, passwords)
    assert proc.returncode != 0 and why in proc.stderr and not out.exists()


def test_the_broker_loads_the_rendered_definitions():
    """The StatefulSet renders into the file rabbitmq.conf loads, from the ConfigMap of the
    template; compose mounts the same directory and loads the same way."""
    objs = render("base")
    (sts,) = find(objs, "StatefulSet", "ember-rabbitmq")
    spec = sts["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    out = init["command"][-1]
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "ember-rabbitmq-config"]
    assert f"load_definitions = {out}" in cm["data"]["rabbitmq.conf"]
    (defs,) = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("ember-rabbitmq-definitions")]
    assert defs["data"]["definitions.template.jsonc"] == TEMPLATE.read_text()
    assert defs["data"]["render-definitions.sh"] == RENDER.read_text()
    compose = (ROOT / "docker/rabbitmq/rabbitmq.conf").read_text()
    assert re.search(r"^load_definitions = /tmp/ember-definitions\.json$", compose, re.M)


# --- against a real broker ----------------------------------------------------------------------


def rabbitmqctl(*args):
    ctl = shutil.which("rabbitmqctl")
    if not ctl:
        pytest.fail("rabbitmqctl is not installed (scripts/setup needs RabbitMQ)")
    proc = subprocess.run([ctl, "-q", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"rabbitmqctl {' '.join(args)}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def jobs_arguments(**extra):
    return {"x-queue-type": "quorum", "x-delivery-limit": 5, "x-dead-letter-exchange": "ember.dlx",
            "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish", "x-max-length": 10000, **extra}


def bounded(overflow):
    return {"x-queue-type": "quorum", "x-overflow": overflow, "x-max-length": 100000}


def declare_shared(ch):
    for name, kind in (("ember.jobs", "direct"), ("ember.dlx", "direct"), ("ember.results", "topic"), ("ember.results.stored", "topic"),
                       ("ember.cancel", "topic")):
        ch.exchange_declare(name, kind, durable=True)
    ch.exchange_declare("ember.telemetry", "topic", durable=False)
    ch.queue_declare("ember.callbacks", durable=True, arguments=bounded("reject-publish"))


def declare_model(ch, model):
    declare_shared(ch)
    ch.queue_declare(f"ember.jobs.{model}", durable=True, arguments=jobs_arguments())
    ch.queue_bind(f"ember.jobs.{model}", "ember.jobs", model)
    ch.queue_declare(f"ember.retry.{model}", durable=True, arguments=jobs_arguments(**{"x-dead-letter-routing-key": model}))
    for queue in (f"ember.dead.{model}", f"ember.deadnotice.{model}"):
        ch.queue_declare(queue, durable=True, arguments=bounded("drop-head"))
        ch.queue_bind(queue, "ember.dlx", model)


def exclusive_consumer(ch, exchange, routing_key):
    queue = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
    assert queue.startswith("amq.gen-")
    ch.basic_consume(queue, lambda *a: None, auto_ack=True)
    ch.queue_bind(queue, exchange, routing_key)


def publish(ch, exchange, key, **props):
    import pika

    ch.basic_publish(exchange, key, b"{}", pika.BasicProperties(**props))


def dispatcher_calls(conn):
    ch = conn.channel()
    ch.confirm_delivery()
    declare_model(ch, MODEL)
    results = {**bounded("drop-head"), "x-message-ttl": 3600000}
    ch.queue_declare("ember.results.expired", durable=True, arguments=results)
    ch.queue_declare("ember.results.store", durable=True, arguments={
        **results, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "ember.results.expired"})
    ch.queue_bind("ember.results.store", "ember.results.stored", "#")
    ch.queue_unbind("ember.results.store", "ember.results", "#")
    ch.basic_consume("amq.rabbitmq.reply-to", lambda *a: None, auto_ack=True)
    publish(ch, "ember.jobs", MODEL, reply_to="amq.rabbitmq.reply-to", correlation_id="j1", message_id="j1", delivery_mode=2)
    publish(ch, "ember.cancel", MODEL, expiration="3600000")
    exclusive_consumer(conn.channel(), "ember.telemetry", "#")
    callbacks = conn.channel()
    callbacks.confirm_delivery()
    callbacks.queue_declare("ember.callbacks.dead", durable=True, arguments=bounded("drop-head"))
    callbacks.basic_qos(prefetch_count=64)
    callbacks.basic_consume("ember.callbacks", lambda *a: None)
    publish(callbacks, "", "ember.callbacks.dead")
    for queue in ("ember.results.store", "ember.results.expired"):
        store = conn.channel()
        store.basic_qos(prefetch_count=64)
        store.basic_consume(queue, lambda *a: None)


def worker_calls(conn):
    ch = conn.channel()
    ch.confirm_delivery()
    declare_model(ch, MODEL)
    exclusive_consumer(conn.channel(), "ember.cancel", MODEL)
    for queue in (f"ember.jobs.{MODEL}", f"ember.retry.{MODEL}", f"ember.deadnotice.{MODEL}"):
        consumer = conn.channel()
        consumer.basic_qos(prefetch_count=1)
        consumer.basic_consume(queue, lambda *a: None)
    publish(ch, "ember.results", f"{MODEL}.ok", message_id="j1", delivery_mode=2)
    publish(ch, "ember.results.stored", f"{MODEL}.ok", message_id="j2", delivery_mode=2)
    publish(ch, "", "ember.callbacks", message_id="j1")
    publish(ch, "", f"ember.retry.{MODEL}", message_id="j1")
    publish(ch, "ember.telemetry", f"{MODEL}.w1", expiration="10000")


def autoscaler_calls(conn):
    ch = conn.channel()
    declare_shared(ch)
    exclusive_consumer(ch, "ember.telemetry", "#")
    declare_model(ch, MODEL)
    ready = ch.queue_declare(f"ember.jobs.{MODEL}", passive=True).method.message_count
    assert ready >= 0


CALLS = {"dispatcher": dispatcher_calls, "worker": worker_calls, "autoscaler": autoscaler_calls}

# What each part must be refused (403 ACCESS_REFUSED, checked before the queue or exchange is
# looked up): what, and the call, each on a fresh confirming channel.
REFUSED = {
    "dispatcher": {
        "forge a result": lambda ch: publish(ch, "ember.results", f"{MODEL}.ok"),
        "forge a stored result": lambda ch: publish(ch, "ember.results.stored", f"{MODEL}.ok"),
        "fake a heartbeat": lambda ch: publish(ch, "ember.telemetry", f"{MODEL}.w1"),
        "read the dead letters": lambda ch: ch.basic_consume(f"ember.dead.{MODEL}", lambda *a: None),
        "read the dead-letter notices": lambda ch: ch.basic_consume(f"ember.deadnotice.{MODEL}", lambda *a: None),
        "declare a queue of its own": lambda ch: ch.queue_declare("elsewhere", durable=True),
    },
    "worker": {
        "submit a job": lambda ch: publish(ch, "ember.jobs", MODEL),
        "cancel a job": lambda ch: publish(ch, "ember.cancel", MODEL),
        "read the result store": lambda ch: ch.basic_consume("ember.results.store", lambda *a: None),
        "read the callbacks (their URLs)": lambda ch: ch.basic_consume("ember.callbacks", lambda *a: None),
        "read the dead letters": lambda ch: ch.basic_consume(f"ember.dead.{MODEL}", lambda *a: None),
        "delete the result store": lambda ch: ch.queue_delete("ember.results.store"),
        "read stored results": lambda ch: exclusive_consumer(ch, "ember.results.stored", "#"),
    },
    "autoscaler": {
        "submit a job": lambda ch: publish(ch, "ember.jobs", MODEL),
        "publish by queue name": lambda ch: publish(ch, "", f"ember.jobs.{MODEL}"),
        "publish a result": lambda ch: publish(ch, "ember.results", f"{MODEL}.ok"),
        "publish a stored result": lambda ch: publish(ch, "ember.results.stored", f"{MODEL}.ok"),
        "fake a heartbeat": lambda ch: publish(ch, "ember.telemetry", f"{MODEL}.w1"),
        "read the callbacks": lambda ch: ch.basic_consume("ember.callbacks", lambda *a: None),
        "read the dead-letter notices": lambda ch: ch.basic_consume(f"ember.deadnotice.{MODEL}", lambda *a: None),
    },
}


@contextlib.contextmanager
def imported(change=lambda perms: None):
    """The template's users (renamed) and permissions (after `change`), imported as definitions
    into three new vhosts, one per part: each part then starts from nothing, as the first part up
    in a fresh broker does (RabbitMQ checks a queue's dead-letter permissions only when it
    creates it). Yields ({part: vhost}, {user: (name, password)}); removed afterwards."""
    suffix = uuid.uuid4().hex[:8]
    vhosts = {part: f"ember-permcheck-{part}-{suffix}" for part in PARTS}
    names = {f"ember-{u}": f"ember-{u}-{suffix}" for u in USERS}
    passwords = {name: uuid.uuid4().hex for name in names.values()}
    defs = template()
    change({p["user"]: p for p in defs["permissions"]})
    defs["vhosts"] = [{"name": v} for v in vhosts.values()]
    for user in defs["users"]:
        user["name"] = names[user["name"]]
        user["password"] = passwords[user["name"]]
    defs["permissions"] = [
        {**perm, "user": names[perm["user"]], "vhost": vhost} for perm in defs["permissions"] for vhost in vhosts.values()
    ]
    try:
        # Readable by the broker's user, which rabbitmqctl may run as (Debian's wrapper); the
        # passwords are this run's throwaway ones, and the file is gone once imported.
        with tempfile.NamedTemporaryFile("w", suffix=".json") as path:
            path.write(json.dumps(defs))
            path.flush()
            os.chmod(path.name, 0o644)
            rabbitmqctl("import_definitions", path.name)
        yield vhosts, {u: (names[f"ember-{u}"], passwords[names[f"ember-{u}"]]) for u in USERS}
    finally:
        remove("delete_user", names.values(), "list_users")
        remove("delete_vhost", vhosts.values(), "list_vhosts")


def remove(command, names, listing, attempts=5):
    """Deletes users or vhosts, retrying while the broker is busy (other tests share it)."""
    left = set(names)
    for _ in range(attempts):
        for name in sorted(left):
            subprocess.run(["rabbitmqctl", "-q", command, name], capture_output=True, timeout=120)
        listed = subprocess.run(["rabbitmqctl", "-q", listing], capture_output=True, text=True, timeout=120)
        if listed.returncode == 0:
            left &= set(listed.stdout.split())
            if not left:
                return
        time.sleep(2)


@pytest.fixture(scope="module")
def broker():
    with imported() as found:
        yield found


def connect(vhost, user, password):
    import pika

    params = pika.ConnectionParameters("127.0.0.1", 5672, vhost, pika.PlainCredentials(user, password), connection_attempts=3)
    return pika.BlockingConnection(params)


@pytest.mark.parametrize("part", PARTS)
def test_each_part_makes_its_calls_and_is_refused_the_rest(broker, part):
    import pika

    vhosts, users = broker
    conn = connect(vhosts[part], *users[part])
    try:
        CALLS[part](conn)
    finally:
        if conn.is_open:
            conn.close()
    wrong = []
    conn = connect(vhosts[part], *users[part])
    try:
        for what, call in REFUSED[part].items():
            ch = conn.channel()
            ch.confirm_delivery()
            try:
                call(ch)
                wrong.append(f"{part} may {what}")
            except pika.exceptions.ChannelClosedByBroker as closed:
                if closed.reply_code != 403:
                    wrong.append(f"{part}: {what}: closed with {closed.reply_code} {closed.reply_text}, not refused")
    finally:
        if conn.is_open:
            conn.close()
    assert wrong == []


def test_only_the_operator_may_use_the_management_api(broker):
    _, users = broker
    tags = dict(line.split("\t", 1) for line in rabbitmqctl("list_users").splitlines() if "\t" in line)
    assert tags[users["admin"][0]] == "[administrator]"
    for part in PARTS:
        assert tags[users[part][0]] == "[]", part


@pytest.mark.parametrize("part,kind,drop,denied", [
    ("autoscaler", "write", "ember\\.dlx|", "exchange 'ember.dlx'"),
    ("worker", "read", "|cancel", "exchange 'ember.cancel'"),
    ("dispatcher", "write", "|amq\\.default", "exchange 'amq.default'"),
])
def test_the_live_check_fails_a_missing_permission(part, kind, drop, denied):
    """Negative control: without one alternative of its regex, the part's own calls are refused."""
    import pika

    def change(perms):
        regex = perms[f"ember-{part}"][kind]
        assert drop in regex
        perms[f"ember-{part}"][kind] = regex.replace(drop, "")

    with imported(change) as (vhosts, users):
        conn = connect(vhosts[part], *users[part])
        try:
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as closed:
                CALLS[part](conn)
        finally:
            if conn.is_open:
                conn.close()
    assert closed.value.reply_code == 403 and denied in closed.value.reply_text

