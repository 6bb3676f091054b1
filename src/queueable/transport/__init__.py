"""Transports: where queued listeners' messages go. ``memory`` ships always; ``rabbitmq`` needs aio-pika."""
