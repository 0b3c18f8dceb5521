# virtio-recovery-agent: BCC (Debian's python3-bpfcc) + the agent + its BPF C sources.
#
# The base must be Debian 12 (bookworm) or a derivative: BCC comes from its python3-bpfcc package.
# Override it where no registry is reachable, e.g. with scripts/build-base-image:
#   podman build --build-arg BASE_IMAGE=localhost/vra-base:bookworm -t virtio-recovery-agent .
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

ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim

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
COPY pyproject.toml README.md ./
COPY agent/ agent/
COPY lab/ lab/
# Behind a TLS-intercepting proxy, hand its CA bundle to this one step (it is not kept in the image):
#   podman build --secret id=ca-certificates,src=/etc/ssl/certs/ca-certificates.crt ...
RUN --mount=type=secret,id=ca-certificates,required=false \
    if [ -s /run/secrets/ca-certificates ]; then export PIP_CERT=/run/secrets/ca-certificates; fi \
 && /opt/virtio-recovery-agent/bin/pip install --no-cache-dir . \
 && /opt/virtio-recovery-agent/bin/virtio-recovery-agent --help >/dev/null

FROM ${BASE_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-bpfcc \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /usr/share/doc/* /usr/share/man/*
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
