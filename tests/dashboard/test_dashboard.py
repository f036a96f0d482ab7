"""The web dashboard in headless Chromium (Debian's, driven by Playwright) against a real `tuneyard serve` with its
worker and the tiny model: sign-in, uploads, a job trained to the end with its loss chart, pause / resume, cancel,
a failed job's error, members' scoping, and every request the page makes being a documented endpoint."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server
from tuneyard.demo.tiny import write_sample_jsonl

CHROMIUM = "/usr/bin/chromium"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (scripts/test.sh)")]

# The OpenAI fine-tuning API's documented endpoints (docs: /work/shared/reference/api-dialects.md, OpenAI's API
# reference), and the one documented tuneyard extension the dashboard uses: a checkpoint's weights as a download.
ID = r"[A-Za-z0-9_.:-]+"
DOCUMENTED = [
    ("GET", r"/v1/files"), ("POST", r"/v1/files"), ("GET", rf"/v1/files/{ID}"), ("GET", rf"/v1/files/{ID}/content"),
    ("GET", r"/v1/fine_tuning/jobs"), ("POST", r"/v1/fine_tuning/jobs"), ("GET", rf"/v1/fine_tuning/jobs/{ID}"),
    *(("POST", rf"/v1/fine_tuning/jobs/{ID}/{a}") for a in ("cancel", "pause", "resume")),
    ("GET", rf"/v1/fine_tuning/jobs/{ID}/events"), ("GET", rf"/v1/fine_tuning/jobs/{ID}/checkpoints"),
    ("GET", r"/v1/models"), ("GET", rf"/v1/models/{ID}"), ("POST", r"/v1/chat/completions"),
]
EXTENSIONS = [("GET", rf"/v1/fine_tuning/jobs/{ID}/checkpoints/{ID}/content")]
PAGE = [("GET", r"/dashboard/"), ("GET", r"/dashboard/static/[A-Za-z0-9_./-]+\.(js|css)")]
STEPS = {"n_epochs": "3", "batch_size": "4", "learning_rate_multiplier": "20"}


@pytest.fixture(scope="module")
def dash(tmp_path_factory, tiny_model_dir):
    """One server (worker on) with an admin and a member key of one organisation."""
    srv = Server(tmp_path_factory.mktemp("dash-home"), {"TUNEYARD_RATE_LIMIT_PER_SECOND": "0"})
    shutil.copytree(tiny_model_dir, srv.local / "tiny-llama")
    srv.model_dir = str(srv.local / "tiny-llama")

    def key(role: str) -> str:
        out = subprocess.run([sys.executable, "-m", "tuneyard.cli", "keys", "create", "--org", "acme", "--role", role],
                             env=srv.env, capture_output=True, text=True, check=True)
        return out.stdout.strip().splitlines()[-1]

    srv.admin, srv.member = key("admin"), key("member")
    srv.requests, srv.console = [], []
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture()
def page(browser, dash):
    """A fresh browser session (own sessionStorage) on the dashboard; its requests and console are recorded."""
    ctx = browser.new_context(viewport={"width": 1366, "height": 900}, color_scheme="light", accept_downloads=True)
    pg = ctx.new_page()
    pg.on("request", lambda r: dash.requests.append((r.method, r.url)))
    pg.on("console", lambda m: dash.console.append((m.type, m.text)))
    pg.on("pageerror", lambda e: dash.console.append(("pageerror", str(e))))
    pg.set_default_timeout(20_000)
    pg.goto(f"{dash.base_url}/dashboard/")
    yield pg
    ctx.close()


def api(dash: Server, method: str, path: str, key: str | None = None, **kw) -> httpx.Response:
    r = httpx.request(method, f"{dash.base_url}/v1{path}", headers={"Authorization": f"Bearer {key or dash.admin}"},
                      timeout=30, **kw)
    assert r.status_code < 300, r.text
    return r


def upload(dash: Server, path: Path, key: str | None = None) -> str:
    with path.open("rb") as fh:
        return api(dash, "POST", "/files", key, files={"file": (path.name, fh)}, data={"purpose": "fine-tune"}
                   ).json()["id"]


def sign_in(page, key: str) -> None:
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.locator("#jobs").wait_for()


def wait_status(page, statuses: set[str], timeout: float = 240) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = page.locator("#job-status").inner_text().strip().replace(" ", "_")
        if s in statuses:
            return s
        time.sleep(0.3)
    raise AssertionError(f"job still {s} after {timeout} s")


def confirm(page, button: str, ok: bool = True) -> None:
    page.get_by_role("button", name=button, exact=True).click()
    page.locator("#confirm").get_by_role("button", name="Confirm" if ok else "Keep it").click()


def test_page_is_served_with_a_strict_policy_and_refuses_a_wrong_key(dash, page):
    r = httpx.get(f"{dash.base_url}/dashboard/")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "style-src 'self'" in csp
    assert "unsafe-inline" not in csp and "<script>" not in r.text and " style=" not in r.text
    assert httpx.get(f"{dash.base_url}/dashboard/static/../__init__.py").status_code == 404
    page.get_by_label("API key").fill("sk-not-a-key")
    page.get_by_role("button", name="Sign in").click()
    page.locator("#signin-error").filter(has_text="API key").wait_for()
    sign_in(page, dash.admin)
    assert page.evaluate("sessionStorage.getItem('tuneyard.apiKey')") == dash.admin
    assert page.evaluate("localStorage.length") == 0 and page.evaluate("document.cookie") == ""


def test_upload_names_the_bad_line_then_a_good_job_trains_with_its_real_loss_curve(dash, page, tmp_path):
    sign_in(page, dash.admin)
    good = write_sample_jsonl(tmp_path / "train.jsonl")
    bad = tmp_path / "bad.jsonl"
    lines = good.read_text().splitlines()
    bad.write_text("\n".join([lines[0], '{"messages": [{"role": "user"}]}', *lines[1:]]) + "\n")
    page.get_by_role("link", name="New job").first.click()
    page.locator("#training_file-upload").set_input_files(str(bad))
    refused = page.locator("#training_file-status [role=alert]")
    refused.wait_for()
    assert "bad.jsonl was refused" in refused.inner_text() and re.search(r"Example 2\b", refused.inner_text())
    assert page.locator("#training_file-select").get_attribute("aria-invalid") == "true"
    page.locator("#training_file-upload").set_input_files(str(good))
    page.locator("#training_file-status").get_by_text("uploaded as").wait_for()
    page.locator("#validation_file-upload").set_input_files(str(good))
    page.locator("#validation_file-status").get_by_text("uploaded as").wait_for()
    assert page.locator("#hp-n_epochs").input_value() == "auto"  # the defaults are shown as "auto"
    page.get_by_label("Model", exact=True).fill(dash.model_dir)
    page.get_by_label("Suffix").fill("dash")
    page.get_by_label("Metadata").fill("experiment=dashboard")
    for name, value in STEPS.items():
        page.locator(f"#hp-{name}").fill(value)
    page.get_by_role("button", name="Create job").click()
    page.wait_for_url(re.compile(r"#/jobs/ftjob-"))
    job_id = page.url.rsplit("/", 1)[-1]
    assert wait_status(page, {"succeeded", "failed", "cancelled"}) == "succeeded"
    page.locator("#checkpoints tbody tr[data-checkpoint]").first.wait_for()

    job = api(dash, "GET", f"/fine_tuning/jobs/{job_id}").json()
    assert job["metadata"] == {"experiment": "dashboard"} and job["hyperparameters"]["n_epochs"] == 3
    events = api(dash, "GET", f"/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    metrics = [e["data"] for e in reversed(events) if e["type"] == "metrics"]
    want_train = {d["step"]: d["train_loss"] for d in metrics if d.get("train_loss") is not None}
    want_valid = {d["step"]: d["valid_loss"] for d in metrics if d.get("valid_loss") is not None}
    assert len(want_train) >= 5 and want_valid
    page.wait_for_function("n => document.querySelectorAll('table[data-chart=loss] tbody tr').length >= n",
                           arg=len(want_train | want_valid))
    rows = page.eval_on_selector_all("table[data-chart=loss] tbody tr", """rows => rows.map(r => [
        Number(r.querySelector('th').textContent), ...[...r.querySelectorAll('td')].map(td => td.dataset.value)])""")
    got_train = {s: float(t) for s, t, _ in rows if t != ""}
    got_valid = {s: float(v) for s, _, v in rows if v != ""}
    assert got_train == want_train and got_valid == want_valid
    # uPlot drew it: a canvas with the plot, sized, inside the chart.
    assert page.locator("figure[data-chart-figure=loss] canvas").bounding_box()["width"] > 200
    assert page.locator("table[data-chart=learning_rate] tbody tr").count() >= 5
    assert page.locator("[data-hp=n_epochs]").inner_text() == "3"
    assert page.locator("#events li").count() == len(events)
    cks = api(dash, "GET", f"/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert page.locator("#checkpoints tbody tr[data-checkpoint]").count() == len(cks)
    with page.expect_download() as dl:
        page.locator("#checkpoints").get_by_role("button").first.click()
    assert dl.value.suggested_filename.endswith(".tar.gz") and Path(dl.value.path()).stat().st_size > 0
    assert page.get_by_role("heading", name="Try the model").is_visible()
    if shots := os.environ.get("TUNEYARD_DASHBOARD_SCREENSHOTS"):
        page.screenshot(path=f"{shots}/dashboard-job.png", full_page=True)
        page.emulate_media(color_scheme="dark")
        page.screenshot(path=f"{shots}/dashboard-job-dark.png", full_page=True)
        page.emulate_media(color_scheme="light")
    page.get_by_role("link", name="All jobs").click()
    row = page.locator(f"#jobs tr[data-job='{job_id}']")
    assert "succeeded" in row.inner_text() and "experiment: dashboard" in row.inner_text()
    page.get_by_label("Search").fill("no-such-thing")
    assert row.count() == 0
    page.get_by_label("Search").fill("dash")
    page.get_by_label("Status").select_option("succeeded")
    assert row.count() == 1
    dash.succeeded = job_id


def test_pause_resume_one_job_and_cancel_another(dash, page, tmp_path):
    sign_in(page, dash.admin)
    f = upload(dash, write_sample_jsonl(tmp_path / "t.jsonl"))
    body = {"model": dash.model_dir, "training_file": f,
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 40, "batch_size": 4}}}}
    long_job = api(dash, "POST", "/fine_tuning/jobs", json=body).json()["id"]
    waiting = api(dash, "POST", "/fine_tuning/jobs", json=body).json()["id"]  # queued behind it: one CPU slot
    page.goto(f"{dash.base_url}/dashboard/#/jobs/{waiting}")
    wait_status(page, {"validating_files", "queued"})
    confirm(page, "Cancel", ok=False)  # "Keep it" changes nothing
    assert api(dash, "GET", f"/fine_tuning/jobs/{waiting}").json()["status"] in ("validating_files", "queued")
    confirm(page, "Cancel")
    assert wait_status(page, {"cancelled"}, 30) == "cancelled"
    assert page.get_by_role("button", name="Pause", exact=True).is_disabled()

    page.goto(f"{dash.base_url}/dashboard/#/jobs/{long_job}")
    wait_status(page, {"running"})
    page.wait_for_function("() => document.querySelectorAll('table[data-chart=loss] tbody tr').length >= 2",
                           timeout=180_000)
    confirm(page, "Pause")
    assert wait_status(page, {"paused"}, 120) == "paused"
    assert page.locator("#events").get_by_text("Fine-tuning job paused").first.is_visible()
    confirm(page, "Resume")
    assert wait_status(page, {"queued", "running"}, 30) in ("queued", "running")
    assert page.get_by_role("button", name="Resume", exact=True).is_disabled()
    api(dash, "POST", f"/fine_tuning/jobs/{long_job}/cancel")  # free the CPU for the next test
    assert wait_status(page, {"cancelled"}, 60) == "cancelled"


def test_a_failed_job_shows_its_error_and_field(dash, page, tmp_path):
    pref = tmp_path / "pref.jsonl"
    pref.write_text(json.dumps({"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."}) + "\n")
    job = api(dash, "POST", "/fine_tuning/jobs", json={"model": dash.model_dir, "training_file": upload(dash, pref)}
              ).json()["id"]
    sign_in(page, dash.admin)
    page.goto(f"{dash.base_url}/dashboard/#/jobs/{job}")
    assert wait_status(page, {"failed", "succeeded", "cancelled"}, 120) == "failed"
    alert = page.locator("#job-error [role=alert]")
    assert page.locator("#error-param").inner_text() == "training_file"
    assert "preference (DPO) rows" in alert.inner_text()
    assert all(page.get_by_role("button", name=b, exact=True).is_disabled() for b in ("Cancel", "Pause", "Resume"))


def test_a_member_sees_only_their_own_jobs(dash, page, tmp_path):
    f = upload(dash, write_sample_jsonl(tmp_path / "m.jsonl"), dash.member)
    mine = api(dash, "POST", "/fine_tuning/jobs", dash.member, json={"model": dash.model_dir, "training_file": f,
                                                                     "suffix": "member"}).json()["id"]
    api(dash, "POST", f"/fine_tuning/jobs/{mine}/cancel", dash.member)
    admins = [j["id"] for j in api(dash, "GET", "/fine_tuning/jobs", params={"limit": 100}).json()["data"]]
    assert dash.succeeded in admins and mine in admins
    sign_in(page, dash.member)
    page.locator(f"#jobs tr[data-job='{mine}']").wait_for()
    assert page.locator("#jobs tbody tr").count() == 1
    page.goto(f"{dash.base_url}/dashboard/#/jobs/{dash.succeeded}")
    page.get_by_role("heading", name="Job not found").wait_for()
    page.goto(f"{dash.base_url}/dashboard/#/compare/{dash.succeeded},{mine}")
    page.locator("#compare-picks").wait_for()
    assert page.locator("#compare-picks input").count() == 1


def test_compare_draws_several_jobs_and_chat_answers(dash, page):
    sign_in(page, dash.admin)
    done = [j["id"] for j in api(dash, "GET", "/fine_tuning/jobs", params={"limit": 100}).json()["data"]
            if j["status"] in ("succeeded", "cancelled") and j.get("trained_steps")]
    assert dash.succeeded in done and len(done) >= 2
    page.goto(f"{dash.base_url}/dashboard/#/compare/{','.join(done[:2])}")
    page.wait_for_function("() => document.querySelectorAll('table[data-chart=compare] thead th').length >= 3")
    heads = page.locator("table[data-chart=compare] thead th").all_text_contents()
    assert any(done[0] in h for h in heads) and any(done[1] in h for h in heads)
    page.goto(f"{dash.base_url}/dashboard/#/jobs/{dash.succeeded}")
    page.get_by_label("Message").fill("What is the capital of France?")
    page.get_by_role("button", name="Send").click()
    page.locator("#chat-log li").nth(1).wait_for(timeout=120_000)
    assert page.locator("#chat-log li").nth(1).inner_text().startswith("Model:")


def test_every_request_is_a_documented_endpoint_and_nothing_broke_the_policy(dash):
    """Runs last: every request any test's page made."""
    allowed = [(m, re.compile(p + r"(\?.*)?$")) for m, p in DOCUMENTED + EXTENSIONS + PAGE]
    assert len(dash.requests) > 50
    bad = []
    for method, url in dash.requests:
        assert url.startswith(dash.base_url), url  # nothing from another origin (no CDN)
        path = url[len(dash.base_url):]
        if not any(m == method and p.match(path) for m, p in allowed) and not path.startswith("/dashboard/#"):
            bad.append((method, path))
        assert dash.admin not in url and dash.member not in url  # the key never goes in a URL
    assert not bad, bad
    problems = [t for kind, t in dash.console if kind in ("error", "pageerror")
                and not t.startswith("Failed to load resource")]
    assert not [t for t in problems if "Content Security Policy" in t or "Refused" in t], problems
    assert not [t for kind, t in dash.console if kind == "pageerror"], dash.console
