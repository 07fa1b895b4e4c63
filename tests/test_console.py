"""The operator console in a real browser (issue 18, point 2): Playwright driving Debian's
Chromium (headless) against a real gateway process with real reference devices. Sign-in
exchanges the admin token for a session cookie (HttpOnly, Secure, SameSite=Strict);
nothing of the console answers without it; the page updates by itself; a test push
sent from it reaches the phone; an action without the page's CSRF token is refused.
With LPGW_SCREENSHOTS=1 its screenshots (desktop and phone) replace docs/console/'s.
"""

from __future__ import annotations

import os
import shutil
import signal

import pytest

from gateway.service import free_port
from tests.conftest import ROOT, Device, GatewayProcess, eventually

ADMIN = "console-admin-token-0123456789abcdef"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture
def gateway(tmp_path):
    admin = tmp_path / "admin.token"
    admin.write_text(ADMIN + "\n")
    admin.chmod(0o600)
    proc = GatewayProcess(tmp_path / "state", free_port("127.0.0.1"), {
        "name": "Ward 3", "api": {"host": "127.0.0.1", "port": 0,
                                  "admin_token_file": str(admin)},
        "sip": {"enabled": True, "host": "127.0.0.1", "port": 0}})
    proc.start()
    try:
        yield proc
    finally:
        proc.kill(signal.SIGTERM)


@pytest.fixture
async def browser():
    playwright = pytest.importorskip("playwright.async_api")
    if not shutil.which("chromium"):
        pytest.skip("Debian's chromium not installed (scripts/test installs it)")
    async with playwright.async_playwright() as p:
        launched = await p.chromium.launch(executable_path=CHROMIUM,
                                           args=["--no-sandbox"])  # root, in a container
        try:
            yield launched
        finally:
            await launched.close()


async def test_sign_in_watch_devices_and_send_a_test_push(gateway, browser, tmp_path):
    if shutil.which("sipp") is None:  # a missing tool, guarded up front: no silent part
        pytest.skip("needs Debian package sip-tester (SIPp): scripts/test installs it")
    base = f"https://localhost:{gateway.runtime['api_port']}"
    context = await browser.new_context(ignore_https_errors=True,
                                        viewport={"width": 1280, "height": 800})
    page = await context.new_page()
    phones: list[Device] = []
    try:
        # nothing without signing in
        answer = await context.request.get(f"{base}/console/api/state")
        assert answer.status == 401
        await page.goto(f"{base}/console/")
        assert page.url == f"{base}/console/sign-in"
        await page.fill("#token", "not-the-token")
        await page.click("#sign-in")
        assert "that is not the admin token" in await page.inner_text("body")

        first = Device(gateway.handle(), "tls", auto_call="decline")
        phones.append(first)
        token = await first.welcome()
        await page.goto(f"{base}/console/sign-in")
        await page.fill("#token", ADMIN)
        await page.click("#sign-in")
        await page.wait_for_url(f"{base}/console/")
        cookie = next(c for c in await context.cookies() if c["name"] == "lpgw_console")
        assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
        assert cookie["path"] == "/console"
        await page.wait_for_selector("text=1 connected (QUIC 0, TLS 1)")
        assert await page.inner_text("#name") == "Ward 3"
        assert token[:12] in await page.inner_text("#device-rows")

        # it updates by itself: a second phone appears without a reload
        second = Device(gateway.handle(), "quic")
        phones.append(second)
        await second.welcome()
        await page.wait_for_selector("text=2 connected (QUIC 1, TLS 1)", timeout=5000)

        # a test push from the console reaches the phone
        await page.click(f"tr[data-token='{token}'] button.test-push")
        got = await first.next("push", timeout=5)
        assert got["payload"]["aps"]["alert"]["body"] == "A test push from the console"
        await page.wait_for_selector("text=test push: done")
        await page.wait_for_selector(f"tr[data-token='{token}'] td.last-push >> text=delivered")
        await page.click(f"tr[data-token='{token}'] button.open-device")
        await page.wait_for_selector(f"#device-pushes >> text={got['id']}: delivered")
        assert token in await page.inner_text("#device-facts")

        # an action without the page's CSRF token (another site's form, say) is refused
        status = await page.evaluate("""async (token) => (await fetch('/console/api/push',
            {method: 'POST', headers: {'content-type': 'application/json'},
             body: JSON.stringify({token})})).status""", token)
        assert status == 403
        with pytest.raises(TimeoutError):
            await first.next("push", timeout=0.5)

        # bind the phone to a SIP user from the console; a SIPp call to that user rings
        # it, the phone declines, and the call shows with its answer
        page.once("dialog", lambda dialog: dialog.accept("nurse"))
        await page.click(f"tr[data-token='{token}'] button.bind")
        await page.wait_for_selector(f"tr[data-token='{token}'] >> text=nurse")
        from types import SimpleNamespace

        from tests.test_sip import sipp
        pbx = SimpleNamespace(sip=SimpleNamespace(port=gateway.runtime["sip_port"]))
        code, out = await sipp(pbx, "uac_final.xml", "nurse", final=603, tmp=tmp_path)
        assert code == 0, out
        await page.wait_for_selector("#call-rows >> text=603 declined", timeout=5000)
        assert "nurse" in await page.inner_text("#call-rows")
        await page.wait_for_selector("#push-totals >> text=/[1-9][0-9]* accepted/")

        # the self-test, run from the page inside the gateway, each check shown
        await page.click("#run-selftest")
        await page.wait_for_selector("#checks >> text=device over tls", timeout=20000)
        summary = await page.inner_text("#checks li.summary")
        checks = await page.inner_text("#checks")
        assert summary.startswith("passed"), checks

        # disconnect it: it is closed, and comes back (with backoff) by itself
        await page.click(f"tr[data-token='{token}'] button.disconnect")
        await page.wait_for_selector("text=disconnect: done")
        assert (await first.next("disconnected", timeout=5))["reason"] == "unavailable"
        await first.next("welcome", timeout=10)

        # search narrows the list
        await page.fill("#search", "no-such-device")
        await page.wait_for_selector("text=page 1 of 1")
        await eventually(lambda: _rows(page, 0), timeout=5)

        shots = ROOT / "docs" / "console" if os.environ.get("LPGW_SCREENSHOTS") else tmp_path
        shots.mkdir(exist_ok=True)
        await page.fill("#search", "")
        await page.wait_for_selector(f"tr[data-token='{token}']")
        await page.screenshot(path=str(shots / "overview.png"), full_page=True)
        await page.set_viewport_size({"width": 390, "height": 844})  # a phone
        await page.screenshot(path=str(shots / "overview-phone.png"), full_page=True)

        await page.click("#sign-out")
        await page.wait_for_url(f"{base}/console/sign-in")
        answer = await context.request.get(f"{base}/console/api/state")
        assert answer.status == 401
        text = await (await context.request.get(f"{base}/metrics")).text()
        assert 'lpgw_console_sign_ins_total{result="refused"} 1.0' in text
        assert 'lpgw_console_sign_ins_total{result="ok"} 1.0' in text
        assert "lpgw_console_sessions 0.0" in text
    finally:
        for phone in phones:
            await phone.stop()
        await context.close()


async def _rows(page, expected: int) -> bool:
    return await page.locator("#device-rows tr").count() == expected
