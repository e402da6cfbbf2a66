"""SFPrompt's split and its gRPC stream, without Flower: exactness, what crosses the wire, limits, TLS."""

from __future__ import annotations

import datetime
import ipaddress
import threading
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from methods.base import TrainContext
from methods.sfprompt.client import (
    BodyStream, BodyStreamError, prune_indices, score_logits, train,
)
from methods.sfprompt.body import BodyServer, BodyServicer, SessionRules, TLSFiles
from fedadapt.data import load_split, resolve_dataset_dir
from fedadapt.models import load_model
from methods.sfprompt.split_model import PROMPT_KEY, SplitError, SplitLlama
from fedadapt.tasks.classify import VerbalizerTask
from protocols import split_pb2
from protocols.split_wire import BODY_ADDRESS_KEY, SplitWireError, pack_tensors, unpack_tensors

LABELS = ["negative", "positive"]
TEXTS = ["a moving, funny and smart film", "dull", "the plot wanders but the cast is great fun", "no"]


def make_split(head=1, tail=1):
    model, tok, _ = load_model("tiny-llama")
    return SplitLlama(model, head, tail), tok


def rules(**kw):
    base = dict(run_name="t", model="tiny-llama", head_layers=1, tail_layers=1, prompt_tokens=4, max_message_bytes=8 << 20)
    base.update(kw)
    return SessionRules(**base)


class Cfg:
    """The parts of a RunConfig a BodyStream.open reads."""

    class S:
        head_layers, tail_layers, prompt_tokens = 1, 1, 4

    name, model, sfprompt = "t", "tiny-llama", S


class RecordingServicer(BodyServicer):
    """Keeps every message the body receives: the test reads exactly what crossed the wire."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen: list[split_pb2.ClientMessage] = []

    def Session(self, request_iterator, context):
        def tap():
            for m in request_iterator:
                self.seen.append(m)
                yield m

        yield from super().Session(tap(), context)


@pytest.fixture(scope="module")
def body():
    split, _ = make_split()
    split.freeze_all()
    server = BodyServer(RecordingServicer(split, rules()), max_sessions=4)
    server.start("127.0.0.1:0")
    yield server
    server.stop(0)


# ---------------------------------------------------------------------------- proto and wire


def test_proto_round_trip_carries_tensors_exactly():
    hidden, mask = torch.randn(2, 5, 32), torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]).float()
    msg = split_pb2.ClientMessage(forward=split_pb2.Forward(step=7, tensors=pack_tensors({"hidden": hidden, "attention_mask": mask})))
    back = split_pb2.ClientMessage.FromString(msg.SerializeToString())
    assert back.WhichOneof("kind") == "forward" and back.forward.step == 7
    t = unpack_tensors(back.forward.tensors, ranks={"hidden": 3, "attention_mask": 2}, max_bytes=1 << 20)
    assert torch.equal(t["hidden"], hidden) and torch.equal(t["attention_mask"], mask)
    opened = split_pb2.BodyMessage.FromString(split_pb2.BodyMessage(opened=split_pb2.Opened(session_id="c/r1/x", body_layers=2)).SerializeToString())
    assert opened.opened.session_id == "c/r1/x" and opened.opened.body_layers == 2


def test_wire_refuses_unexpected_tensors_wrong_rank_and_oversize():
    payload = pack_tensors({"hidden": torch.zeros(1, 2, 3), "labels": torch.zeros(1)})
    with pytest.raises(SplitWireError, match="expected exactly"):
        unpack_tensors(payload, ranks={"hidden": 3}, max_bytes=1 << 20)
    with pytest.raises(SplitWireError, match="rank 3"):
        unpack_tensors(pack_tensors({"hidden": torch.zeros(2, 3)}), ranks={"hidden": 3}, max_bytes=1 << 20)
    with pytest.raises(SplitWireError, match="exceeds the limit"):
        unpack_tensors(pack_tensors({"hidden": torch.zeros(8, 8, 8)}), ranks={"hidden": 3}, max_bytes=100)


def test_split_must_leave_a_body():
    model, _, _ = load_model("tiny-llama")
    with pytest.raises(SplitError, match="at least one"):
        SplitLlama(model, 2, 2)


# ---------------------------------------------------------------------------- exactness


def test_split_over_grpc_equals_unsplit_loss_and_gradients(body):
    """head (client) → body (gRPC service) → tail (client) gives the unsplit model's loss, prompt and tail grads."""
    split, tok = make_split()  # the client's own copy: same seeded weights as the body's
    split.freeze_all_but_tail()
    task = VerbalizerTask.build(tok, LABELS, prompt="Review: {text}\nSentiment:", max_length=48)
    inputs, labels = task.encode(TEXTS), torch.tensor([1, 0, 1, 0])
    prompt = split.initial_prompt(tok, 4, "Classify the review.").requires_grad_(True)

    stream = BodyStream(body.address(), max_bytes=8 << 20, timeout_s=60)
    try:
        stream.open(Cfg, "client-x", 1)
        smashed, mask = split.head(inputs["input_ids"], inputs["attention_mask"], prompt)
        out = stream.forward(1, smashed, mask).requires_grad_(True)
        loss = F.cross_entropy(split.tail_label_logits(out, mask, task.label_token_ids), labels)
        loss.backward()
        smashed.backward(stream.backward(1, out.grad))
        stream.close()
    finally:
        stream.shutdown()
    split_prompt_grad = prompt.grad.clone()
    split_tail_grads = {k: p.grad.clone() for k, p in split.tail_parameters().items()}
    prompt.grad = None
    for p in split.tail_parameters().values():
        p.grad = None

    # the unsplit model on the same embeddings (prompt inserted at each row's first real token)
    embeds, full_mask = split.insert_prompt(inputs["input_ids"], inputs["attention_mask"], prompt)
    logits = split.model(inputs_embeds=embeds, attention_mask=full_mask, logits_to_keep=1, use_cache=False).logits
    ref_loss = F.cross_entropy(logits[:, -1, task.label_token_ids], labels)
    ref_loss.backward()

    assert torch.allclose(loss, ref_loss, atol=1e-6), (loss.item(), ref_loss.item())
    assert split_prompt_grad.abs().max() > 0
    assert torch.allclose(split_prompt_grad, prompt.grad, atol=1e-6, rtol=1e-4)
    for k, p in split.tail_parameters().items():
        assert torch.allclose(split_tail_grads[k], p.grad, atol=1e-6, rtol=1e-4), k


