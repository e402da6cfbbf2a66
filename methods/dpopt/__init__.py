"""`dpopt`: DP-OPT, discrete prompts written by the data owners' local LLM under differential privacy."""

from ..spec import MethodSpec
from .config import DPOPTConfig

SPEC = MethodSpec(
    name="dpopt", client="methods.dpopt.client:train", server="methods.dpopt.server:DpoptServer",
    section=DPOPTConfig, tasks=("classify",), tensors=False, always_private=True,
    why_not="its released prompts are scored by the label words (a verbalizer)",
)
