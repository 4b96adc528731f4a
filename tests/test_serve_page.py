"""The chat page at / in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright's Python
API) against `gemmakit serve`'s app with a tiny model: type a message, watch the reply stream in with its
tokens/s, press stop mid-reply, and go on with the conversation."""

from __future__ import annotations

import os
import time

import pytest

from serve_helpers import Running, serve_args, tiny_dir

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]

pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                                reason=f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)")
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="needs Playwright's Python package (pip install playwright)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = Running(serve_args(tiny_dir(tmp_path_factory.mktemp("page") / "tiny-gemma3")))
    yield running
    running.stop()


@pytest.fixture
def slow(server, monkeypatch):
    """Every token arrives 40 ms apart, so a person (or a test) can press stop mid-reply; the Requests
    submitted are recorded."""
    submitted, real = [], server.scheduler.submit

    def submit(request, on_event):
        submitted.append(request)

        def late(event):
            time.sleep(0.04)  # on the scheduler's thread: the whole batch slows down, as a big model would
            on_event(event)
        return real(request, late)

    monkeypatch.setattr(server.scheduler, "submit", submit)
    return submitted


@pytest.fixture
def page(server, tmp_path):
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                       headless=True, args=ARGS)
        try:
            page = context.new_page()
            page.goto(server.url + "/")
            sync_api.expect(page.locator("#model")).to_have_text("tiny-gemma3")
            yield page
        finally:
            context.close()


def test_reply_streams_with_tokens_per_second(server, page):
    expected = server.client().chat.completions.create(
        model="tiny-gemma3", messages=[{"role": "user", "content": "is the thesis"}], max_tokens=12,
        temperature=0).choices[0].message.content
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "12")
    page.fill("#input", "is the thesis")
    page.press("#input", "Enter")
    reply = page.locator(".msg.assistant").last
    sync_api.expect(reply).to_have_text(expected)
    sync_api.expect(page.locator("#stats")).to_contain_text("12 tokens")
    assert "tokens/s" in page.locator("#stats").inner_text()
    sync_api.expect(page.locator("#send")).to_be_enabled()
    assert page.locator(".msg.user").all_inner_texts() == ["is the thesis"]


def test_stop_mid_reply_then_the_conversation_goes_on(server, page, slow):
    page.fill("#max_tokens", "200")
    page.fill("#input", "is the thesis")
    page.click("#send")
    reply = page.locator(".msg.assistant").last
    sync_api.expect(page.locator("#stop")).to_be_enabled()
    page.wait_for_function("document.querySelectorAll('.msg.assistant')[0].textContent.length >= 5")
    sync_api.expect(page.locator("#stats")).to_contain_text("tokens/s")
    page.click("#stop")
    sync_api.expect(reply).to_contain_text("(stopped)")
    sync_api.expect(page.locator("#send")).to_be_enabled()
    server.idle(timeout=5)  # the server cancelled the request: no slot stays busy
    shown = reply.inner_text().removesuffix("(stopped)").rstrip()
    time.sleep(0.3)
    assert reply.inner_text().removesuffix("(stopped)").rstrip() == shown  # nothing arrives after stop
    assert 5 <= len(shown) < 200
    # The next message carries the conversation so far: the first message and the reply as far as it got.
    page.fill("#max_tokens", "3")
    page.fill("#input", "and then?")
    page.press("#input", "Enter")
    sync_api.expect(page.locator(".msg.assistant")).to_have_count(2)
    sync_api.expect(page.locator("#stats")).to_contain_text("3 tokens")
    tok = server.service.served.tokenizer
    prompt = tok.decode(slow[-1].prompt, skip_special=False)
    assert "is the thesis" in prompt and "and then?" in prompt
    assert shown.strip()[:5] in prompt  # the partial reply, as the model turn