# ---------------------------------------------------------------------------- the trainer and the wire


def _examples(root, n):
    return load_split(resolve_dataset_dir("rotten_tomatoes", str(root), fetch=False), "train", LABELS, limit=n)


def _ctx(tiny_cfg, address, examples, **extra):
    tiny_cfg.trainer = "sfprompt"
    tiny_cfg.name = "t"
    tiny_cfg.sfprompt.head_layers, tiny_cfg.sfprompt.tail_layers, tiny_cfg.sfprompt.prompt_tokens = 1, 1, 4
    tiny_cfg.sfprompt.prune_keep, tiny_cfg.sfprompt.local_loss_steps = 0.5, 2
    split, tok = make_split()
    glob = {PROMPT_KEY: split.initial_prompt(tok, 4, tiny_cfg.sfprompt.prompt_init_text), **split.tail_state()}
    return TrainContext(cfg=tiny_cfg, round=1, global_state=glob, examples=examples, labels=LABELS,
                        client_name="owner-a", extra={BODY_ADDRESS_KEY: address, **extra})


def test_server_never_receives_tokens_or_labels(body, tiny_cfg, data_root):
    tiny_cfg.data.root = str(data_root)
    examples = _examples(data_root, 32)
    body.servicer.seen.clear()
    res = train(_ctx(tiny_cfg, body.address(), examples))
    assert res.status == "ok", res.reason
    # the top half within each label (quotas adding up to ceil(n / 2)), in batches of 8
    kept = -(-len(examples) // 2)
    steps = -(-kept // 8)
    assert res.metrics["kept_examples"] == kept and res.metrics["split_steps"] == steps
    assert set(res.update) == {PROMPT_KEY} | {k for k in res.update if k.startswith("tail.")}
    seen = body.servicer.seen
    kinds = [m.WhichOneof("kind") for m in seen]
    assert kinds == ["open"] + ["forward", "backward"] * steps + ["close"]
    _, tok = make_split()
    token_ids = {i for e in examples for i in tok(e.text)["input_ids"]}
    for m in seen:
        raw = m.SerializeToString()
        for e in examples:  # no text (nor a long piece of it) in any message
            assert e.text[:24].encode() not in raw
        assert b"negative" not in raw and b"positive" not in raw
        if m.WhichOneof("kind") == "forward":
            t = unpack_tensors(m.forward.tensors, ranks={"hidden": 3, "attention_mask": 2}, max_bytes=1 << 30)
            assert t["hidden"].shape[2] == 32 and set(t["attention_mask"].unique().tolist()) <= {0.0, 1.0}
            # activations after a transformer block: not integer token ids in disguise
            assert not all(float(v).is_integer() and int(v) in token_ids for v in t["hidden"].flatten()[:64])
        if m.WhichOneof("kind") == "backward":
            unpack_tensors(m.backward.tensors, ranks={"grad": 3}, max_bytes=1 << 30)
    # the client's count of bytes equals the body's own count
    assert res.metrics["split_bytes_up"] == res.metrics["body_bytes_received"] == sum(m.ByteSize() for m in seen)
    assert 0 < res.metrics["client_flops_ratio"] < 1


def test_body_serves_concurrent_sessions(body):
    split, _ = make_split()
    split.freeze_all()
    results, errors = {}, []

    def client(i):
        try:
            torch.manual_seed(i)
            h, mask = torch.randn(2, 6, 32), torch.ones(2, 6)
            s = BodyStream(body.address(), max_bytes=8 << 20, timeout_s=60)
            try:
                s.open(Cfg, f"c{i}", 3)
                outs = [s.forward(k, h, mask) for k in range(1, 4)]
                s.close()
            finally:
                s.shutdown()
            results[i] = (h, mask, outs, s.session_id)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len({r[3] for r in results.values()}) == 3
    with torch.no_grad():
        for h, mask, outs, _ in results.values():
            ref = split.body(h, mask.long())
            assert all(torch.allclose(o, ref, atol=1e-6) for o in outs)
    done = [s for s in body.servicer.finished() if s["round"] == 3]
    assert len(done) == 3 and all(s["status"] == "closed" for s in done)


def test_session_of_another_config_is_refused(body):
    class Other(Cfg):
        class S:
            head_layers, tail_layers, prompt_tokens = 2, 1, 4
        sfprompt = S

    s = BodyStream(body.address(), max_bytes=8 << 20, timeout_s=30)
    try:
        with pytest.raises(BodyStreamError, match="does not match this body"):
            s.open(Other, "c", 1)
    finally:
        s.shutdown()


def test_message_size_limits_are_checked_on_both_sides():
    split, _ = make_split()
    split.freeze_all()
    server = BodyServer(BodyServicer(split, rules(max_message_bytes=1 << 20)))
    server.start("127.0.0.1:0")
    big = torch.randn(16, 600, 32)  # 1.2 MB of activations
    try:
        s = BodyStream(server.address(), max_bytes=1 << 20, timeout_s=30)  # the client's own limit
        try:
            s.open(Cfg, "c", 1)
            with pytest.raises(SplitWireError, match="sfprompt.max_message_mb"):
                s.forward(1, big, torch.ones(16, 600))
        finally:
            s.shutdown()
        s = BodyStream(server.address(), max_bytes=64 << 20, timeout_s=30)  # a client with a looser limit
        try:
            s.open(Cfg, "c", 1)
            with pytest.raises(BodyStreamError, match="RESOURCE_EXHAUSTED"):
                s.forward(1, big, torch.ones(16, 600))
        finally:
            s.shutdown()
    finally:
        server.stop(0)


def test_server_killed_mid_round_gives_a_clear_client_error(tiny_cfg, data_root):
    tiny_cfg.data.root = str(data_root)
    split, _ = make_split()
    split.freeze_all()
    server = BodyServer(DiesAfterFirstForward(split, rules()))
    server.servicer.server = server
    server.start("127.0.0.1:0")
    try:
        res = train(_ctx(tiny_cfg, server.address(), _examples(data_root, 32)))
    finally:
        server.stop(0)
    assert res.status == "error"
    assert "broke off mid-round" in res.reason and "UNAVAILABLE" in res.reason
    assert res.update == {}


class DiesAfterFirstForward(BodyServicer):
    """Answers the first Forward, then the whole server goes down before the Backward is answered."""

    server: BodyServer

    def Session(self, request_iterator, context):
        for msg in super().Session(request_iterator, context):
            yield msg
            if msg.WhichOneof("kind") == "output":
                stopped = self.server._server.stop(0)
                stopped.wait(5)
                return


# ---------------------------------------------------------------------------- pruning


def test_pruning_keeps_the_highest_scores():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3])
    assert prune_indices(scores, 0.4) == [1, 3]
    assert prune_indices(scores, 0.5) == [1, 2, 3]  # ceil(2.5)
    assert prune_indices(scores, 1.0) == [0, 1, 2, 3, 4]
    assert prune_indices(torch.tensor([0.2, 0.2, 0.2]), 0.34) == [0, 1]  # ties: earlier first


