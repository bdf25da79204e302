"""prefopt: a preference-optimization algorithm zoo (PPO, Sparrow-style A2C, DPO and its losses, ORPO, ...)."""

__version__ = "0.1.0"

import logging  # noqa: E402
import warnings  # noqa: E402


class _DropOptionalKernelWarning(logging.Filter):
    """bitsandbytes (imported by peft on every command) tries, on CPUs with AVX512-BF16, to fetch an optional 4-bit
    CPU kernel from the hub and warns on every import when it cannot; it then uses its own kernel. Nothing to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropOptionalKernelWarning())
# peft asks transformers' deprecated `is_gradient_checkpointing` on every LoRA model it prepares
warnings.filterwarnings("ignore", message=r".*`is_gradient_checkpointing` is deprecated", category=FutureWarning)

from prefopt.registry import ALGORITHMS, LOSSES, REWARDS, available, get  # noqa: E402

__all__ = ["ALGORITHMS", "LOSSES", "REWARDS", "available", "get", "__version__"]
