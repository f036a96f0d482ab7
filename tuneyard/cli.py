"""The ``tuneyard`` command: serve, worker, infer, keys, jobs, export and the demo."""

from __future__ import annotations

import shutil
import signal
import sys
import tarfile
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from tuneyard.settings import get_settings

# Tracebacks never print local variables: `secrets create` holds a secret in them (older typers showed them).
app = typer.Typer(help="tuneyard: self-hosted fine-tuning with the OpenAI, Simplismart and Llama Stack APIs.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
keys_app = typer.Typer(help="Manage API keys (acts on this installation's database).", no_args_is_help=True)
jobs_app = typer.Typer(help="Inspect and control jobs through the HTTP API.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(jobs_app, name="jobs")
secrets_app = typer.Typer(help="Manage stored secrets (acts on this installation's database).", no_args_is_help=True)
app.add_typer(secrets_app, name="secrets")
webhooks_app = typer.Typer(help="Manage webhook endpoints (acts on this installation's database).",
                           no_args_is_help=True)
app.add_typer(webhooks_app, name="webhooks")
console = Console(stderr=True)
FINAL = ("succeeded", "failed", "cancelled")


def _logging() -> None:
    from tuneyard.api.serve import configure_logging

    configure_logging(get_settings())


@app.command()
def serve(host: Annotated[str | None, typer.Option(help="Bind address (default TUNEYARD_HOST or 127.0.0.1)")] = None,
          port: Annotated[int | None, typer.Option(help="Port (default TUNEYARD_PORT or 8000)")] = None,
          # None when neither flag is given: TUNEYARD_RUN_WORKER decides (a plain True here overrode it).
          worker: Annotated[bool | None, typer.Option(
              "--worker/--no-worker",
              help="Run the job worker inside the server (default TUNEYARD_RUN_WORKER or true)")] = None,
          api_workers: Annotated[int | None, typer.Option(
              help="HTTP processes sharing the port (default TUNEYARD_API_WORKERS; 0: one per core, at most 4); "
                   "the job worker runs once, in the serving process")] = None) -> None:
    """Serve the HTTP API (and, by default, run jobs on this machine)."""
    from tuneyard.api.serve import serve

    _logging()
    raise typer.Exit(serve(get_settings(), host=host, port=port, run_worker=worker, api_workers=api_workers))


@app.command("worker")
def worker_cmd() -> None:
    """Run only the job worker (no HTTP API), e.g. on a second GPU machine sharing the database."""
    from tuneyard.scheduler.worker import Worker
    from tuneyard.service import Services

    _logging()
    s = get_settings()
    services = Services.build(s)
    w = Worker(services.store, s, services.files)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    w.start()
    console.print(f"worker {w.worker_id} running; Ctrl-C to stop (running jobs checkpoint and go back to the "
                  "queue; with TUNEYARD_DRAIN_SECONDS=0 they keep running and are re-adopted)")
    done.wait()
    w.shutdown()


@keys_app.command("create")
def keys_create(org: Annotated[str, typer.Option(help="Organisation slug (created if new)")],
                name: Annotated[str | None, typer.Option(help="A label for the key")] = None,
                role: Annotated[str, typer.Option(help="admin or member")] = "admin") -> None:
    """Create an API key; the key is printed once, as the last line of stdout."""
    from tuneyard.domain.errors import TuneyardError
    from tuneyard.service import Services
    from tuneyard.service.auth import create_key

    if role not in ("admin", "member"):
        raise typer.BadParameter("role must be admin or member", param_hint="--role")
    services = Services.build(get_settings())
    try:
        key = create_key(services.store, org, name=name, role=role)
    except TuneyardError as e:
        raise typer.BadParameter(e.message, param_hint="--org") from e
    console.print(f"Created {'an' if role == 'admin' else 'a'} {role} key for organisation '{org}'. It is shown only "
                  "once:")
    print(key)


@secrets_app.command("create")
def secrets_create(org: Annotated[str, typer.Option(help="Organisation slug")],
                   name: Annotated[str, typer.Option(help="The name jobs refer to it by (secret_id)")],
                   type_: Annotated[str, typer.Option("--type", help="aws, hf or wandb")],
                   value: Annotated[str | None, typer.Option(help="The secret as a JSON object")] = None,
                   value_file: Annotated[Path | None, typer.Option(help="Read the JSON from this file ('-': stdin)")]
                   = None) -> None:
    """Store a secret, encrypted; e.g. --type aws --value '{"access_key_id": ..., "secret_access_key": ...}'."""
    import json
    import sys

    from tuneyard.domain.errors import TuneyardError
    from tuneyard.service import Services
    from tuneyard.service.auth import Principal, ensure_org

    if (value is None) == (value_file is None):
        raise typer.BadParameter("give exactly one of --value and --value-file", param_hint="--value")
    try:
        raw = value if value is not None else (sys.stdin.read() if str(value_file) == "-" else value_file.read_text())
    except OSError as e:
        raise typer.BadParameter(f"cannot read {value_file}: {e.strerror}", param_hint="--value-file") from None
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as e:
        # The message names the position only: the text may be the secret itself.
        raise typer.BadParameter(f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})",
                                 param_hint="--value") from None
    services = Services.build(get_settings())
    try:
        ensure_org(services.store, org)
        row = services.secrets.create(Principal(org_id=org, key_id="cli", role="admin"), name, type_, parsed)
    except TuneyardError as e:
        raise typer.BadParameter(e.message, param_hint=f"--{e.param or 'value'}") from e
    console.print(f"Stored {row.type} secret '{row.name}' ({row.id}) for organisation '{org}'.")


