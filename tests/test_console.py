"""The web console (docs/console.md) in a real headless browser: Debian's chromium driven by
Playwright, the console a real ``animus web`` process, the engine a real engine, all on the
embedded Postgres.

Screenshots of the main pages are saved under ``$ANIMUS_SCREENSHOTS`` (default: the test's
temporary directory); ``ANIMUS_SCREENSHOTS=docs/images`` refreshes the documentation's.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote
from uuid import UUID

import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from animus_core import Db, Faculty, Focus, NewWorkItem
from animus_core.faculties.embedders import HashingEmbedder
from animus_core.store.memory import Memory
from animus_core.store.roles import setup_roles
from animus_core.values.errors import PermissionDenied
from animus_core.values.schedules import Schedule
from animus_core.web import LoginLimiter, add_person
from animus_core.web.people import person_url
from benchmarks.bench_console import fill
from tests.conftest import TEMPLATE, scratch_database
from tests.engine_helpers import free_port, run_engine, server_process, wait_finished, wait_until

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
#: as root, headless, and nothing that reaches for the network
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
SECRET = "console-test-secret-" + "0123456789abcdef" * 2
#: secrets the console's process or an engine has, which no page may show
API_KEY = "sk-ant-console-test-never-shown-0123456789"
TOKEN = "console-token-never-shown-9876543210"
TRACES = "http://traces.example/trace/{trace_id}"
PASSWORD = "correct horse battery staple"
#: database login roles are the server's, not one database's: names of this module's own
ALICE, BOB, OLGA, ADA = "console_alice", "console_bob", "console_olga", "console_ada"

if not Path(CHROMIUM).exists():  # .ci/run installs it; without it these tests cannot run
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


class Slow(Faculty):
    name = "console-slow"
    accepts = ("console.slow",)

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        await asyncio.sleep(0.3)
        return {"done": True}


class Example(Faculty):
    name = "console-example"
    accepts = ("console.example",)
    example = {"text": "hello from the example"}

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        first = await focus.step("first", lambda: {"n": 1})
        return {"echo": focus.params, "first": first}


class Needy(Faculty):
    name = "console-needy"
    accepts = ("console.needy",)
    requires_env = ("CONSOLE_NEVER_SET",)


class Ticking(Faculty):
    name = "console-ticking"
    accepts = ("console.tick",)
    schedules = (Schedule(name="console-hourly", work_type="console.tick", every=3600),)


class Leaky(Faculty):
    """Returns a secret of its own: the engine redacts it, and no page shows it."""

    name = "console-leaky"
    accepts = ("console.leaky",)
    secrets = ("CONSOLE_TEST_TOKEN",)

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        return {"token": os.environ["CONSOLE_TEST_TOKEN"]}


class Waits(Faculty):
    name = "console-waits"
    accepts = ("console.wait",)

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        return {"got": await focus.wait_for("go")}


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = os.environ.get("ANIMUS_SCREENSHOTS")
    path = Path(where) if where else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
async def console_db(server_url: str, template_url: str) -> AsyncIterator[tuple[str, Db]]:
    async with scratch_database(server_url, template=TEMPLATE) as url:
        db = await Db.connect(url, max_size=10, actor="test")
        try:
            for name, role in ((ALICE, "approver"), (BOB, "reader"), (OLGA, "operator"),
                               (ADA, "admin")):
                await add_person(db, SECRET.encode(), name, role, PASSWORD)
            yield url, db
        finally:
            await db.close()


@contextlib.asynccontextmanager
async def console_process(url: str, home: Path, log: Path,
                          port: int | None = None) -> AsyncIterator[tuple[str, subprocess.Popen[bytes]]]:
    """``animus web`` over the database ``url`` on ``port`` (a free one if None): its base URL
    and process, stopped (if still running) at the end."""
    port = port or free_port()
    env = {**os.environ, "DATABASE_URL": url, "ANIMUS_HOME": str(home),
           "ANIMUS_WEB_SECRET": SECRET, "ANIMUS_TRACE_URL": TRACES, "ANTHROPIC_API_KEY": API_KEY}
    argv = [sys.executable, "-m", "animus_core", "web", "--bind", f"127.0.0.1:{port}"]
    async with server_process(argv, port, log, env, "the console") as proc:
        yield f"http://127.0.0.1:{port}", proc


@pytest.fixture(scope="module")
async def console(console_db: tuple[str, Db], animus_home: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """``animus web`` on a free port: its base URL."""
    log = tmp_path_factory.mktemp("console") / "web.log"
    async with console_process(console_db[0], animus_home, log) as (base, _proc):
        yield base


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


@contextlib.asynccontextmanager
async def signed_in(browser: Browser, base: str, name: str) -> AsyncIterator[Page]:
    context: BrowserContext = await browser.new_context(base_url=base)
    try:
        page = await context.new_page()
        await page.goto("/login")
        await page.fill("input[name=name]", name)
        await page.fill("input[name=password]", PASSWORD)
        await page.click("form.login button")
        await expect(page.locator("#who")).to_contain_text(name)
        yield page
    finally:
        await context.close()


async def person_db(url: str, name: str) -> Db:
    """A connection that is ``name`` in the database, as the console opens it."""
    return await Db.connect(person_url(url, SECRET.encode(), name), max_size=2,
                            actor=f"test:{name}")


async def test_every_page_needs_a_sign_in_but_health(browser: Browser, console: str) -> None:
    context = await browser.new_context(base_url=console)
    try:
        page = await context.new_page()
        for path in ("/", "/work", "/approvals"):
            await page.goto(path)
            assert page.url.startswith(f"{console}/login?next=")
        health = await page.request.get("/healthz")
        assert health.ok
        assert (await health.json())["ok"] is True
        events = await page.request.get("/events")
        assert events.status == 401
        await page.goto("/login")
        await page.fill("input[name=name]", ALICE)
        await page.fill("input[name=password]", "not the password at all")
        await page.click("form.login button")
        await expect(page.locator(".flash")).to_have_text("wrong name or password")
    finally:
        await context.close()


async def test_sign_in_attempts_are_limited(browser: Browser, console: str) -> None:
    context = await browser.new_context(base_url=console)
    try:
        page = await context.new_page()
        await page.goto("/login")
        csrf = await page.locator("input[name=csrf]").first.get_attribute("value") or ""
        statuses = []
        for _ in range(6):
            r = await page.request.post("/login", form={"name": "console_nobody", "csrf": csrf,
                                                         "password": "wrong wrong wrong"})
            statuses.append(r.status)
        assert statuses == [401] * 5 + [429]  # the name's limit (the client's is higher)
    finally:
        await context.close()


async def test_sign_in_attempts_sent_at_once_are_limited_all_the_same(
        browser: Browser, console: str) -> None:
    context = await browser.new_context(base_url=console)
    try:
        page = await context.new_page()
        await page.goto("/login")
        csrf = await page.locator("input[name=csrf]").first.get_attribute("value") or ""
        responses = await asyncio.gather(*(
            page.request.post("/login", form={"name": "console_nobody_2", "csrf": csrf,
                                              "password": f"wrong guess {n}"})
            for n in range(12)))
        statuses = sorted(r.status for r in responses)
        assert statuses == [401] * 5 + [429] * 7  # counted as they come, not as they end
    finally:
        await context.close()


async def test_a_body_longer_than_the_page_reads_is_refused_unread(
        browser: Browser, console: str) -> None:
    context = await browser.new_context(base_url=console)
    try:
        r = await context.request.post("/login", form={"name": "x" * 200_000, "password": "y"})
        assert r.status == 413
        assert "more than the 16,384 this page reads" in await r.text()
        r = await context.request.post("/submit", form={"params": "x" * 4_000_000})
        assert r.status == 413
    finally:
        await context.close()


async def test_signing_out_ends_every_session_of_the_person(
        browser: Browser, console: str, console_db: tuple[str, Db]) -> None:
    async with signed_in(browser, console, ADA) as page:
        copied = await page.context.storage_state()  # the same cookie, on another device
        other = await browser.new_context(base_url=console, storage_state=copied)
        try:
            elsewhere = await other.new_page()
            await elsewhere.goto("/work")
            await expect(elsewhere.locator("#who")).to_contain_text(ADA)
            await page.locator("form.who button").click()
            await expect(page).to_have_url(f"{console}/login")
            await elsewhere.goto("/work?state=dead")
            await expect(elsewhere).to_have_url(f"{console}/login?next=%2Fwork%3Fstate%3Ddead")
            events = await other.request.get("/events")
            assert events.status == 401
        finally:
            await other.close()
    async with signed_in(browser, console, ADA) as page:  # signing in again works
        await page.goto("/engines")
        await expect(page.locator("#who")).to_contain_text(ADA)


def test_the_limiter_counts_per_name_and_per_client() -> None:
    limiter = LoginLimiter(attempts=2, window=60, per_client=3)
    assert limiter.attempt("a", "1.1.1.1") == 0  # each attempt counts until it succeeds
    assert limiter.attempt("a", "2.2.2.2") == 0
    assert limiter.attempt("a", "3.3.3.3") > 0  # the name: two attempts
    assert limiter.attempt("b", "3.3.3.3") == 0
    limiter.succeeded("a", "2.2.2.2")  # forgets the name's, and this attempt of the client's
    assert limiter.attempt("a", "3.3.3.3") == 0
    assert limiter.attempt("c", "1.1.1.1") == 0
    assert limiter.attempt("d", "1.1.1.1") == 0
    assert limiter.attempt("e", "1.1.1.1") > 0  # the client: three attempts
    assert limiter.attempt("e", "4.4.4.4") == 0


async def test_watch_an_item_run_to_completion_without_reloading(
        browser: Browser, console: str, console_db: tuple[str, Db], animus_home: Path,
        screenshots: Path) -> None:
    url, db = console_db
    created = await db.submit_work(NewWorkItem("console.slow", source="test").params({"n": 1}))
    async with signed_in(browser, console, ALICE) as page:
        await page.goto(f"/work/{created.id}")
        await expect(page.locator("#state")).to_have_text("queued")
        loaded = await page.evaluate("performance.timeOrigin")
        async with run_engine(url, animus_home, faculties=[Slow()]):
            await wait_finished(db, created.id)
            await expect(page.locator("#state")).to_have_text("completed", timeout=10_000)
            await expect(page.locator("#timeline")).to_contain_text("running → completed")
        assert await page.evaluate("performance.timeOrigin") == loaded  # never reloaded
        await page.screenshot(path=str(screenshots / "console-item.png"), full_page=True)
        await page.goto("/work")
        await expect(page.locator(f'tr[data-id="{created.id}"] .state')).to_have_text("completed")
        await page.screenshot(path=str(screenshots / "console-work.png"), full_page=True)


async def test_the_overview_counts_and_charts_work_as_it_finishes(
        browser: Browser, console: str, console_db: tuple[str, Db], animus_home: Path,
        screenshots: Path) -> None:
    url, db = console_db
    async with signed_in(browser, console, BOB) as page:
        await page.goto("/")
        before = int(await page.locator("#chart-total-finished").inner_text())
        queued = int(await page.locator("#count-queued").inner_text())
        loaded = await page.evaluate("performance.timeOrigin")
        items = [await db.submit_work(NewWorkItem("console.slow", source="test")
                                      .params({"n": n})) for n in range(3)]
        await expect(page.locator("#count-queued")).to_have_text(str(queued + 3))
        async with run_engine(url, animus_home, faculties=[Slow()]):
            for item in items:
                await wait_finished(db, item.id)
            await expect(page.locator("#chart-total-finished")).to_have_text(str(before + 3))
            await expect(page.locator("#count-queued")).to_have_text(str(queued))
        assert await page.evaluate("performance.timeOrigin") == loaded  # never reloaded
        tall = await page.locator("#chart rect.finished").evaluate_all(
            "rects => rects.filter(r => r.getAttribute('height') > 0).length")
        assert tall >= 1
        await page.screenshot(path=str(screenshots / "console-overview.png"), full_page=True)


async def test_approve_another_persons_item_but_never_your_own(
        browser: Browser, console: str, console_db: tuple[str, Db], screenshots: Path) -> None:
    url, db = console_db
    theirs = await db.submit_gated(NewWorkItem("console.gated", source="test"),
                                   "approver", 1, "needs a look")
    ada = await person_db(url, ADA)
    try:
        own = await ada.submit_gated(NewWorkItem("console.gated", source="ada"),
                                     "approver", 1, "ada's own")
    finally:
        await ada.close()
    async with signed_in(browser, console, ALICE) as page:
        await page.goto("/approvals")
        await expect(page.locator(f'section[data-id="{theirs.id}"]')).to_be_visible()
        await page.screenshot(path=str(screenshots / "console-approvals.png"), full_page=True)
        box = page.locator(f'section[data-id="{theirs.id}"]')
        await box.locator("input[name=reason]").fill("looks right")
        await box.locator("button[value=approve]").click()
        await expect(page.locator(".flash")).to_contain_text(f"approved {theirs.id}: now queued")
    approvals = await db.approvals(theirs.id)
    assert [(a["approver"], a["decision"], a["reason"]) for a in approvals] == [
        (ALICE, "approve", "looks right")]
    async with signed_in(browser, console, ADA) as page:
        await page.goto(f"/work/{own.id}")
        decide = page.locator("form[action$='/decide']")
        await decide.locator("input[name=reason]").fill("mine is fine")
        await decide.locator("button[value=approve]").click()
        await expect(page.locator(".flash")).to_contain_text("refused:")
        await expect(page.locator("#state")).to_have_text("awaiting_approval")
    assert await db.approvals(own.id) == []
    assert (await db.get_work_item(own.id)).state == "awaiting_approval"


async def test_a_reader_sees_no_action_and_the_database_refuses_a_forged_one(
        browser: Browser, console: str, console_db: tuple[str, Db]) -> None:
    _url, db = console_db
    gated = await db.submit_gated(NewWorkItem("console.gated", source="test"),
                                  "approver", 1, "readers only look")
    async with signed_in(browser, console, BOB) as page:
        await page.goto(f"/work/{gated.id}")
        await expect(page.locator("#state")).to_have_text("awaiting_approval")
        assert await page.locator("form[action$='/decide']").count() == 0
        assert await page.locator("form[action$='/cancel']").count() == 0
        await page.goto("/approvals")
        assert await page.locator("button[value=approve]").count() == 0
        csrf = await page.locator("input[name=csrf]").first.get_attribute("value")
        assert csrf
        forged = await page.request.post(f"/work/{gated.id}/decide", form={
            "csrf": csrf, "decision": "approve", "reason": "forged", "back": "/approvals"})
        assert forged.ok  # followed to the page, which says the database refused
        assert "refused:" in await forged.text()
        await page.goto("/submit")  # no form offered; a forged one is refused (403)
        await expect(page.locator("#not-offered")).to_contain_text("Your role (reader)")
        assert await page.locator("form.submit").count() == 0
        submitted = await page.request.post("/submit", form={
            "csrf": csrf, "work_type": "console.example", "params": "{}"})
        assert submitted.status == 403
        assert "refused:" in await submitted.text()
    assert await db.approvals(gated.id) == []
    assert (await db.get_work_item(gated.id)).state == "awaiting_approval"


async def test_a_state_change_without_the_csrf_token_is_refused(
        browser: Browser, console: str, console_db: tuple[str, Db]) -> None:
    _url, db = console_db
    gated = await db.submit_gated(NewWorkItem("console.gated", source="test"),
                                  "approver", 1, "csrf")
    async with signed_in(browser, console, ALICE) as page:
        forms: list[dict[str, str | float | bool]] = [
            {"decision": "approve", "reason": "no token"},
            {"decision": "approve", "reason": "bad token", "csrf": "x" * 43}]
        for form in forms:
            r = await page.request.post(f"/work/{gated.id}/decide", form=form)
            assert r.status == 403
            assert "CSRF" in await r.text()
        get = await page.request.get(f"/work/{gated.id}/decide")  # and never on a GET
        assert get.status == 405
    assert await db.approvals(gated.id) == []


async def test_markup_in_params_is_shown_as_text(
        browser: Browser, console: str, console_db: tuple[str, Db]) -> None:
    _url, db = console_db
    evil = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'
    created = await db.submit_work(NewWorkItem("console.evil", source=evil).params({"x": evil}))
    async with signed_in(browser, console, ALICE) as page:
        dialogs: list[str] = []
        page.on("dialog", lambda d: dialogs.append(d.message))
        await page.goto(f"/work/{created.id}")
        await expect(page.locator("pre").first).to_contain_text(evil.replace('"', '\\"'))
        await page.goto(f"/work?source={quote(evil)}")
        await expect(page.locator(f'tr[data-id="{created.id}"]')).to_contain_text(evil)
        assert await page.evaluate("window.pwned") is None
        assert await page.locator("img[src=x]").count() == 0
        assert dialogs == []


async def test_odd_input_gets_a_clear_answer_never_an_error(
        browser: Browser, console: str) -> None:
    async with signed_in(browser, console, OLGA) as page:
        for path in ("/work?type=%00", "/dead?type=a%00b", "/work?source=%00"):
            r = await page.request.get(path)
            assert r.status == 400, path
            assert "NUL character" in await r.text()
        await page.goto("/work?since=999d")
        await expect(page.locator(".flash")).to_contain_text("since '999d' is not one of 1h,")
        await page.goto("/engines")
        csrf = await page.locator("input[name=csrf]").first.get_attribute("value") or ""
        r = await page.request.post("/engines/zzz/stop", form={"csrf": csrf, "back": "/engines"})
        assert "not an id: 'zzz'" in html.unescape(await r.text())
        r = await page.request.post("/work/" + "7" * 36 + "/retry",
                                    form={"csrf": csrf, "back": "/dead", "from_step": "s" * 6000})
        assert r.ok  # a message that would not fit the cookie is cut short, not lost
        assert "not an id" in await r.text()
    anonymous = await browser.new_context(base_url=console)
    try:
        page = await anonymous.new_page()
        await page.goto("/login")
        await page.fill("input[name=name]", "nul\x00name")
        await page.fill("input[name=password]", PASSWORD)
        await page.click("form.login button")
        await expect(page.locator(".flash")).to_have_text("wrong name or password")
    finally:
        await anonymous.close()


async def test_signal_a_waiting_item_and_watch_it_resume(
        browser: Browser, console: str, console_db: tuple[str, Db], animus_home: Path) -> None:
    url, db = console_db
    created = await db.submit_work(NewWorkItem("console.wait", source="test"))
    async with run_engine(url, animus_home, faculties=[Waits()]):
        await wait_until(lambda: _state(db, created.id, "waiting"), 15,
                         message="the item to wait")
        async with signed_in(browser, console, OLGA) as page:
            await page.goto(f"/work/{created.id}")
            await expect(page.locator("#state")).to_have_text("waiting")
            await page.locator("input[name=event]").fill("go")
            await page.locator("input[name=data]").fill('{"from": "the console"}')
            await page.locator("form[action$='/signal'] button").click()
            await expect(page.locator(".flash")).to_contain_text("it woke the item")
            await expect(page.locator("#state")).to_have_text("completed", timeout=10_000)
            await page.reload()  # a suspension is no failed attempt, and the wait is over
            await expect(page.locator("#attempts")).to_have_text(
                "1 of 3 counted, 2 in all (1 suspended)")
            assert await page.locator("dt", has_text="Waits for").count() == 0
    done = await db.get_work_item(created.id)
    assert done.outcome.data == {"got": {"from": "the console"}}
    signalled = [e for e in await db.history(created.id) if e.event == "signal"]
    assert [e.db_user for e in signalled] == [OLGA]


async def _state(db: Db, wid: UUID, state: str) -> bool:
    return (await db.get_work_item(wid)).state == state


async def test_no_animus_role_reads_the_password_hashes(console_db: tuple[str, Db]) -> None:
    """`animus roles setup` grants readers every table of the schema: never this one."""
    url, db = console_db
    async with db.connection() as conn:
        await setup_roles(conn)  # again, after the console's table exists
    for name in (BOB, ADA):
        person = await person_db(url, name)
        try:
            with pytest.raises(PermissionDenied):
                async with person.connection() as conn:
                    await conn.fetch("SELECT password_hash FROM animus.console_users")
        finally:
            await person.close()


async def test_see_the_fleet_and_submit_from_a_faculty_example(
        browser: Browser, console: str, console_db: tuple[str, Db], animus_home: Path,
        screenshots: Path) -> None:
    url, db = console_db
    async with run_engine(url, animus_home, faculties=[Example(), Needy(), Ticking()]), \
            signed_in(browser, console, OLGA) as page:
        await page.goto("/engines")
        row = page.locator("#engines tr[data-id]").filter(has_text=f":{os.getpid()}")
        await expect(row).to_contain_text("live")
        await expect(row.locator("form[action$='/stop'] button")).to_be_visible()
        await page.screenshot(path=str(screenshots / "console-engines.png"), full_page=True)
        await page.goto("/faculties")
        example = page.locator('#faculties tr[data-name="console-example"]')
        await expect(example).to_contain_text("console.example")
        await expect(page.locator('tr[data-name="console-needy"] .disabled')).to_contain_text(
            "CONSOLE_NEVER_SET")
        await page.screenshot(path=str(screenshots / "console-faculties.png"), full_page=True)
        await page.goto("/schedules")
        await expect(page.locator('#schedules tr[data-name="console-hourly"]')).to_contain_text(
            "console.tick")
        await page.goto("/faculties")
        await example.locator("a", has_text="submit").click()
        await expect(page.locator("textarea[name=params]")).to_contain_text(
            "hello from the example")
        await page.screenshot(path=str(screenshots / "console-submit.png"), full_page=True)
        await page.locator("form.submit button").click()
        await expect(page.locator(".flash")).to_contain_text("submitted")
        await expect(page.locator("#state")).to_have_text("completed", timeout=15_000)
        await expect(page.locator("#steps")).to_contain_text("first")
        await expect(page.locator("details.record")).to_contain_text(
            "tests.test_console.Example")
        wid = UUID(await page.locator("#item").get_attribute("data-id") or "")
    item = await db.get_work_item(wid)
    assert item.params == {"text": "hello from the example"}
    assert item.provenance.source == "console"
    assert [e.db_user for e in await db.history(wid) if e.event == "submitted"] == [OLGA]


async def test_submitting_bad_params_says_what_is_wrong_and_keeps_the_text(
        browser: Browser, console: str) -> None:
    async with signed_in(browser, console, OLGA) as page:
        await page.goto("/submit?type=console.example")
        await page.locator("textarea[name=params]").fill('{"text": "unclosed"')
        await page.locator("form.submit button").click()
        await expect(page.locator(".flash")).to_contain_text("not submitted: params")
        await expect(page.locator("textarea[name=params]")).to_have_value('{"text": "unclosed"')
        await page.locator("textarea[name=params]").fill("[1, 2]")
        await page.locator("form.submit button").click()
        await expect(page.locator(".flash")).to_contain_text("must be a JSON object")


async def test_replay_a_dead_letter_then_run_it_again_and_compare(
        browser: Browser, console: str, console_db: tuple[str, Db], animus_home: Path,
        screenshots: Path) -> None:
    url, db = console_db
    created = await db.submit_work(NewWorkItem("console.example", source="test")
                                   .params({"text": "once more"}))
    await db.dead_letter(created.id, "given up on purpose")
    async with signed_in(browser, console, BOB) as page:  # a reader: no button, and refused
        await page.goto("/dead")
        row = page.locator(f'#work tr[data-id="{created.id}"]')
        await expect(row).to_contain_text("given up on purpose")
        assert await row.locator("button").count() == 0
        csrf = await page.locator("input[name=csrf]").first.get_attribute("value")
        forged = await page.request.post(f"/work/{created.id}/retry",
                                         form={"csrf": csrf or "", "back": "/dead"})
        assert "refused:" in await forged.text()
    assert all(w.replay_of != created.id
               for w in await db.list_work(work_type="console.example", limit=1000))
    async with signed_in(browser, console, OLGA) as page, \
            run_engine(url, animus_home, faculties=[Example()]):
        await page.goto("/dead")
        await page.screenshot(path=str(screenshots / "console-dead.png"), full_page=True)
        await page.locator(f'#work tr[data-id="{created.id}"] button').click()
        await expect(page.locator(".flash")).to_contain_text(f"replayed {created.id} as ")
        await expect(page.locator(f'#item a[href="/work/{created.id}"]')).to_be_visible()
        await expect(page.locator("#state")).to_have_text("completed", timeout=15_000)
        replay = UUID(await page.locator("#item").get_attribute("data-id") or "")
        await page.locator("form[action$='/again'] button").click()
        await expect(page.locator("#verdict")).to_contain_text("identical", timeout=15_000)
        await page.screenshot(path=str(screenshots / "console-diff.png"), full_page=True)
    assert (await db.get_work_item(replay)).replay_of == created.id


async def test_a_pipeline_is_drawn_with_the_state_of_each_stage(
        browser: Browser, console: str, console_db: tuple[str, Db], animus_home: Path,
        screenshots: Path) -> None:
    url, db = console_db
    pipeline = {"pipeline": {"name": "console-demo"}, "stage": [
        {"name": "draft", "work_type": "console.example", "params": {"text": "a"}},
        {"name": "review", "work_type": "console.example", "depends_on": ["draft"],
         "params": {"text": "${draft.echo.text}"}},
        {"name": "never", "work_type": "console.needy", "depends_on": ["draft"]},
        {"name": "publish", "work_type": "console.example", "depends_on": ["review", "never"]}]}
    created = await db.submit_work(NewWorkItem("pipeline", source="test")
                                   .params({"pipeline": pipeline}))
    async with signed_in(browser, console, BOB) as page:
        async with run_engine(url, animus_home, faculties=[Example()]):
            await page.goto(f"/work/{created.id}")
            draft = page.locator('#stages g[data-stage="draft"]')
            await expect(draft).to_have_class("stage state-completed", timeout=15_000)
            await expect(page.locator('#stages g[data-stage="review"]')).to_have_class(
                "stage state-completed", timeout=15_000)
        # no engine runs console.needy: it stays queued, and publish waits for it
        await page.reload()
        await expect(page.locator('#stages g[data-stage="never"]')).to_have_class(
            "stage state-queued")
        await expect(page.locator('#stages g[data-stage="publish"]')).to_have_class(
            "stage state-pending")
        assert await page.locator("#stages path.edge").count() == 4
        await page.screenshot(path=str(screenshots / "console-pipeline.png"), full_page=True)
        await page.goto("/pipelines")
        await expect(page.locator(f'#work tr[data-id="{created.id}"]')).to_contain_text(
            "console-demo")


async def test_search_memory_as_a_reader(
        browser: Browser, console: str, console_db: tuple[str, Db]) -> None:
    _url, db = console_db
    memory = await Memory.open(db, HashingEmbedder(384))
    await memory.store("the console remembers the harbour at dawn", source="test")
    await memory.store("an unrelated note about invoices", source="test")
    async with signed_in(browser, console, BOB) as page:
        await page.goto("/memory")
        await expect(page.locator("#memories")).to_contain_text("harbour at dawn")
        await page.locator("input[name=q]").fill("harbour dawn")
        await page.locator("select[name=mode]").select_option("text")
        await page.locator("form.filters button").click()
        rows = page.locator("#memories tr td.content")
        await expect(rows.first).to_contain_text("harbour at dawn")
        await expect(rows).to_have_count(1)


async def test_an_items_trace_is_linked(
        browser: Browser, console: str, console_db: tuple[str, Db]) -> None:
    _url, db = console_db
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    created = await db.submit_work(NewWorkItem("console.traced", source="test")
                                   .with_trace(f"00-{trace_id}-00f067aa0ba902b7-01"))
    untraced = await db.submit_work(NewWorkItem("console.traced", source="test"))
    async with signed_in(browser, console, BOB) as page:
        await page.goto(f"/work/{created.id}")
        await expect(page.locator("#trace")).to_have_attribute(
            "href", TRACES.replace("{trace_id}", trace_id))
        await page.goto(f"/work/{untraced.id}")
        await expect(page.locator("#state")).to_have_text("queued")
        assert await page.locator("#trace").count() == 0


async def test_no_page_shows_a_secret(
        browser: Browser, console: str, console_db: tuple[str, Db], animus_home: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    url, db = console_db
    monkeypatch.setenv("CONSOLE_TEST_TOKEN", TOKEN)
    created = await db.submit_work(NewWorkItem("console.leaky", source="test"))
    async with run_engine(url, animus_home, faculties=[Leaky(), Example()]):
        await wait_finished(db, created.id)
        async with signed_in(browser, console, ADA) as page:
            for path in ("/", "/work", f"/work/{created.id}", "/engines", "/faculties",
                         "/schedules", "/submit", "/dead", "/memory", "/approvals",
                         "/pipelines", f"/diff?a={created.id}&b={created.id}"):
                response = await page.goto(path)
                assert response is not None
                assert response.ok, path
                html = await page.content()
                for secret in (TOKEN, API_KEY, SECRET):
                    assert secret not in html, f"{path} shows a secret"
            await page.goto(f"/work/{created.id}")
            await expect(page.locator("pre").nth(1)).to_contain_text(
                "[redacted CONSOLE_TEST_TOKEN]")


@pytest.fixture(scope="module")
async def big_console(server_url: str, template_url: str, animus_home: Path,
                      tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """A console over 100,000 work items (90% completed, 5% dead, 4% queued, 1% waiting, of
    20 types, four audit rows each), made as the console benchmark makes them."""
    async with scratch_database(server_url, template=TEMPLATE) as url:
        await fill(url, BIG)
        db = await Db.connect(url, max_size=2, actor="test")
        try:
            await add_person(db, SECRET.encode(), BOB, "reader", PASSWORD)
        finally:
            await db.close()
        log = tmp_path_factory.mktemp("big-console") / "web.log"
        async with console_process(url, animus_home, log) as (base, _proc):
            yield base


BIG = 100_000


async def test_the_work_list_over_a_hundred_thousand_items(
        browser: Browser, big_console: str) -> None:
    async with signed_in(browser, big_console, BOB) as page:
        await expect(page.locator("#count-queued")).to_have_text(str(BIG * 4 // 100))
        await expect(page.locator("#count-waiting")).to_have_text(str(BIG // 100))
        await page.goto("/work")
        seen: list[str] = []
        for _ in range(4):  # newest first, fifty to a page, no item twice
            rows = page.locator("#work tr[data-id]")
            await expect(rows).to_have_count(50)
            ids = await rows.evaluate_all("rows => rows.map(r => r.dataset.id)")
            assert not set(ids) & set(seen)
            seen += ids
            await page.get_by_text("Older →").click()
        await page.goto("/work?state=dead&type=bench.type10")  # g % 100 == 90, g % 20 == 10
        states = page.locator("#work tr[data-id] td.state")
        await expect(states).to_have_count(50)
        assert set(await states.all_inner_texts()) == {"dead"}
        types = await page.locator("#work tr[data-id] td:nth-child(2)").all_inner_texts()
        assert set(types) == {"bench.type10"}
        await page.locator("#work tr[data-id] a").first.click()
        await expect(page.locator("#state")).to_have_text("dead")
        await expect(page.locator("#timeline tr")).to_have_count(5)  # a header, four rows


async def test_pages_catch_up_after_the_console_is_killed(
        browser: Browser, console_db: tuple[str, Db], animus_home: Path,
        tmp_path: Path) -> None:
    """SIGKILL of the console under viewers: nothing is lost (it keeps nothing), and open
    pages reconnect, still signed in, and show what changed while it was down."""
    url, db = console_db
    port = free_port()
    async with console_process(url, animus_home, tmp_path / "one.log", port) as (base, proc), \
            contextlib.AsyncExitStack() as pages:
        viewers = [await pages.enter_async_context(signed_in(browser, base, name))
                   for name in (BOB, ALICE, OLGA)]
        queued = int(await viewers[0].locator("#count-queued").inner_text())
        loaded = [await page.evaluate("performance.timeOrigin") for page in viewers]
        proc.kill()
        proc.wait()
        created = await db.submit_work(NewWorkItem("console.killed", source="test"))
        async with console_process(url, animus_home, tmp_path / "two.log", port):
            for page in viewers:
                await expect(page.locator("#count-queued")).to_have_text(
                    str(queued + 1), timeout=15_000)
                await expect(page.locator("#who")).to_be_visible()
            # each page reloaded itself once the feed came back: it may have missed changes
            now = [await page.evaluate("performance.timeOrigin") for page in viewers]
            assert all(a != b for a, b in zip(now, loaded, strict=True))
            await viewers[0].goto(f"/work/{created.id}")
            await expect(viewers[0].locator("#state")).to_have_text("queued")
