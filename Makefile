.PHONY: test demo bench lint

# The whole suite: ruff, mypy --strict, unit tests, integration tests on the real broker.
test:
	scripts/test

# The example app end to end on the embedded in-memory default (no broker needed).
demo:
	scripts/demo

# Benchmarks against the local RabbitMQ, side by side with raw aio-pika.
bench:
	scripts/bench

lint:
	.venv/bin/ruff check src tests integration bench examples && .venv/bin/mypy
