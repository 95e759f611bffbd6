"""Run deploy/k8s/ on Podman: the kinds `podman kube play` lacks, rewritten into the ones it has.

Podman 4.3 plays Pods, Deployments, PersistentVolumeClaims and ConfigMaps, but neither StatefulSets,
Jobs nor Services. This writes, from the manifests as they are:
- `server`: the ConfigMap, the StatefulSet's claim template as the PVC `checkpoints-ps-0`, and its pod
  template as the Pod `ps-0` (the name a StatefulSet gives its first pod);
- `workers SERVER_IP`: the ConfigMap and the Job's pod template as Pods `worker-0..N-1`, each with the
  JOB_COMPLETION_INDEX Kubernetes sets in an Indexed Job's pods, and `ps-0.ps` (the headless Service's
  DNS name) mapped to the server pod's address.
Containers, commands, environment, probes, resources and volumes are the manifests' own.

Usage::

    python deploy/k8s_podman.py server /tmp/ps.yaml --set STEPS=100000
    python deploy/k8s_podman.py workers 10.89.0.2 /tmp/workers.yaml --set STEPS=100000
"""
from __future__ import annotations

import argparse
import copy
import os

import yaml

K8S = os.path.join(os.path.dirname(os.path.abspath(__file__)), "k8s")


def _load(name: str) -> list[dict]:
    with open(os.path.join(K8S, name)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def _configmap(overrides: dict[str, str]) -> dict:
    (cm,) = _load("configmap.yaml")
    unknown = set(overrides) - set(cm["data"])
    if unknown:
        raise SystemExit(f"--set: {', '.join(sorted(unknown))} not in deploy/k8s/configmap.yaml")
    cm["data"].update(overrides)
    return cm


def server_docs(overrides: dict[str, str]) -> list[dict]:
    (sts,) = [d for d in _load("ps.yaml") if d["kind"] == "StatefulSet"]
    name = f"{sts['metadata']['name']}-0"
    docs = [_configmap(overrides)]
    pod_spec = copy.deepcopy(sts["spec"]["template"]["spec"])
    pod_spec["hostname"] = name
    pod_spec.setdefault("volumes", [])
    for tmpl in sts["spec"].get("volumeClaimTemplates", []):
        claim = f"{tmpl['metadata']['name']}-{name}"
        docs.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                     "metadata": {"name": claim, "labels": tmpl["metadata"].get("labels", {})},
                     "spec": tmpl["spec"]})
        pod_spec["volumes"].append({"name": tmpl["metadata"]["name"], "persistentVolumeClaim": {"claimName": claim}})
    pod_spec["restartPolicy"] = "Always"   # a StatefulSet's pods always restart
    docs.append({"apiVersion": "v1", "kind": "Pod",
                 "metadata": {"name": name, **copy.deepcopy(sts["spec"]["template"]["metadata"])},
                 "spec": pod_spec})
    return docs


def worker_docs(server_ip: str, overrides: dict[str, str]) -> list[dict]:
    (job,) = _load("workers.yaml")
    docs = [_configmap(overrides)]
    for index in range(job["spec"]["completions"]):
        spec = copy.deepcopy(job["spec"]["template"]["spec"])
        spec["hostAliases"] = [{"ip": server_ip, "hostnames": ["ps-0.ps"]}]
        for c in spec["containers"]:
            c.setdefault("env", []).append({"name": "JOB_COMPLETION_INDEX", "value": str(index)})
        docs.append({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": f"{job['metadata']['name']}-{index}",
                                  **copy.deepcopy(job["spec"]["template"]["metadata"])},
                     "spec": spec})
    return docs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["server", "workers"])
    p.add_argument("args", nargs="+", help="server: OUT; workers: SERVER_IP OUT")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a ConfigMap value")
    a = p.parse_args()
    overrides = dict(kv.split("=", 1) for kv in a.set)
    if a.what == "server":
        (out,) = a.args
        docs = server_docs(overrides)
    else:
        server_ip, out = a.args
        docs = worker_docs(server_ip, overrides)
    with open(out, "w") as f:
        yaml.safe_dump_all(docs, f, sort_keys=False)


if __name__ == "__main__":
    main()