def test_el2n_and_loss_scores():
    logits = torch.tensor([[4.0, -4.0], [0.0, 0.0], [-4.0, 4.0]])
    labels = torch.tensor([0, 0, 0])
    el2n = score_logits(logits, labels, "el2n")
    p = logits.softmax(-1)
    manual = torch.sqrt((p[:, 0] - 1) ** 2 + p[:, 1] ** 2)
    assert torch.allclose(el2n, manual)
    assert el2n.argsort().tolist() == [0, 1, 2]  # confident-right < unsure < confident-wrong
    assert torch.allclose(score_logits(logits, labels, "loss"), F.cross_entropy(logits, labels, reduction="none"))


# ---------------------------------------------------------------------------- TLS


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedadapt-body")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                    x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "body.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "body.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return tmp_path / "body.pem", tmp_path / "body.key"


def test_tls_stream_and_plaintext_client_refused(tmp_path):
    cert, key = _self_signed(tmp_path)
    split, _ = make_split()
    split.freeze_all()
    server = BodyServer(BodyServicer(split, rules()), tls=TLSFiles(cert, key))
    server.start("127.0.0.1:0")
    try:
        s = BodyStream(server.address(), max_bytes=8 << 20, timeout_s=30, ca_pem=server.ca_pem)
        try:
            s.open(Cfg, "c", 1)
            out = s.forward(1, torch.randn(1, 3, 32), torch.ones(1, 3))
            assert out.shape == (1, 3, 32)
            s.close()
        finally:
            s.shutdown()
        plain = BodyStream(server.address(), max_bytes=8 << 20, timeout_s=10)
        try:
            with pytest.raises(BodyStreamError, match="unreachable or broke off"):
                plain.open(Cfg, "c", 1)
        finally:
            plain.shutdown()
    finally:
        server.stop(0)


