// Validates Prometheus Operator objects (ServiceMonitor, PodMonitor, PrometheusRule) against the
// JSON schemas generated from the operator's CRDs (npm @kubernetes-models/prometheus-operator).
// Usage: node validate_monitoring.mjs <node_modules dir> <objects.json>; prints one line per
// object, exits 1 if any fails.
import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";

const [modules, file] = process.argv.slice(2);
const objects = JSON.parse(fs.readFileSync(file, "utf8"));
const base = path.join(modules, "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1");
let failed = 0;
for (const obj of objects) {
  if (obj.apiVersion !== "monitoring.coreos.com/v1") {
    console.log(`FAIL ${obj.kind}/${obj.metadata.name}: unexpected apiVersion ${obj.apiVersion}`);
    failed++;
    continue;
  }
  const mod = await import(pathToFileURL(path.join(base, `${obj.kind}.js`)).href);
  try {
    new mod[obj.kind](obj).validate();
    console.log(`ok ${obj.kind}/${obj.metadata.name}`);
  } catch (e) {
    console.log(`FAIL ${obj.kind}/${obj.metadata.name}: ${e.message}`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
