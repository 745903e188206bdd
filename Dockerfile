# Production image: slim, non-root, health-checked.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY policies policies
COPY migrations migrations
COPY constraints.txt ./
RUN pip install --no-cache-dir --prefix=/install -c constraints.txt .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home /app omnigate
WORKDIR /app
COPY --from=build /install /usr/local
COPY migrations /app/migrations
ENV OMNIGATE_HOST=0.0.0.0 \
    OMNIGATE_PORT=8080 \
    PYTHONUNBUFFERED=1
USER omnigate
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"
ENTRYPOINT ["omnigate"]
CMD ["serve"]
