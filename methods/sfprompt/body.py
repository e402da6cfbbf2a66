"""The SFPrompt body service: the coordinator's middle blocks behind a bidirectional gRPC stream.

One stream is one session (a data owner's split training in one round). Per batch the client sends
smashed activations (``Forward``), the body returns its output; the client sends the gradient of its
loss w.r.t. that output (``Backward``), the body returns the gradient w.r.t. the activations. The
body's weights are frozen; only activation gradients flow. Sessions run concurrently on a thread
pool (autograd graphs of different threads are independent; the frozen weights are only read).

Each finished session's accounting (bytes each way, steps) is kept in ``BodyServer.sessions`` so the
coordinator writes it into the run directory beside the clients' own counts.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent import futures
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import torch

from protocols import split_pb2, split_pb2_grpc
from protocols.split_wire import (
    SPLIT_PROTOCOL_VERSION, SplitWireError, grpc_message_options, pack_tensors, unpack_tensors,
)

log = logging.getLogger("fedadapt.coordinator.body")


class BodyServiceError(RuntimeError):
    pass


@dataclass
class SessionRecord:
    session_id: str
    client: str
    round: int
    steps: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    status: str = "open"  # open | closed | error | aborted
    reason: str = ""
    started: float = field(default_factory=time.time)
    seconds: float = 0.0


@dataclass
class SessionRules:
    run_name: str
    model: str
    head_layers: int
    tail_layers: int
    prompt_tokens: int
    max_message_bytes: int


class BodyServicer(split_pb2_grpc.SplitBodyServicer):
    """Runs ``split.body`` for every open session. ``split`` is a ``methods.sfprompt.split_model.SplitModel``."""

    def __init__(self, split, rules: SessionRules):
        self.split = split
        self.rules = rules
        self._lock = threading.Lock()
        self.sessions: list[SessionRecord] = []  # finished sessions, in the order they ended
        self.active: dict[str, SessionRecord] = {}

    # ------------------------------------------------------------------ the stream
    def Session(self, request_iterator, context):
        rec = SessionRecord(session_id="", client="", round=-1)
        try:
            yield from self._serve(request_iterator, rec)
        except SplitWireError as e:
            rec.status, rec.reason = "error", str(e)
            log.warning("body session %s refused a message: %s", rec.session_id or "?", e)
            yield self._send(rec, split_pb2.BodyMessage(error=split_pb2.Error(reason=str(e))))
        except Exception as e:  # a failing body step ends this session only, never the server
            rec.status, rec.reason = "error", f"body step failed: {type(e).__name__}: {e}"
            log.exception("body session %s failed", rec.session_id or "?")
            yield self._send(rec, split_pb2.BodyMessage(error=split_pb2.Error(reason=rec.reason)))
        finally:
            if rec.status == "open":
                rec.status, rec.reason = "aborted", "the client went away before closing the session"
            rec.seconds = time.time() - rec.started
            with self._lock:
                self.active.pop(rec.session_id, None)
                if rec.session_id:
                    self.sessions.append(rec)

    def _send(self, rec: SessionRecord, msg: split_pb2.BodyMessage) -> split_pb2.BodyMessage:
        rec.bytes_sent += msg.ByteSize()
        return msg

    def _serve(self, request_iterator, rec: SessionRecord):
        rules = self.rules
        pending: tuple[int, torch.Tensor, torch.Tensor] | None = None  # step, body input, body output
        for msg in request_iterator:
            rec.bytes_received += msg.ByteSize()
            kind = msg.WhichOneof("kind")
            if rec.session_id == "" and kind != "open":
                raise SplitWireError(f"the first message of a session must be Open, not {kind}: client and body versions differ")
            if kind == "open":
                if rec.session_id:
                    raise SplitWireError("Open sent twice in one session: open a new stream per round")
                self._check_open(msg.open)
                rec.client, rec.round = msg.open.client, int(msg.open.round)
                rec.session_id = f"{rec.client}/r{rec.round}/{uuid.uuid4().hex[:8]}"
                with self._lock:
                    self.active[rec.session_id] = rec
                log.debug("body session %s opened", rec.session_id)
                yield self._send(rec, split_pb2.BodyMessage(opened=split_pb2.Opened(
                    session_id=rec.session_id, body_layers=len(self.split.body_blocks),
                    max_message_bytes=rules.max_message_bytes)))
            elif kind == "forward":
                hidden, mask = self._decode_forward(msg.forward.tensors)
                with torch.enable_grad():
                    inp = hidden.requires_grad_(True)
                    out = self.split.body(inp, mask)
                pending = (int(msg.forward.step), inp, out)
                yield self._send(rec, split_pb2.BodyMessage(output=split_pb2.BodyOutput(
                    step=msg.forward.step, tensors=pack_tensors({"hidden": out}))))
            elif kind == "backward":
                if pending is None or pending[0] != int(msg.backward.step):
                    raise SplitWireError(
                        f"Backward for step {msg.backward.step} does not follow a Forward of that step: send Forward first"
                    )
                _, inp, out = pending
                grad = unpack_tensors(msg.backward.tensors, ranks={"grad": 3}, max_bytes=rules.max_message_bytes)["grad"]
                if tuple(grad.shape) != tuple(out.shape):
                    raise SplitWireError(f"gradient shape {tuple(grad.shape)} does not match the body output {tuple(out.shape)}")
                torch.autograd.backward(out, grad)
                pending = None
                rec.steps += 1
                yield self._send(rec, split_pb2.BodyMessage(grad=split_pb2.InputGrad(
                    step=msg.backward.step, tensors=pack_tensors({"grad": inp.grad}))))
            elif kind == "close":
                rec.status = "closed"
                closed = split_pb2.Closed(steps=rec.steps, bytes_received=rec.bytes_received, bytes_sent=rec.bytes_sent)
                log.debug("body session %s closed after %d steps", rec.session_id, rec.steps)
                yield self._send(rec, split_pb2.BodyMessage(closed=closed))
                return
            else:
                raise SplitWireError("empty stream message: client and body versions differ")

    def _check_open(self, o) -> None:
        r = self.rules
        if o.protocol_version != SPLIT_PROTOCOL_VERSION:
            raise SplitWireError(f"split protocol {o.protocol_version} is not {SPLIT_PROTOCOL_VERSION}: upgrade fedadapt on both sides")
        got = (o.run_name, o.model, o.head_layers, o.tail_layers, o.prompt_tokens)
        want = (r.run_name, r.model, r.head_layers, r.tail_layers, r.prompt_tokens)
        if got != want:
            raise SplitWireError(
                f"session (run, model, head_layers, tail_layers, prompt_tokens) = {got} does not match this body {want}: "
                "the client runs another config"
            )

    def _decode_forward(self, payload: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        t = unpack_tensors(payload, ranks={"hidden": 3, "attention_mask": 2}, max_bytes=self.rules.max_message_bytes)
        hidden, mask = t["hidden"], t["attention_mask"]
        if hidden.shape[:2] != mask.shape or hidden.shape[2] != self.split.shape.hidden_size:
            raise SplitWireError(
                f"activations {tuple(hidden.shape)} and mask {tuple(mask.shape)} do not fit hidden size {self.split.shape.hidden_size}"
            )
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise SplitWireError("attention_mask must hold only 0 and 1")
        return hidden, mask.long()

    def finished(self) -> list[dict]:
        with self._lock:
            return [asdict(s) for s in self.sessions]


@dataclass
class TLSFiles:
    cert: Path
    key: Path
    ca: Path | None = None  # what clients trust; None = the certificate itself (self-signed)

    def read(self) -> tuple[bytes, bytes, bytes]:
        for p in (self.cert, self.key) + ((self.ca,) if self.ca else ()):
            if not p.is_file():
                raise BodyServiceError(
                    f"TLS file {p} not found: create certificates (`coordinator certs`) or fix sfprompt.tls_cert/tls_key/tls_ca"
                )
        cert, key = self.cert.read_bytes(), self.key.read_bytes()
        return cert, key, (self.ca.read_bytes() if self.ca else cert)


class BodyServer:
    """The gRPC server around a ``BodyServicer``: start on an address (port 0 = any free port), stop."""

    def __init__(self, servicer: BodyServicer, *, max_sessions: int = 16, tls: TLSFiles | None = None):
        self.servicer = servicer
        self.max_sessions = max_sessions
        self.tls = tls
        self.ca_pem: bytes = b""
        self._server: grpc.Server | None = None
        self.port = 0
        self.listen_host = "127.0.0.1"

    def start(self, address: str) -> int:
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            raise BodyServiceError(f"sfprompt.body_address {address!r} is not host:port, e.g. 127.0.0.1:0 or 0.0.0.0:50061")
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.max_sessions, thread_name_prefix="sfprompt-body"),
            options=grpc_message_options(self.servicer.rules.max_message_bytes),
            maximum_concurrent_rpcs=self.max_sessions,
        )
        split_pb2_grpc.add_SplitBodyServicer_to_server(self.servicer, server)
        try:
            if self.tls:
                cert, key, self.ca_pem = self.tls.read()
                bound = server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
            else:
                bound = server.add_insecure_port(address)
        except RuntimeError as e:
            raise BodyServiceError(f"cannot listen on {address}: {e}; choose another sfprompt.body_address port") from None
        if not bound:
            raise BodyServiceError(f"cannot listen on {address}: the port is taken; choose another sfprompt.body_address")
        server.start()
        self._server, self.port, self.listen_host = server, bound, host
        log.info("SFPrompt body service on %s:%d (%s)", host, bound, "TLS" if self.tls else "plaintext")
        return bound

    def address(self, advertise: str = "") -> str:
        """What clients dial: ``advertise`` if set, else the listening host with the bound port."""
        if advertise:
            return advertise
        host = self.listen_host
        if host in ("0.0.0.0", "[::]", "::", ""):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    def stop(self, grace: float | None = None) -> None:
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None


def start_body_server(split, cfg) -> BodyServer:
    """Start the body service for run config ``cfg`` on ``cfg.sfprompt.body_address``."""
    s = cfg.sfprompt
    rules = SessionRules(
        run_name=cfg.name, model=cfg.model, head_layers=s.head_layers, tail_layers=s.tail_layers,
        prompt_tokens=s.prompt_tokens, max_message_bytes=s.max_message_mb * 1024 * 1024,
    )
    tls = None
    certs_dir = str(getattr(cfg.federation, "certs_dir", "") or "")
    if s.tls_cert:
        tls = TLSFiles(Path(s.tls_cert).expanduser(), Path(s.tls_key).expanduser(),
                       Path(s.tls_ca).expanduser() if s.tls_ca else None)
    elif certs_dir:
        # `coordinator serve --certs DIR` (files from `coordinator certs`): the body uses the same
        # server certificate as the SuperLink, and clients verify it against the same CA
        d = Path(certs_dir).expanduser()
        tls = TLSFiles(d / "server.pem", d / "server.key", d / "ca.crt")
    if tls is None and s.body_address.rpartition(":")[0] not in ("127.0.0.1", "localhost", "::1", "[::1]"):
        log.warning("the SFPrompt body service listens on %s without TLS: activations and gradients travel in the clear; "
                    "set sfprompt.tls_cert/tls_key or start with `coordinator serve --certs DIR`", s.body_address)
    server = BodyServer(BodyServicer(split, rules), max_sessions=s.max_sessions, tls=tls)
    server.start(s.body_address)
    return server
