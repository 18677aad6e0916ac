// Validates custom resources against their CRDs' published schemas (the models of
// kubernetes-models, generated from the KEDA and Prometheus operator CRDs). Reads a JSON array
// of rendered manifests on stdin; prints one line per problem; exits 1 if there is any.
// Built-in kinds are checked in Python (kubernetes-validate); a custom kind not listed here is
// a problem, so a new CRD cannot slip through unchecked.
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

const MODELS = {
  "keda.sh/v1alpha1/ScaledObject": ScaledObject,
  "monitoring.coreos.com/v1/PodMonitor": PodMonitor,
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
};

let input = "";
for await (const chunk of process.stdin) input += chunk;
const problems = [];
for (const doc of JSON.parse(input)) {
  const key = `${doc.apiVersion}/${doc.kind}`;
  const Model = MODELS[key];
  if (!Model) {
    problems.push(`${key} ${doc.metadata?.name}: no schema for this custom resource`);
    continue;
  }
  try {
    new Model(doc).validate();
  } catch (err) {
    problems.push(`${key} ${doc.metadata?.name}: ${err.message}`);
  }
}
for (const p of problems) console.log(p);
process.exit(problems.length ? 1 : 0);
