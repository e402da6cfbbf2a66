"""`lora`: LoRA FedAvg; with ``privacy.mode = "dp-sgd"`` (or ``trainer = "lora-dp"``) under Opacus DP-SGD."""

from ..spec import MethodSpec
from .config import LoraConfig

SPEC = MethodSpec(name="lora", client="methods.lora.client:train", server="methods.lora.server:LoraServer",
                  section=LoraConfig, dp_sgd=True)
