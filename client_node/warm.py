"""A warm ClientApp process: one long-lived process runs every message this data owner's node receives.

Flower 1.41's SuperNode (``--isolation subprocess``, its default) starts a new ``flwr-clientapp`` process
for every message: a Python start, the torch/transformers/flwr imports and a model load, every round.
With ``--isolation process`` the SuperNode serves its Runtime API and waits for an outside executor to
claim each task. This module is that executor, and it runs each task in its own process instead of
spawning one: it claims tasks with the same ``AcquireTask`` call as Flower's SuperExec and moves the
message with Flower's own helpers (``flwr.supernode.runtime.run_clientapp``), so the SuperNode sees what
a ``flwr-clientapp`` process would do. Between messages the imports, the model and tokenizer
(``fedadapt.models`` caches) stay in memory. The node's state still travels in ``context.state``, so a
restarted worker continues where the last one stopped.

Only fedadapt's own ClientApp runs here, the one installed on this machine: a run whose FAB names another
ClientApp is answered with an error, so a coordinator cannot make a data owner's node run other code.

    python -m client_node.warm --runtime-api-address 127.0.0.1:9094 --insecure --parent-pid PID
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import time
import tomllib
import zipfile

CLIENTAPP_REF = "client_node.app:app"
log = logging.getLogger("fedadapt.warm")


def fab_clientapp_ref(fab_content: bytes) -> str:
    """The ClientApp a FAB names (``[tool.flwr.app.components] clientapp``), "" if it names none."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab_content)) as z:
            name = next((n for n in z.namelist() if n.rsplit("/", 1)[-1] == "pyproject.toml" and n.count("/") <= 1), "")
            config = tomllib.loads(z.read(name).decode()) if name else {}
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return ""
    return str(config.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {}).get("clientapp", ""))


def _runtime_client(address: str, insecure: bool, certificates: bytes | None, *interceptors):
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(server_address=address, insecure=insecure,
                                                 root_certificates=certificates, interceptors=list(interceptors),
                                                 retry_invoker=make_simple_http_retry_invoker())


def run_task(address: str, token: str, *, insecure: bool, certificates: bytes | None = None) -> str:
    """Run one claimed task in this process; returns its final status ("completed" / "failed")."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    from client_node.app import app

    client = _runtime_client(address, insecure, certificates,
                             RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                             RuntimeTokenHttpInterceptor(token))
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        log.info("task for run %s: running the ClientApp (warm process)", run.run_id)
        ref = fab_clientapp_ref(fab.content)
        if ref != CLIENTAPP_REF:
            raise PermissionError(f"this node runs only fedadapt's ClientApp ({CLIENTAPP_REF}); the run's app names {ref!r}")
        reply = app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # noqa: BLE001  (one failed message is answered with an error; the worker goes on)
        log.error("ClientApp raised %s: %s", type(ex).__name__, ex)
        details = f"{type(ex)}:<'{ex}'>"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception as ex:  # noqa: BLE001
            log.error("could not push the reply: %s", ex)
            status = SubStatus.FAILED
        push_task_output(client=client, context=context, sub_status=status, details=details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
    return status


def serve(address: str, *, insecure: bool, root_certificates: str = "", poll_s: float = 0.2,
          parent_pid: int | None = None, max_tasks: int | None = None) -> int:
    """Claim and run ClientApp tasks from the SuperNode at ``address`` until stopped; returns tasks run."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

    import client_node.app  # noqa: F401  (the imports every message would pay, paid once)

    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    certificates = open(root_certificates, "rb").read() if root_certificates and not insecure else None
    claims = _runtime_client(address, insecure, certificates, RuntimeVersionHttpInterceptor(component_name="SuperExec"))
    done = 0
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    log.info("warm ClientApp process ready; claiming tasks from %s every %.2fs", address, poll_s)
    try:
        while max_tasks is None or done < max_tasks:
            res = claims.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
            if res.HasField("task") and res.token:
                run_task(address, res.token, insecure=insecure, certificates=certificates)
                done += 1
            else:
                time.sleep(poll_s)
    finally:
        claims.close()
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m client_node.warm", description=__doc__.split("\n\n")[0])
    p.add_argument("--runtime-api-address", default="127.0.0.1:9094", help="the SuperNode's Runtime API (its --port)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP to the SuperNode (it runs on this machine)")
    p.add_argument("--root-certificates", default="", help="CA of the SuperNode's Runtime API TLS certificate")
    p.add_argument("--poll-interval", type=float, default=0.2, help="seconds between claims when idle (default 0.2)")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process exits")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    try:
        serve(args.runtime_api_address, insecure=args.insecure, root_certificates=args.root_certificates,
              poll_s=args.poll_interval, parent_pid=args.parent_pid)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
