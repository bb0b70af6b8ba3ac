#!/usr/bin/env python3
"""Builds monitoring/k8s/prometheusrule.yaml from monitoring/rules/ember.rules.yaml (the one source).

--write regenerates the file; without it, exits 1 if the committed file differs (tests/deploy runs
the same comparison).
"""

import pathlib
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
RULES = ROOT / "monitoring/rules/ember.rules.yaml"
OUT = ROOT / "monitoring/k8s/prometheusrule.yaml"
HEADER = (
    "# Generated from monitoring/rules/ember.rules.yaml by tests/deploy/gen_prometheusrule.py --write;\n"
    "# tests/deploy fails if it drifts. Edit the rules file, not this one.\n"
)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the longer expressions) as literal blocks, as in the rules file."""


_Dumper.add_representer(
    str,
    lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None),
)


def render() -> str:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "ember",
            "namespace": "ember",
            "labels": {"app.kubernetes.io/part-of": "ember"},
        },
        "spec": {"groups": groups},
    }
    return HEADER + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=100)


if __name__ == "__main__":
    text = render()
    if "--write" in sys.argv:
        OUT.write_text(text)
    elif OUT.read_text() != text:
        sys.exit(f"{OUT} is out of date: run {sys.argv[0]} --write")