def test_missing_tls_file_is_one_clear_line(tmp_path):
    from methods.sfprompt.body import BodyServiceError

    with pytest.raises(BodyServiceError, match="coordinator certs"):
        TLSFiles(tmp_path / "nope.pem", tmp_path / "nope.key").read()


def test_certs_dir_of_coordinator_serve_turns_tls_on(tmp_path, tiny_cfg):
    from methods.sfprompt.body import start_body_server

    cert, key = _self_signed(tmp_path)
    cert.rename(tmp_path / "server.pem")
    key.rename(tmp_path / "server.key")
    (tmp_path / "ca.crt").write_bytes((tmp_path / "server.pem").read_bytes())  # self-signed: its own CA
    tiny_cfg.federation.certs_dir = str(tmp_path)
    tiny_cfg.name = "t"
    tiny_cfg.sfprompt.prompt_tokens = 4
    split, _ = make_split()
    split.freeze_all()
    server = start_body_server(split, tiny_cfg)
    try:
        assert server.tls is not None and server.ca_pem == (tmp_path / "ca.crt").read_bytes()
        s = BodyStream(server.address(), max_bytes=8 << 20, timeout_s=30, ca_pem=server.ca_pem)
        try:
            s.open(Cfg, "c", 1)
            s.close()
        finally:
            s.shutdown()
    finally:
        server.stop(0)


