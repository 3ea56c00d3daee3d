# Redis from Debian's package, for deploy/local/compose.yml where no registry image can be pulled.
# Built by deploy/local/image.sh services on a Debian bookworm base made with mmdebstrap.
ARG BASE
FROM ${BASE}
USER redis
EXPOSE 6379
ENTRYPOINT ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "", "--appendonly", "no"]
