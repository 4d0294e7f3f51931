# The broker as a small image. Configuration, policies and manifests are
# mounted at run time; secrets come from the environment:
#   docker run -v $PWD/deploy:/etc/broker -p 8400:8400 mcp-broker
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY broker ./broker
RUN python -m venv /opt/broker && /opt/broker/bin/pip install --no-cache-dir .

FROM python:3.11-slim
COPY --from=build /opt/broker /opt/broker
RUN useradd --system --uid 10001 --home-dir /var/lib/broker --create-home broker
USER broker
WORKDIR /etc/broker
ENV PATH=/opt/broker/bin:$PATH
EXPOSE 8400
ENTRYPOINT ["broker", "-c", "/etc/broker/broker.toml"]
CMD ["serve"]
