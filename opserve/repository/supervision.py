"""How the model manager looks after its workers: when a failed restart is tried again, and how
long one `execute` may run (pure rules, no processes).

A worker that dies is replaced at once (after `FIRST_DELAY_S`); a replacement that fails (the
model's `initialize` raises, the machine is out of file descriptors or memory) is tried again
after a delay that doubles each time, up to `MAX_DELAY_S`, until it succeeds or the model is
unloaded.

The execution timeout: `EXECUTION_TIMEOUT_SECS` in a model's `parameters` (a string, as every
parameter), else the server's `--execution-timeout-secs`; 0 means no limit. When an `execute`
call has not returned by then, its worker is presumed hung and killed (code running in a worker
cannot be interrupted from outside), its requests fail, and it is replaced.
"""

from __future__ import annotations

import math

from opserve.errors import InvalidArgumentError
from opserve.proto import ModelConfig

FIRST_DELAY_S = 0.2
MAX_DELAY_S = 30.0
EXECUTION_TIMEOUT_PARAMETER = "EXECUTION_TIMEOUT_SECS"


def restart_delay(failures: int) -> float:
    """Seconds to wait before the next attempt, after `failures` failed ones in a row."""
    return min(FIRST_DELAY_S * 2.0 ** min(failures, 32), MAX_DELAY_S)


def execution_timeout(config: ModelConfig, server_default: float) -> float:
    """A model's execution timeout in seconds (0: none): its own parameter, else the server's."""
    parameter = config.parameters.get(EXECUTION_TIMEOUT_PARAMETER)
    if parameter is None:
        return server_default
    text = parameter.string_value.strip()
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise InvalidArgumentError(
            f"model '{config.name}': parameter {EXECUTION_TIMEOUT_PARAMETER} must be a number "
            f"of seconds (0 for no limit), not {text!r}"
        )
    return value
