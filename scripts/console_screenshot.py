"""The README's picture of a customer page: `python scripts/console_screenshot.py URL KEY CUSTOMER_ID OUT.png`
(a running `cdp serve`, a read key; headless Debian chromium through Playwright)."""
import sys

from playwright.sync_api import sync_playwright


def main(url: str, key: str, customer_id: str, out: str) -> None:
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1400}, base_url=url)
        page.goto("/login")
        page.get_by_label("API key").fill(key)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(url + "/")
        page.goto(f"/customers/{customer_id}")
        page.screenshot(path=out, full_page=False)
        browser.close()


if __name__ == "__main__":
    main(*sys.argv[1:5])