def test_trainer_over_tls_with_the_certificate_from_the_round_instruction(tmp_path, tiny_cfg, data_root):
    from methods.sfprompt.server import SFPromptServer
    from protocols.split_wire import BODY_CA_KEY

    cert, key = _self_signed(tmp_path)
    tiny_cfg.data.root = str(data_root)
    ctx = _ctx(tiny_cfg, "", _examples(data_root, 16))
    tiny_cfg.sfprompt = tiny_cfg.sfprompt.model_copy(update={"tls_cert": str(cert), "tls_key": str(key)})
    method = SFPromptServer(tiny_cfg, LABELS)
    try:
        extra = method.round_extra(1)
        assert extra[BODY_CA_KEY].startswith("-----BEGIN CERTIFICATE-----")
        ctx.extra.update(extra)
        ctx.global_state = method.initial_global()
        res = train(ctx)
        assert res.status == "ok", res.reason
        ctx.extra.pop(BODY_CA_KEY)  # a data owner that does not verify gets no session
        res = train(ctx)
        assert res.status == "error" and "unreachable or broke off" in res.reason
    finally:
        method.close()


@pytest.mark.slow
def test_split_equals_unsplit_on_smollm2():
    """The same exactness on the real model (30 blocks, split 2/26/2), through the gRPC body."""
    model, tok, _ = load_model("smollm2-135m")
    split = SplitLlama(model, 2, 2)
    split.freeze_all_but_tail()
    body_split = SplitLlama(model, 2, 2)  # the body only reads the middle blocks
    server = BodyServer(BodyServicer(body_split, rules(model="smollm2-135m", head_layers=2, tail_layers=2)))
    server.start("127.0.0.1:0")
    task = VerbalizerTask.build(tok, LABELS, prompt="Review: {text}\nSentiment:", max_length=48)
    inputs, labels = task.encode(TEXTS), torch.tensor([1, 0, 1, 0])
    prompt = split.initial_prompt(tok, 4, "Classify the review.").requires_grad_(True)

    class Real(Cfg):
        class S:
            head_layers, tail_layers, prompt_tokens = 2, 2, 4
        model, sfprompt = "smollm2-135m", S

    stream = BodyStream(server.address(), max_bytes=8 << 20, timeout_s=120)
    try:
        stream.open(Real, "c", 1)
        smashed, mask = split.head(inputs["input_ids"], inputs["attention_mask"], prompt)
        out = stream.forward(1, smashed, mask).requires_grad_(True)
        loss = F.cross_entropy(split.tail_label_logits(out, mask, task.label_token_ids), labels)
        loss.backward()
        smashed.backward(stream.backward(1, out.grad))
        stream.close()
    finally:
        stream.shutdown()
        server.stop(0)
    got = prompt.grad.clone()
    prompt.grad = None
    embeds, full_mask = split.insert_prompt(inputs["input_ids"], inputs["attention_mask"], prompt)
    logits = model(inputs_embeds=embeds, attention_mask=full_mask, logits_to_keep=1, use_cache=False).logits
    ref = F.cross_entropy(logits[:, -1, task.label_token_ids], labels)
    ref.backward()
    assert torch.allclose(loss, ref, atol=1e-5), (loss.item(), ref.item())
    assert torch.allclose(got, prompt.grad, atol=1e-6, rtol=1e-3)


def test_config_tls_pair_and_prune_score_are_checked():
    from protocols.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match="sfprompt.tls_key.*go together"):
        validate_config({"trainer": "sfprompt", "sfprompt": {"tls_cert": "body.pem"}})
    with pytest.raises(ConfigError, match="'el2n' or 'loss'"):
        validate_config({"sfprompt": {"prune_score": "gradnorm"}})
    assert validate_config({"sfprompt": {"tls_cert": "a.pem", "tls_key": "a.key"}}).sfprompt.tls_key == "a.key"


def test_pruning_keeps_the_top_fraction_within_each_label():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1, 0.2, 0.3])
    labels = [0, 0, 0, 1, 1, 1]
    assert prune_indices(scores, 0.3) == [0, 1]  # over all examples: one label only
    assert prune_indices(scores, 0.3, labels) == [0, 5]  # per label: the hardest of each


def test_per_label_quotas_add_up_to_the_overall_count():
    # 64 examples, 27 of one label: rounding up per label would keep 14 + 19 = 33 (3 batches of 16), not 32
    labels = [0] * 27 + [1] * 37
    scores = torch.arange(64, dtype=torch.float32)
    kept = prune_indices(scores, 0.5, labels)
    assert len(kept) == 32
    assert Counter(labels[i] for i in kept) == Counter({0: 14, 1: 18})  # 13.5 / 18.5: the tie goes to label 0
    assert kept == list(range(13, 27)) + list(range(46, 64))  # the highest scores of each label
    assert len(prune_indices(scores, 0.25, labels)) == 16
