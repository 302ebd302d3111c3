# syntax=docker/dockerfile:1
#
# The VAE inference service: `docker run -p 8000:8000 IMAGE` serves a model trained at build time.
#
#   docker build -t vae-service:cpu .                                  # CPU image (default)
#   docker build -t vae-service:cuda --build-arg DEVICE=cuda .         # CUDA image (torch's own CUDA wheels)
#   docker build --build-arg MODEL_SOURCE=file --build-arg MODEL_FILE=models/vae.ts .   # ship a given artifact
#   docker build --build-context torch-wheels=/opt/wheels --build-arg TORCH_VERSION=2.13.0+cpu \
#                --build-arg TORCH_INDEX_URL=https://pypi.org/simple .                # torch from a local wheel
#
# Build arguments (deploy/README.md has the long version):
#   BASE_IMAGE       any Debian bookworm image; python3 comes from its apt, so every stage runs the same interpreter
#   DEVICE           cpu | cuda: picks the default torch index and checks the installed wheel matches
#   TORCH_VERSION    the torch pin (a local version such as 2.13.0+cpu pins one wheel exactly)
#   TORCH_INDEX_URL  where torch comes from; empty: https://download.pytorch.org/whl/cpu for cpu, PyPI for cuda
#                    (PyPI's Linux torch wheels carry CUDA as nvidia-* wheels: the only CUDA in the image)
#   MODEL_SOURCE     train (default: the digits model is trained here) | file (copy MODEL_FILE from the context)
#   MODEL_FILE       path of a vae.ts inside the build context, for MODEL_SOURCE=file (models/ is not ignored)
#   TRAIN_EPOCHS     epochs for the build-time model
# Optional build secrets, for a network whose TLS is re-signed by a local CA: `--secret id=pip.conf,src=FILE`
# (mounted as /etc/pip.conf) and `--secret id=pip-ca,src=CA_BUNDLE` (at /run/secrets/pip-ca for that pip.conf).
# Neither ends up in a layer.

ARG BASE_IMAGE=debian:bookworm-slim
ARG MODEL_SOURCE=train

# An empty folder of local torch wheels; `--build-context torch-wheels=DIR` replaces this stage with DIR.
FROM scratch AS torch-wheels

# ---------------------------------------------------------------------------------------------------------------
# base: interpreter and init, shared by the build and runtime stages so the virtualenv built in one runs in the
# other unchanged (its bin/python is a symlink to this /usr/bin/python3).
FROM ${BASE_IMAGE} AS base
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 tini \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# ---------------------------------------------------------------------------------------------------------------
# requirements: the dependency lists out of pyproject.toml. Later stages copy these files, not pyproject.toml, so
# an edit elsewhere in it (a version, a pytest option) reinstalls nothing and retrains nothing.
FROM base AS requirements
WORKDIR /src
COPY pyproject.toml ./
RUN python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
print("\n".join(p["dependencies"]), file=open("requirements.txt", "w")); \
print("\n".join(p["optional-dependencies"]["train"]), file=open("requirements-train.txt", "w"))'

# ---------------------------------------------------------------------------------------------------------------
# deps: torch first, from the chosen source, then the serving dependencies read from pyproject.toml, pinned
# against the torch just installed so that no later resolve can swap it for another build (CUDA installed once).
FROM base AS deps
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
ARG DEVICE=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
RUN --mount=type=bind,from=torch-wheels,target=/wheels \
    --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    --mount=type=secret,id=pip-ca \
    --mount=type=cache,target=/root/.cache/pip \
    case "$DEVICE" in \
      cpu) default_index=https://download.pytorch.org/whl/cpu ;; \
      cuda) default_index=https://pypi.org/simple ;; \
      *) echo "DEVICE must be cpu or cuda, got '$DEVICE'" >&2; exit 2 ;; \
    esac \
 && pip install --find-links /wheels --index-url "${TORCH_INDEX_URL:-$default_index}" "torch==${TORCH_VERSION}" \
 && python -W ignore -c 'import sys, torch; cuda = torch.version.cuda is not None; \
sys.exit(0 if cuda == (sys.argv[1] == "cuda") else "torch %s does not match DEVICE=%s" % (torch.__version__, sys.argv[1]))' \
    "$DEVICE" \
 && python -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' > /opt/torch-constraint.txt