@secrets_app.command("list")
def secrets_list(org: Annotated[str, typer.Option()]) -> None:
    """List an organisation's secrets (names and types; values are never shown)."""
    from tuneyard.service import Services
    from tuneyard.service.auth import Principal

    services = Services.build(get_settings())
    for row in services.secrets.list(Principal(org_id=org, key_id="cli", role="admin")):
        print(f"{row.name}\t{row.type}\t{row.id}")


@secrets_app.command("delete")
def secrets_delete(org: Annotated[str, typer.Option()], name: Annotated[str, typer.Option()]) -> None:
    """Delete a secret."""
    from tuneyard.domain.errors import TuneyardError
    from tuneyard.service import Services
    from tuneyard.service.auth import Principal

    services = Services.build(get_settings())
    try:
        services.secrets.delete(Principal(org_id=org, key_id="cli", role="admin"), name)
    except TuneyardError as e:
        raise typer.BadParameter(e.message, param_hint="--name") from e
    console.print(f"Deleted secret '{name}'.")


@webhooks_app.command("create")
def webhooks_create(org: Annotated[str, typer.Option(help="Organisation slug")],
                    url: Annotated[str, typer.Option(help="Where events are POSTed")],
                    event: Annotated[list[str] | None, typer.Option(
                        help="An event to send (repeat; default the three fine_tuning.job.* end events)")] = None
                    ) -> None:
    """Register an endpoint; prints its signing secret, which is shown only this once."""
    from tuneyard.domain.errors import TuneyardError
    from tuneyard.service import Services
    from tuneyard.service.auth import Principal, ensure_org

    services = Services.build(get_settings())
    try:
        ensure_org(services.store, org)
        info = services.webhooks.create(Principal(org_id=org, key_id="cli", role="admin"), url, event)
    except TuneyardError as e:
        raise typer.BadParameter(e.message, param_hint=f"--{e.param or 'url'}") from e
    console.print(f"Registered webhook endpoint {info.id} for {', '.join(info.events)}; its signing secret "
                  "(shown only now) is on stdout.")
    print(info.secret)


@webhooks_app.command("list")
def webhooks_list(org: Annotated[str, typer.Option()]) -> None:
    """List an organisation's endpoints (id, URL, events)."""
    from tuneyard.service import Services
    from tuneyard.service.auth import Principal

    services = Services.build(get_settings())
    for info in services.webhooks.list(Principal(org_id=org, key_id="cli", role="admin")):
        print(f"{info.id}\t{info.url}\t{','.join(info.events)}")


@webhooks_app.command("delete")
def webhooks_delete(org: Annotated[str, typer.Option()], id_: Annotated[str, typer.Option("--id")]) -> None:
    """Delete an endpoint and its queued deliveries."""
    from tuneyard.domain.errors import TuneyardError
    from tuneyard.service import Services
    from tuneyard.service.auth import Principal

    services = Services.build(get_settings())
    try:
        services.webhooks.delete(Principal(org_id=org, key_id="cli", role="admin"), id_)
    except TuneyardError as e:
        raise typer.BadParameter(e.message, param_hint="--id") from e
    console.print(f"Deleted webhook endpoint {id_}.")


