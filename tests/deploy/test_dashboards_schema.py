"""Grafana dashboards type-checked against @grafana/schema's Dashboard type with tsc.

Each JSON file is pasted as an object literal typed `Dashboard`: unlike importing it with
resolveJsonModule (which widens "timeseries" to string and cannot check literal unions such as a
variable's `type`), a contextually typed literal is checked field by field, including unknown
(excess) properties."""

import json
import os
import shutil

from conftest import NODE_MODULES, ROOT, run

DASHBOARDS = sorted((ROOT / "monitoring/dashboards").glob("*.json"))


def compile_dashboards(sources):
    work = NODE_MODULES.parent / f"check-{os.getpid()}"  # inside .tools/node so node_modules resolves
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    files = []
    for name, text in sources.items():
        ts = work / f"{name}.ts"
        ts.write_text(f'import type {{ Dashboard }} from "@grafana/schema";\nexport const dashboard: Dashboard = {text};\n')
        files.append(ts.name)
    (work / "tsconfig.json").write_text(json.dumps({
        "compilerOptions": {"strict": True, "noEmit": True, "module": "nodenext", "moduleResolution": "nodenext",
                            "target": "es2022", "skipLibCheck": True, "types": []},
        "files": files,
    }))
    try:
        return run([str(NODE_MODULES / ".bin/tsc"), "-p", str(work / "tsconfig.json")])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_dashboards_typecheck_as_grafana_dashboards():
    assert len(DASHBOARDS) >= 2
    proc = compile_dashboards({p.stem.replace("-", "_"): p.read_text() for p in DASHBOARDS})
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_tsc_rejects_a_broken_dashboard():
    d = json.loads(DASHBOARDS[0].read_text())
    d["panels"][0]["gridPos"]["height"] = 8
    d["schemaVersion"] = "39"
    proc = compile_dashboards({"broken": json.dumps(d)})
    assert proc.returncode != 0
    assert "'\"height\"' does not exist in type 'GridPos'" in proc.stdout
    assert "Type 'string' is not assignable to type 'number'" in proc.stdout


def test_dashboards_are_well_formed():
    uids = set()
    for path in DASHBOARDS:
        d = json.loads(path.read_text())
        assert d["uid"] not in uids
        uids.add(d["uid"])
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), path.name
        for p in d["panels"]:
            assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
            assert p["datasource"]["uid"] == "${datasource}"
