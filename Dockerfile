FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The email package of 3.11.10 and later quotes what it decodes (CVE-2024-6923); headers.py
# refuses such input on any interpreter, and this makes sure the image never goes below it.
RUN python -c "import sys; sys.exit(sys.version_info < (3, 11, 10))"

WORKDIR /app
COPY requirements.txt ./
RUN pip install -r requirements.txt

COPY alembic.ini ./
COPY migrations ./migrations
COPY *.py ./
COPY channels ./channels
COPY templates ./templates

RUN useradd --system --uid 10001 --no-create-home app \
    && mkdir -p /app/var \
    && chown app /app/var
USER app

EXPOSE 8003
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8003/healthz', timeout=2)"]

# One uvicorn process per core when the rate limits are shared (RATE_LIMIT_STORAGE=redis://…,
# as compose sets it), one otherwise (memory:// counts per process); WEB_CONCURRENCY
# overrides. Request headers must arrive within HTTP_HEADER_TIMEOUT (serving.py) and idle
# keep-alive connections close after 5 s. Each process runs its own worker thread when
# WORKER_IN_API=true. Migrations run first, once (`python cli.py migrate --if-enabled`: not
# with AUTO_MIGRATE off; replicas starting at once serialise on a PostgreSQL advisory lock),
# then the server processes start with AUTO_MIGRATE=false: none of them holds Alembic in
# memory. (The worker and inbound services of docker-compose.yaml run other commands and
# migrate at their own start-up.)
CMD ["sh", "-c", "case \"$RATE_LIMIT_STORAGE\" in redis*) n=$(nproc) ;; *) n=1 ;; esac; python cli.py migrate --if-enabled || exit 1; exec env AUTO_MIGRATE=false uvicorn main:app --host 0.0.0.0 --port 8003 --proxy-headers --http serving:GuardedHTTP --timeout-keep-alive 5 --workers \"${WEB_CONCURRENCY:-$n}\""]
