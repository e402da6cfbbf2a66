"""`offsite`: offsite-tuning with uniform or CRaSh emulators (the model owner keeps the full model)."""

from ..spec import MethodSpec
from .config import OffsiteConfig

SPEC = MethodSpec(name="offsite", client="methods.offsite.client:train", server="methods.offsite.server:OffsiteServer",
                  section=OffsiteConfig, dp_sgd=True)