@app.command("audit")
def audit(org: Annotated[str, typer.Option(help="Organisation slug")],
          limit: Annotated[int, typer.Option(help="How many entries, newest first")] = 50) -> None:
    """Show an organisation's audit log: who created, cancelled, deleted what (acts on this database)."""
    import datetime

    from tuneyard.service import Services
    from tuneyard.service.audit import CLI
    from tuneyard.service.auth import Principal

    services = Services.build(get_settings())
    rows, _ = services.audit.list(Principal(org_id=org, key_id=CLI, role="admin"), after=None, limit=limit)
    t = Table("when (UTC)", "actor", "action", "object")
    for r in rows:
        when = datetime.datetime.fromtimestamp(r.created_at, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
        t.add_row(when, r.actor, r.action, r.object_id or "")
    Console().print(t)


@keys_app.command("list")
def keys_list(org: Annotated[str, typer.Option()]) -> None:
    """List an organisation's keys (ids only; secrets are never stored)."""
    from tuneyard.service import Services
    from tuneyard.service.auth import list_keys

    t = Table("id", "name", "role", "status")
    for k in list_keys(Services.build(get_settings()).store, org):
        t.add_row(k.id, k.name or "", k.role, "revoked" if k.revoked_at else "active")
    Console().print(t)


@keys_app.command("revoke")
def keys_revoke(key_id: str, org: Annotated[str, typer.Option()]) -> None:
    """Revoke a key by its id (the part after 'ty-')."""
    from tuneyard.service import Services
    from tuneyard.service.auth import revoke_key

    if not revoke_key(Services.build(get_settings()).store, org, key_id):
        console.print(f"[red]no active key {key_id} in organisation {org}")
        raise typer.Exit(1)
    console.print(f"revoked {key_id}")


def _client(base_url: str | None, api_key: str | None):
    from tuneyard.client import Client

    s = get_settings()
    key = api_key or s.api_key
    if not key:
        raise typer.BadParameter("give --api-key or set TUNEYARD_API_KEY", param_hint="--api-key")
    return Client(base_url or s.base_url, key)


BaseUrl = Annotated[str | None, typer.Option("--base-url", help="Server URL (TUNEYARD_BASE_URL)")]
ApiKey = Annotated[str | None, typer.Option("--api-key", help="API key (TUNEYARD_API_KEY)")]


@jobs_app.command("list")
def jobs_list(base_url: BaseUrl = None, api_key: ApiKey = None, limit: int = 20) -> None:
    """List recent jobs."""
    t = Table("id", "status", "model", "steps", "fine_tuned_model")
    for j in _client(base_url, api_key).jobs(limit):
        t.add_row(j["id"], j["status"], j["model"], f"{j.get('trained_steps') or 0}/{j.get('total_steps') or '?'}",
                  j.get("fine_tuned_model") or "")
    Console().print(t)


@jobs_app.command("get")
def jobs_get(job_id: str, base_url: BaseUrl = None, api_key: ApiKey = None) -> None:
    """Show one job as JSON."""
    Console().print_json(data=_client(base_url, api_key).job(job_id))


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, base_url: BaseUrl = None, api_key: ApiKey = None) -> None:
    """Cancel a job."""
    console.print(f"{job_id}: {_client(base_url, api_key).cancel(job_id)['status']}")


@jobs_app.command("events")
def jobs_events(job_id: str, base_url: BaseUrl = None, api_key: ApiKey = None,
                follow: Annotated[bool, typer.Option("--follow", "-f", help="Show a progress bar until done")] = False
                ) -> None:
    """Print a job's events (oldest first); with --follow, until the job finishes."""
    c = _client(base_url, api_key)
    if not follow:
        for e in c.all_events(job_id):
            print(f"[{e['level']}] {e['message']}")
        return
    status = follow_job(c, job_id)
    raise typer.Exit(0 if status == "succeeded" else 1)


def follow_job(client, job_id: str, print_events: bool = True) -> str:
    """Show a progress bar and the job's events until it ends; return the final status."""
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TimeRemainingColumn(), console=console, transient=False) as bar:
        task = bar.add_task(job_id, total=None)
        job = {"status": "?"}
        for job, new in client.follow(job_id):
            if print_events:
                for e in new:
                    bar.console.print(f"  [{e['level']}] {e['message']}")
            bar.update(task, total=job.get("total_steps") or None, completed=job.get("trained_steps") or 0,
                       description=f"{job_id} {job['status']}")
    return job["status"]


