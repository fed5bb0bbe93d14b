"""initialize never returns: the load must time out and the model be UNAVAILABLE."""

import time


class TritonPythonModel:
    def initialize(self, args):
        time.sleep(3600)

    def execute(self, requests):
        return []
