"""fedadapt's shared core: the model store, the data readers, the classification task, adapter helpers.

Both the coordinator and the client nodes use these; neither imports the other.
"""

import os
import warnings

# No hub is reachable and none may be asked: every model and dataset is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# transformers' per-load "Loading weights" bar: a local safetensors read takes milliseconds, and in a
# simulation every virtual client would print one; fedadapt's own progress bars say what runs
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# transformers/opacus deprecation chatter is not actionable for users of fedadapt
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")

__version__ = "0.1.0"
