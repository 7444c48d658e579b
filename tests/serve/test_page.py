"""The chat page in headless Chromium (Debian's, as tests/ui drives it): upload an image, ask, the answer streams in."""

from playwright.sync_api import expect, sync_playwright

from tests.conftest import jpeg_bytes
from tests.serve.test_api import greedy

CHROMIUM = "/usr/bin/chromium"


def test_the_page_streams_an_answer_about_an_uploaded_image(server, loaded, tmp_path):
    image = jpeg_bytes(96, 64, seed=4)
    (tmp_path / "upload.jpg").write_bytes(image)
    question = "What is written in the image?"
    expected = greedy(loaded, question, image, 256)  # the server's default max_tokens
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page()
            page.goto(server.url)
            expect(page.locator("#model")).to_have_text("final")
            page.set_input_files("#image", str(tmp_path / "upload.jpg"))
            expect(page.locator("#preview")).to_be_visible()
            page.fill("#question", question)
            # Count the answer's text changes as they happen: a streamed answer grows in several steps.
            page.evaluate(
                """() => { window.updates = 0; new MutationObserver(() => window.updates++)
                    .observe(document.getElementById("log"), {subtree: true, childList: true, characterData: true}); }"""
            )
            page.click("#send")
            answer = page.locator(".assistant[data-done]")
            expect(answer).to_have_count(1, timeout=60_000)
            assert answer.text_content() == expected and expected
            assert page.evaluate("window.updates") > 3
            expect(page.locator(".user")).to_contain_text("[image]")
        finally:
            browser.close()
