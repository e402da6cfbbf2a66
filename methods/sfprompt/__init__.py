"""`sfprompt`: split federated prompt tuning (head and tail on the data owner, body on the coordinator)."""

from ..spec import MethodSpec
from .config import SFPromptConfig

SPEC = MethodSpec(
    name="sfprompt", client="methods.sfprompt.client:train", server="methods.sfprompt.server:SFPromptServer",
    section=SFPromptConfig, tasks=("classify",),
    why_not="its tail holds only the label words' rows of the LM head and the body stream scores one position per row",
)
