# virtio-recovery-agent: BCC (Debian's python3-bpfcc) + the agent + its BPF C sources. Only what
# `run` (and `doctor`) need: no lab/, no pip/setuptools, no docs.
#
# The base must be Debian 12 (bookworm) or a derivative: BCC comes from its python3-bpfcc package.
# It is pinned by digest; override it with --build-arg BASE_IMAGE=..., e.g. where no registry is
# reachable, with the local base of scripts/build-base-image (it prints the pinned reference):
#   podman build --build-arg BASE_IMAGE=localhost/vra-base:bookworm@sha256:<digest> -t virtio-recovery-agent .
#
# Runtime needs (see docs/deploy.md; deploy/base/daemonset.yaml does all of this):
#   - the host PID namespace (--pid=host / hostPID): BPF reports host PIDs, VM identity is read
#     from /proc/<pid> of the host;
#   - tracefs at /sys/kernel/tracing (or debugfs at /sys/kernel/debug on old kernels), read-only;
#   - /lib/modules and /usr/src of the host, read-only: BCC compiles bpf/*.c at start-up against
#     the running kernel's headers (or needs CONFIG_IKHEADERS, /sys/kernel/kheaders.tar.xz);
#   - uid 0 with CAP_BPF, CAP_PERFMON (kernel >= 5.8) and CAP_SYS_RESOURCE (memlock, kernel < 5.11),
#     seccomp unconfined; or --privileged on older kernels.
# It runs as uid 0 on purpose: Kubernetes cannot grant ambient capabilities, so a non-root uid
# would not have the capabilities the DaemonSet adds. Everything else is locked down there
# (all other capabilities dropped, read-only root filesystem, no privilege escalation).

# debian:bookworm-slim (multi-arch index digest). Update: skopeo inspect --format '{{.Digest}}'
# docker://docker.io/library/debian:bookworm-slim
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim@sha256:4b50eb66f977b4062683ff434ef18ac191da862dbe966961bc11990cf5791a8d

FROM ${BASE_IMAGE} AS build
ARG DEBIAN_FRONTEND=noninteractive
LABEL org.opencontainers.image.title="virtio-recovery-agent"
# Unpinned on purpose: the versions are whatever the base's Debian release ships (security updates).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*
# --system-site-packages: the bcc module is Debian's (python3-bpfcc in the runtime stage), not PyPI's.
RUN python3 -m venv --system-site-packages /opt/virtio-recovery-agent
WORKDIR /src
# lab/ (the test guests) is not copied: setuptools then packages agent/ only.
COPY pyproject.toml README.md ./
COPY agent/ agent/
# Behind a TLS-intercepting proxy, hand its CA bundle to this one step (it is not kept in the image):
#   podman build --secret id=ca-certificates,src=/etc/ssl/certs/ca-certificates.crt ...
# pip and setuptools are only needed to install: removed from the venv afterwards.
RUN --mount=type=secret,id=ca-certificates,required=false \
    if [ -s /run/secrets/ca-certificates ]; then export PIP_CERT=/run/secrets/ca-certificates; fi \
 && /opt/virtio-recovery-agent/bin/pip install --no-cache-dir . \
 && /opt/virtio-recovery-agent/bin/pip uninstall -y pip setuptools \
 && rm -f /opt/virtio-recovery-agent/bin/activate* /opt/virtio-recovery-agent/bin/Activate.ps1 \
 && /opt/virtio-recovery-agent/bin/virtio-recovery-agent --help >/dev/null

FROM ${BASE_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
# xz-utils: libbcc unpacks /sys/kernel/kheaders.tar.xz (CONFIG_IKHEADERS, hosts without header
# packages) with `tar -xf`, which needs xz.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-bpfcc xz-utils \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log \
           /usr/share/doc/* /usr/share/man/* /usr/share/info/* /usr/share/locale/*
COPY --from=build /opt/virtio-recovery-agent /opt/virtio-recovery-agent
COPY bpf/ /usr/share/virtio-recovery-agent/bpf/
ENV PATH=/opt/virtio-recovery-agent/bin:$PATH \
    VRA_BPF_DIR=/usr/share/virtio-recovery-agent/bpf \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
LABEL org.opencontainers.image.title="virtio-recovery-agent" \
      org.opencontainers.image.description="eBPF host agent: virtio DEVICE_NEEDS_RESET episodes and guest recovery time on KVM hosts" \
      org.opencontainers.image.licenses="Apache-2.0"
EXPOSE 9477
ENTRYPOINT ["virtio-recovery-agent"]
CMD ["run"]
