"""Errors the engine raises at its boundary; the gRPC layer maps each to one status code."""


class InvalidRequest(ValueError):
    """A request that can never be served as sent (INVALID_ARGUMENT). Names the field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message

    def __reduce__(self):  # crosses Ray process boundaries (controller -> router) intact
        return type(self), (self.field, self.message)


class QueueFull(RuntimeError):
    """More requests waiting than the queue holds (RESOURCE_EXHAUSTED); retry later."""


class EngineStopped(RuntimeError):
    """The engine is draining or has stopped (UNAVAILABLE)."""


class ControllerUnavailable(RuntimeError):
    """The controller is restarting or unreachable (UNAVAILABLE): an admin call can be retried shortly. Serving
    does not depend on it, so generation calls never see this."""


# Trailing metadata of an UNAVAILABLE that came from the controller, not the router: every router shares the one
# controller, so a client must not fail over to another router with it (a Rebalance would run twice).
CONTROLLER_UNAVAILABLE_METADATA = ("moe-serve-unavailable", "controller")
