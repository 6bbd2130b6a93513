#!/usr/bin/env bash
# TestLooper on a real cluster, for your own CI: builds both images, starts a kind cluster,
# loads them, installs the chart with Helm, serves a small project from a git server in the
# cluster, applies a Repo for it, and waits for its TestRun to pass.
#
# IT CANNOT RUN WHERE THIS PROJECT IS DEVELOPED: there is no Docker daemon, kind or helm there.
# So it is not part of .ci/run nor of pytest (tests/test_e2e_script.py only checks it with
# `bash -n` and reads what it applies). It has not been run yet: expect to fix it on its first run.
#
# Needs: docker (with BuildKit), kind, kubectl, helm (3.8 or newer), and access to Docker Hub
# for busybox, redis and python base images.
#
#   bash tests/e2e/kind.sh                # exit 0 when a TestRun of the project passed
#   KEEP_CLUSTER=1 bash tests/e2e/kind.sh # leave the cluster up to look around
#   KIND_CLUSTER=name TIMEOUT=900 ...     # cluster name (default testlooper-e2e), seconds to wait
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER=${KIND_CLUSTER:-testlooper-e2e}
TIMEOUT=${TIMEOUT:-600}
TAG=e2e
OPERATOR_IMAGE=testlooper/operator:$TAG
WORKER_IMAGE=testlooper/worker:$TAG
TEST_IMAGE=busybox:1.36
REDIS_IMAGE=redis:7.4-alpine   # the chart's redis.image default
RELEASE=testlooper
SYSTEM_NS=testlooper
CI_NS=ci

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null 2>&1 || { echo "kind.sh: $tool is not installed" >&2; exit 2; }
done

say() { printf '\n== %s\n' "$*"; }

cleanup() {
  status=$?
  if [ "$status" -ne 0 ]; then
    say "failed: what the cluster shows"
    kubectl get -A repos,workerpools,testruns,pods 2>&1 || true
    kubectl describe -n "$CI_NS" testruns 2>&1 | tail -n 80 || true
    kubectl logs -n "$SYSTEM_NS" "deployment/$RELEASE" --tail=200 2>&1 || true
  fi
  if [ "${KEEP_CLUSTER:-0}" != 1 ]; then
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  fi
  exit "$status"
}

say "building $OPERATOR_IMAGE and $WORKER_IMAGE"
DOCKER_BUILDKIT=1 docker build -t "$OPERATOR_IMAGE" .
DOCKER_BUILDKIT=1 docker build -f worker_image/Dockerfile -t "$WORKER_IMAGE" .
docker pull --quiet "$TEST_IMAGE"
docker pull --quiet "$REDIS_IMAGE"

say "starting kind cluster $CLUSTER"
kind create cluster --name "$CLUSTER" --wait 120s
trap cleanup EXIT
kubectl config use-context "kind-$CLUSTER"
for image in "$OPERATOR_IMAGE" "$WORKER_IMAGE" "$TEST_IMAGE" "$REDIS_IMAGE"; do
  kind load docker-image --name "$CLUSTER" "$image"
done

say "installing the chart"
kubectl create namespace "$CI_NS"
helm install "$RELEASE" ./charts/testlooper --namespace "$SYSTEM_NS" --create-namespace --wait --timeout 5m \
  --set image.repository=testlooper/operator --set image.tag=$TAG --set image.pullPolicy=Never \
  --set workerImage.repository=testlooper/worker --set workerImage.tag=$TAG \
  --set "watchNamespaces={$CI_NS}" \
  --set workerPool.spec.defaultImage=$TEST_IMAGE \
  --set persistence.size=1Gi --set redis.storage.size=1Gi
kubectl rollout status -n "$SYSTEM_NS" "deployment/$RELEASE" --timeout=180s

say "a git server in the cluster, serving the project"
# git daemon from the operator image (it has git); the project comes from a ConfigMap.
kubectl apply -n "$CI_NS" -f - <<YAML
apiVersion: v1
kind: ConfigMap
metadata:
  name: e2e-project
