"""How images are sampled: guidance over the steps, filtering, and the flow integrator. The
filtering part (`DrawSettings`: temperature, top-k, top-p) is what a head reads when it draws a
step's tokens; `SamplingConfig` adds what the sampling loops read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from ar.logits import DrawSettings
from common.config import ConfigError, check_fields
from sampling.guidance import CFG_SCHEDULES

FLOW_SAMPLERS = ("sde", "ode")


@dataclass
class SamplingConfig(DrawSettings):
    cfg_scale: float = 1.0  # classifier-free guidance, uncond + scale * (cond - uncond): on whenever != 1 (1 = off, no doubled batch; 0 = unconditional samples); LlamaGen's rule (> 1): sampling/guidance.py
    cfg_schedule: str = "constant"  # constant | linear | linear_full | power | cosine | half_linear: the scale over the steps (sampling/guidance.py)
    cfg_power: float = 1.0  # cfg_schedule=power: the exponent of the ramp
    cfg_interval: List[float] = field(default_factory=lambda: [0.0, 1.0])  # guide only steps with lo <= step/steps < hi
    flow_sampler: str = "sde"  # flow models: sde (Euler-Maruyama, xAR's default) | ode (Euler)
    flow_steps: int = 40  # flow models: network calls per step of the order (xAR-B: 40, L/H: 50)

    def validate(self) -> None:
        super().validate()
        check_fields(self, "sampling.", {"cfg_scale": ">= 0", "cfg_schedule": CFG_SCHEDULES,
                                         "cfg_power": "> 0", "flow_sampler": FLOW_SAMPLERS,
                                         "flow_steps": ">= 1"})
        lo_hi = self.cfg_interval
        if len(lo_hi) != 2 or not 0 <= lo_hi[0] < lo_hi[1] <= 1:
            raise ConfigError(f"sampling.cfg_interval={lo_hi} is out of range: it must be "
                              f"[lo, hi] with 0 <= lo < hi <= 1")