WORKDIR /src
COPY --from=requirements /src/requirements.txt /tmp/
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    --mount=type=secret,id=pip-ca \
    --mount=type=cache,target=/root/.cache/pip \
    pip install --constraint /opt/torch-constraint.txt --requirement /tmp/requirements.txt

# ---------------------------------------------------------------------------------------------------------------
# venv: the project itself on top of deps, then what serving never loads is removed (this stage is only copied
# from, so the deletions really shrink the image): pip, torch's C++ headers and test binaries, and bytecode of
# modules the server never imports. pip compiles every module (~150 MB for torch, sympy & co.); only those the
# server imports at start keep their .pyc, so start-up never compiles, and anything imported later compiles in
# memory (the root filesystem is read-only at run time).
FROM deps AS venv
COPY pyproject.toml README.md* ./
COPY vae_artifact/ vae_artifact/
COPY service/ service/
COPY training/ training/
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    --mount=type=secret,id=pip-ca \
    --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps --constraint /opt/torch-constraint.txt . \
 && python -m pip uninstall --yes pip \
 && torch_dir="$(python -c 'import os, torch; print(os.path.dirname(torch.__file__))')" \
 && rm -rf "$torch_dir/include" "$torch_dir/share/cmake" "$torch_dir/test" "$torch_dir"/bin/test_* \
      "$torch_dir"/bin/*Test "$torch_dir"/bin/protoc* "$torch_dir"/lib/lib*_test.so \
 && find /opt/venv -name __pycache__ -type d -prune -exec rm -rf {} + \
 && PYTHONDONTWRITEBYTECODE='' python -P -W ignore -c 'import service.__main__, service.supervisor, service.server; from PIL import Image; Image.init()' \
 && vae-serve --help > /dev/null

# ---------------------------------------------------------------------------------------------------------------
# model-train: trains the default model from the digits data bundled with scikit-learn. Only training/ and the
# artifact contract are copied, so editing service/ never retrains; the training extras stay in this stage.
FROM deps AS model-train
COPY --from=requirements /src/requirements-train.txt /tmp/
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    --mount=type=secret,id=pip-ca \
    --mount=type=cache,target=/root/.cache/pip \
    pip install --constraint /opt/torch-constraint.txt --requirement /tmp/requirements-train.txt
COPY vae_artifact/ vae_artifact/
COPY training/ training/
ARG TRAIN_EPOCHS=30
RUN python -m training --data digits --epochs "$TRAIN_EPOCHS" --out /models/vae.ts

# model-file: a given artifact instead (MODEL_SOURCE=file).
FROM base AS model-file
ARG MODEL_FILE=models/vae.ts
COPY ${MODEL_FILE} /models/vae.ts

# The stage named by MODEL_SOURCE, not an image (podman 4.3 needs the argument passed explicitly: a default
# global ARG is not seen when it decides which stages to build).
# hadolint ignore=DL3006
FROM model-${MODEL_SOURCE} AS model

# ---------------------------------------------------------------------------------------------------------------
# runtime: python3 + tini from base, the stripped venv, the artifact. Everything is root-owned and read-only to
# the service user, so the container runs with a read-only root filesystem (give it a tmpfs /tmp for uploads).
FROM base AS runtime
ARG DEVICE=cpu
RUN groupadd --system --gid 10001 vae \
 && useradd --system --uid 10001 --gid vae --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin vae
COPY --from=venv /opt/venv /opt/venv
COPY --from=model /models/vae.ts /models/vae.ts
LABEL org.opencontainers.image.title="vae-service" \
      org.opencontainers.image.description="VAE inference service (FastAPI + TorchScript), ${DEVICE} build" \
      org.opencontainers.image.licenses="MIT"
# Settings are read from VAE_* variables, so `docker run -e VAE_PORT=...` and Kubernetes env override them.
# NVIDIA_DRIVER_CAPABILITIES asks the NVIDIA runtime for the compute libraries when a GPU is attached; it does
# nothing without one.
ENV VAE_MODEL_PATH=/models/vae.ts \
    VAE_HOST=0.0.0.0 \
    VAE_PORT=8000 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/livez' % os.environ.get('VAE_PORT', '8000'), timeout=4)"]
# tini is PID 1: it forwards SIGTERM to the service (which drains: readiness 503, in-flight requests finish,
# exit within VAE_GRACE_PERIOD_S) and reaps any child, so `docker stop` is a graceful stop, not a kill.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["vae-serve"]
