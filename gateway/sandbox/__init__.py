"""Local stand-ins for outside services, for tests and the clearly labelled demo mode.

Nothing in this package is ever on a production path: the gateway only reaches
it when the ``demo`` command or a test starts it explicitly.
"""