data:
  testlooper.yml: |
    looper_version: 5
    environments:
      linux:
        platform: linux
        image: {name: "$TEST_IMAGE"}
    tests:
      hello/linux:
        command: sh src/hello.sh
        dependencies: {src: HEAD}
        runs: 2
  hello.sh: |
    printf '{"greets": true, "counts": true}' > "\$TEST_OUTPUT_DIR/testSummary.json"
    echo hello from the test container
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: git-server
spec:
  replicas: 1
  selector:
    matchLabels: {app: git-server}
  template:
    metadata:
      labels: {app: git-server}
    spec:
      securityContext: {runAsUser: 10001, runAsGroup: 10001, runAsNonRoot: true}
      initContainers:
        - name: project
          image: $OPERATOR_IMAGE
          imagePullPolicy: Never
          command: [/bin/sh, -ec]
          args:
            - |
              export HOME=/tmp GIT_AUTHOR_NAME=e2e GIT_AUTHOR_EMAIL=e2e@example.invalid
              export GIT_COMMITTER_NAME=e2e GIT_COMMITTER_EMAIL=e2e@example.invalid
              git init --quiet --bare /srv/git/demo.git
              git -C /srv/git/demo.git symbolic-ref HEAD refs/heads/main
              git init --quiet /tmp/work
              cp -L /project/testlooper.yml /project/hello.sh /tmp/work/
              git -C /tmp/work add .
              git -C /tmp/work commit --quiet -m "the e2e project"
              git -C /tmp/work push --quiet /srv/git/demo.git HEAD:refs/heads/main
          volumeMounts:
            - {name: repos, mountPath: /srv/git}
            - {name: project, mountPath: /project}
            - {name: tmp, mountPath: /tmp}
      containers:
        - name: git-daemon
          image: $OPERATOR_IMAGE
          imagePullPolicy: Never
          command: [git, daemon, --reuseaddr, --export-all, --base-path=/srv/git, --listen=0.0.0.0, --port=9418, /srv/git]
          ports:
            - {name: git, containerPort: 9418}
          readinessProbe:
            tcpSocket: {port: git}
          volumeMounts:
            - {name: repos, mountPath: /srv/git}
            - {name: tmp, mountPath: /tmp}
      volumes:
        - {name: repos, emptyDir: {}}
        - {name: tmp, emptyDir: {}}
        - name: project
          configMap: {name: e2e-project}
---
apiVersion: v1
kind: Service
metadata:
  name: git-server
spec:
  selector: {app: git-server}
  ports:
    - {name: git, port: 9418, targetPort: git}
YAML
kubectl rollout status -n "$CI_NS" deployment/git-server --timeout=180s

say "the Repo"
kubectl apply -n "$CI_NS" -f - <<YAML
apiVersion: testlooper.dev/v1alpha1
kind: Repo
metadata:
  name: demo
spec:
  url: git://git-server.$CI_NS.svc.cluster.local/demo.git
  branches: [main]
  pollIntervalSeconds: 10
  workerPool: linux
YAML

say "waiting up to ${TIMEOUT}s for a passed TestRun"
deadline=$((SECONDS + TIMEOUT))
while :; do
  states=$(kubectl get testruns -n "$CI_NS" \
    -o jsonpath='{range .items[*]}{.metadata.name} {.status.phase} {.status.result} {.status.runsSummary}{"\n"}{end}')
  if printf '%s\n' "$states" | grep -q ' Succeeded passed 2/2$'; then
    printf '%s\n' "$states"
    say "passed"
    break
  fi
  if printf '%s\n' "$states" | grep -Eq ' (Failed|Error|Cancelled) '; then
    printf '%s\n' "$states"
    echo "kind.sh: a TestRun ended without passing" >&2
    exit 1
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    printf '%s\n' "$states"
    echo "kind.sh: no TestRun passed within ${TIMEOUT}s" >&2
    exit 1
  fi
  sleep 5
done

say "the operator's metrics saw it"
kubectl get --raw "/api/v1/namespaces/$SYSTEM_NS/services/http:$RELEASE:http/proxy/metrics" \
  | grep -E '^testlooper_runs_finished_total\{.*result="passed"'
