# One image for every evsim live component (company server, station agent, vehicle agent).
#   docker build -t evsim .
#   docker run --rm -e EVSIM_COMPANY=voltbahia -e EVSIM_MQTT_URL=mqtt://broker:1883 evsim
# The broker is the official eclipse-mosquitto image (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY evsim ./evsim
COPY live ./live
COPY data ./data
RUN pip install ".[live]" \
    && useradd --system --uid 10001 --home-dir /var/lib/evsim --create-home evsim

# scenario files live in the image; databases and traces in /var/lib/evsim (a volume)
ENV EVSIM_SCENARIO=/app/data/bahia.toml \
    EVSIM_TRACE_DIR=/var/lib/evsim/traces
USER evsim
WORKDIR /var/lib/evsim
EXPOSE 8000

ENTRYPOINT ["python", "-m", "live"]
CMD ["server", "--host", "0.0.0.0", "--port", "8000"]
