from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Open(_message.Message):
    __slots__ = ("protocol_version", "run_name", "client", "round", "model", "head_layers", "tail_layers", "prompt_tokens")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_NAME_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HEAD_LAYERS_FIELD_NUMBER: _ClassVar[int]
    TAIL_LAYERS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    run_name: str
    client: str
    round: int
    model: str
    head_layers: int
    tail_layers: int
    prompt_tokens: int
    def __init__(self, protocol_version: _Optional[int] = ..., run_name: _Optional[str] = ..., client: _Optional[str] = ..., round: _Optional[int] = ..., model: _Optional[str] = ..., head_layers: _Optional[int] = ..., tail_layers: _Optional[int] = ..., prompt_tokens: _Optional[int] = ...) -> None: ...

class Forward(_message.Message):
    __slots__ = ("step", "tensors")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    step: int
    tensors: bytes
    def __init__(self, step: _Optional[int] = ..., tensors: _Optional[bytes] = ...) -> None: ...

class Backward(_message.Message):
    __slots__ = ("step", "tensors")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    step: int
    tensors: bytes
    def __init__(self, step: _Optional[int] = ..., tensors: _Optional[bytes] = ...) -> None: ...

class Close(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClientMessage(_message.Message):
    __slots__ = ("open", "forward", "backward", "close")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    open: Open
    forward: Forward
    backward: Backward
    close: Close
    def __init__(self, open: _Optional[_Union[Open, _Mapping]] = ..., forward: _Optional[_Union[Forward, _Mapping]] = ..., backward: _Optional[_Union[Backward, _Mapping]] = ..., close: _Optional[_Union[Close, _Mapping]] = ...) -> None: ...

class Opened(_message.Message):
    __slots__ = ("session_id", "body_layers", "max_message_bytes")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BODY_LAYERS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    body_layers: int
    max_message_bytes: int
    def __init__(self, session_id: _Optional[str] = ..., body_layers: _Optional[int] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class BodyOutput(_message.Message):
    __slots__ = ("step", "tensors")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    step: int
    tensors: bytes
    def __init__(self, step: _Optional[int] = ..., tensors: _Optional[bytes] = ...) -> None: ...

class InputGrad(_message.Message):
    __slots__ = ("step", "tensors")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    step: int
    tensors: bytes
    def __init__(self, step: _Optional[int] = ..., tensors: _Optional[bytes] = ...) -> None: ...

class Closed(_message.Message):
    __slots__ = ("steps", "bytes_received", "bytes_sent")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    steps: int
    bytes_received: int
    bytes_sent: int
    def __init__(self, steps: _Optional[int] = ..., bytes_received: _Optional[int] = ..., bytes_sent: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class BodyMessage(_message.Message):
    __slots__ = ("opened", "output", "grad", "closed", "error")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    opened: Opened
    output: BodyOutput
    grad: InputGrad
    closed: Closed
    error: Error
    def __init__(self, opened: _Optional[_Union[Opened, _Mapping]] = ..., output: _Optional[_Union[BodyOutput, _Mapping]] = ..., grad: _Optional[_Union[InputGrad, _Mapping]] = ..., closed: _Optional[_Union[Closed, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...
