"""initialize raises: the model must be UNAVAILABLE with the reason, nothing else harmed."""


class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("the weights are missing")

    def execute(self, requests):
        return []