Checkpoint = Annotated[str | None, typer.Option("--checkpoint", help="A checkpoint id (ftckpt-...) instead of "
                                                                  "the final model")]


@jobs_app.command("download")
def jobs_download(job_id: str, base_url: BaseUrl = None, api_key: ApiKey = None,
                  out: Annotated[Path, typer.Option(help="Directory to unpack the adapter/model into")] = Path("."),
                  checkpoint: Checkpoint = None) -> None:
    """Download a finished job's adapter (or model) and tokenizer, or one checkpoint's, unpacked under
    --out/<job or checkpoint id>/."""
    out.mkdir(parents=True, exist_ok=True)
    name = checkpoint or job_id
    archive = _client(base_url, api_key).download_artifacts(job_id, out / f"{name}.tar.gz", checkpoint)
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    archive.unlink()
    console.print(f"saved to {out / name}")
    print(out / name)


@app.command("export")
def export(job_id: str, base_url: BaseUrl = None, api_key: ApiKey = None,
           out: Annotated[Path, typer.Option(help="Directory to write the model to")] = Path("."),
           merged: Annotated[bool, typer.Option("--merged", help="Merge the adapter into its base: one model "
                                                "that loads with AutoModelForCausalLM alone")] = False,
           base: Annotated[str | None, typer.Option(help="The base model to merge into (default: the job's "
                                                    "model, as the server names it)")] = None,
           checkpoint: Checkpoint = None,
           push_to_hub: Annotated[str | None, typer.Option("--push-to-hub", help="Export on the server and push it "
                                                          "to this Hub repository (namespace/name)")] = None,
           secret: Annotated[str | None, typer.Option("--secret", help="The organisation's stored 'hf' secret "
                                                      "holding the Hub token (default: the one named hf)")] = None,
           public: Annotated[bool, typer.Option("--public", help="Create the Hub repository public (default: "
                                                "private)")] = False) -> None:
    """Export a finished job's model (or one checkpoint's) to --out: its adapter (loads with
    PeftModel.from_pretrained), or --merged; with --push-to-hub the server exports it and pushes it to the Hub."""
    if push_to_hub is not None:
        from tuneyard.client import ApiError

        try:
            done = _client(base_url, api_key).export(job_id, merged=merged, checkpoint=checkpoint, push_to_hub={
                "repo_id": push_to_hub, "secret_id": secret, "private": not public})
        except ApiError as e:
            console.print(f"[red]export failed, nothing was pushed: {e}[/red]")
            raise typer.Exit(1) from None
        console.print(f"pushed {done['id']} to {done['hub']['url']}")
        print(done["hub"]["url"])
        return
    if secret is not None or public:
        raise typer.BadParameter("--secret and --public go with --push-to-hub", param_hint="--secret")
    import tempfile

    client = _client(base_url, api_key)
    job = client.job(job_id)
    name = checkpoint or job_id
    with tempfile.TemporaryDirectory() as tmp:
        archive = client.download_artifacts(job_id, Path(tmp) / f"{name}.tar.gz", checkpoint)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        trained = Path(tmp) / name
        if merged:
            from tuneyard.inference.export import merge

            merge(trained, base or job["model"], out)
        else:
            shutil.copytree(trained, out, dirs_exist_ok=True)
    console.print(f"saved to {out}")
    print(out)


@app.command("infer")
def infer(port: Annotated[int | None, typer.Option(help="Loopback port (default TUNEYARD_INFERENCE_PORT; 0: any)")]
          = None) -> None:
    """Run the inference process apart from the server (same TUNEYARD_HOME): it serves the server's chat and
    completion requests."""
    from tuneyard.inference.server import serve as serve_inference

    serve_inference(get_settings(), port)


@app.command()
def demo(model: Annotated[str | None, typer.Option(help="A hub id or local model dir instead of the tiny "
                                                         "built-in model")] = None,
         home: Annotated[Path | None, typer.Option(help="State directory for the demo server (default: a new "
                                                        "temporary directory)")] = None,
         port: Annotated[int, typer.Option(help="Port for the demo server (0: any free port)")] = 0,
         epochs: Annotated[int, typer.Option(help="Training epochs")] = 0) -> None:
    """Run a real fine-tuning job through the HTTP API on a tiny model and sample data, with progress."""
    from tuneyard.demo.run import run_demo

    sys.exit(run_demo(model=model, home=home, port=port, epochs=epochs or None, console=console))


if __name__ == "__main__":
    app()
