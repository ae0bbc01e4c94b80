"""Errors raised by the route solvers; each message is one line that says what to do next."""


class RoutingError(Exception):
    """Base of every error of llmswarm.routing that a user can act on."""


class NoRouteError(RoutingError):
    """No chain of servers covers every block of the model."""
