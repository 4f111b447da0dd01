"""What differs between JAX backends, decided here and nowhere else.

`of(platform)` answers three questions for "cpu", "gpu" or "tpu"; the measurements behind each answer are in
the README ("What differs between backends"):
- transposed_down: the rollout copy stores the MLP down projection output-major ([D, F], `down_t`) on CPU,
  where XLA's small-batch matmul reads it faster; HF's [F, D] elsewhere.
- sharding_hints: the activation layout hints (`sharding.shard_as`) apply inside traced programs on
  accelerators. On CPU they are off: XLA's CPU runtime can deadlock on some hinted programs over fake
  devices, and the hints change layouts, never values. c2f-plan, which only compiles, sets
  C2F_SHARDING_HINTS=1 to plan the programs accelerators run.
- serial_programs: each program completes before the next is dispatched. XLA's CPU client can deadlock with
  two programs with collectives in flight; on accelerators, programs that run for seconds gain nothing.
"""

from __future__ import annotations

import dataclasses
import os

import jax

HINTS_ENV = "C2F_SHARDING_HINTS"


@dataclasses.dataclass(frozen=True)
class Backend:
    platform: str
    transposed_down: bool
    sharding_hints: bool
    serial_programs: bool

    def wait(self, x):
        """x once computed, where programs run one at a time (serial_programs); else x as it is (async)."""
        return jax.block_until_ready(x) if self.serial_programs else x


def of(platform: str) -> Backend:
    """The choices for a JAX platform name ("cpu", "gpu", "tpu")."""
    cpu = platform == "cpu"
    hints = os.environ.get(HINTS_ENV)
    return Backend(
        platform=platform,
        transposed_down=cpu,
        sharding_hints=(not cpu) if hints is None else hints == "1",
        serial_programs=cpu,
    )


def of_mesh(mesh) -> Backend:
    """The choices for the devices of a mesh."""
    return of(mesh.devices.flat[0].platform)
