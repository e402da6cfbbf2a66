"""The Flower ClientApp: thin. Reads the message, runs ``handle_round``, replies."""

from __future__ import annotations

import fedadapt  # noqa: F401  (sets offline environment before transformers loads)
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from protocols.messages import RoundInstruction

from .faults import apply_fault, fault_for
from .node import handle_round

INSTRUCTION = "instruction"
UPDATE = "update"
STATE = "fedadapt-state"

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    instr = RoundInstruction.from_record(dict(msg.content[INSTRUCTION]))
    state = context.state[STATE].to_torch_state_dict() if STATE in context.state else {}
    envelope = handle_round(instr, dict(context.node_config), state)
    # fault drills only (`client join --fault`, a simulation's federation.faults): rewrite the wire record
    record = apply_fault(envelope.to_record(), fault_for(dict(context.node_config), instr.run_config_json))
    if state:
        context.state[STATE] = ArrayRecord(torch_state_dict=state)
    return Message(RecordDict({UPDATE: ConfigRecord(record)}), reply_to=msg)
