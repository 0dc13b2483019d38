"""The operator console: a web page served by the gateway."""
